import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { UsageError } from '../errors.js';
import { describeLocation, parseLocation } from './location.js';

void describe('repository locations (restic syntax)', () => {
  void it('parses every form restic users write', () => {
    assert.deepEqual(parseLocation('/srv/backup'), { kind: 'local', path: '/srv/backup' });
    assert.deepEqual(parseLocation('repo'), { kind: 'local', path: 'repo' });
    assert.deepEqual(parseLocation('local:/srv/x'), { kind: 'local', path: '/srv/x' });
    assert.deepEqual(parseLocation('sftp:backup@nas:/srv/cvat'), { kind: 'sftp', user: 'backup', host: 'nas', port: undefined, path: '/srv/cvat' });
    assert.deepEqual(parseLocation('sftp:nas-alias:cvat'), { kind: 'sftp', user: undefined, host: 'nas-alias', port: undefined, path: 'cvat' });
    assert.deepEqual(parseLocation('sftp://backup@127.0.0.1:2222//srv/cvat'), { kind: 'sftp', user: 'backup', host: '127.0.0.1', port: 2222, path: '/srv/cvat' });
    assert.deepEqual(parseLocation('sftp://nas/relative/dir'), { kind: 'sftp', user: undefined, host: 'nas', port: undefined, path: 'relative/dir' });
    assert.deepEqual(parseLocation('s3:s3.amazonaws.com/my-bucket/cvat/prod'), { kind: 's3', endpoint: undefined, bucket: 'my-bucket', prefix: 'cvat/prod' });
    assert.deepEqual(parseLocation('s3:https://127.0.0.1:7480/cvat'), { kind: 's3', endpoint: 'https://127.0.0.1:7480', bucket: 'cvat', prefix: '' });
    assert.deepEqual(parseLocation('s3:http://localhost:9000/cvat/a/b/'), { kind: 's3', endpoint: 'http://localhost:9000', bucket: 'cvat', prefix: 'a/b' });
    assert.deepEqual(parseLocation('s3:minio.example.org/cvat'), { kind: 's3', endpoint: 'https://minio.example.org', bucket: 'cvat', prefix: '' });
    assert.deepEqual(parseLocation('rest:http://127.0.0.1:8000/cvat/'), { kind: 'rest', url: 'http://127.0.0.1:8000/cvat' });
    assert.deepEqual(parseLocation('rclone:b2prod:bucket/cvat'), { kind: 'rclone', remote: 'b2prod:bucket/cvat' });
    assert.deepEqual(parseLocation('rclone::local:/srv/cvat'), { kind: 'rclone', remote: ':local:/srv/cvat' });
    assert.deepEqual(parseLocation('rclone::sftp,host=nas:cvat'), { kind: 'rclone', remote: ':sftp,host=nas:cvat' });
    assert.deepEqual(parseLocation('rclone:/srv/cvat'), { kind: 'rclone', remote: '/srv/cvat' });
  });

  void it('refuses, with one line, what it would otherwise take for a folder or what would leak a secret', () => {
    for (const bad of ['', 'ftp://host/x', 'http://host/x', 'sftp2://host//x', 'b2:bucket', 'azure:c:/p', 'sftp:hostonly', 'sftp://host', 's3:bucket-only', 's3:https://h/', 's3:https://h/Bad_Bucket', 'rest:ftp://x', 'rest:http://user:secret@host:8000/', 's3:https://key:secret@host/b', 'sftp://u:pw@host//x', 'rclone:nocolon', 'rclone:', 'rclone::', 'rclone:/', 'rclone:-x:y', 'rclone:--config=/tmp/c:x', 'rclone::-x:y']) {
      assert.throws(() => parseLocation(bad), (e: unknown) => e instanceof UsageError && !e.message.includes('\n') && !e.message.includes('secret'), bad);
    }
  });

  void it('describes a location without credentials', () => {
    assert.equal(describeLocation(parseLocation('sftp://backup@127.0.0.1:2222//srv/cvat')), 'sftp:backup@127.0.0.1:2222:/srv/cvat');
    assert.equal(describeLocation(parseLocation('s3:s3.amazonaws.com/bk1/p')), 's3:s3.amazonaws.com/bk1/p');
    assert.equal(describeLocation(parseLocation('rest:http://h:8000/x')), 'rest:http://h:8000/x');
  });
});
