/**
 * The S3 backend against a real S3 server (Ceph RADOS Gateway on loopback, scripts/ceph-rgw.sh):
 * the Backend contract, multipart uploads, ranges, listings with the server's times, `create`'s
 * refusals, abandoned uploads, credential errors that name no secret, and Object Lock.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { PutBucketPolicyCommand, CreateMultipartUploadCommand, GetObjectLockConfigurationCommand, GetObjectRetentionCommand, PutObjectCommand, DeleteObjectCommand, ListObjectVersionsCommand } from '@aws-sdk/client-s3';
import { ObjectLockedError, TargetNotEmptyError, UsageError } from '../errors.js';
import { conformance } from './conformance.js';
import { S3Backend, type S3BackendOptions } from './s3.js';
import { SignedGetter } from './signed-get.js';
import { emptyPrefix, rawClient, testS3, uniqueBucket, type TestS3 } from './s3-testing.js';

/** What the CVAT host's user needs (README, "S3 Object Lock"); no s3:BypassGovernanceRetention. */
const HOST_ACTIONS = [
  's3:ListBucket',
  's3:ListBucketVersions',
  's3:ListBucketMultipartUploads',
  's3:GetBucketObjectLockConfiguration',
  's3:GetObject',
  's3:GetObjectVersion',
  's3:PutObject',
  's3:DeleteObject',
  's3:DeleteObjectVersion',
  's3:PutObjectRetention',
  's3:GetObjectRetention',
  's3:AbortMultipartUpload',
];

const server = testS3();
const skip = 'skip' in server ? server.skip : false;
const s3 = 'skip' in server ? undefined : server;

function backend(s: TestS3, bucket: string, prefix: string, options: S3BackendOptions = {}): S3Backend {
  const where = { endpoint: s.endpoint, bucket, prefix };
  return new S3Backend(where, `s3:${s.endpoint}/${bucket}/${prefix}`, { credentials: s.owner, env: { CVAT_BACKUP_S3_CHECKSUMS: 'when_required' }, ...options });
}

if (s3) {
  const bucket = uniqueBucket('conformance');
  let n = 0;
  conformance('s3 (Ceph RGW)', () => {
    const prefix = `repo${++n}/sub`;
    // The SDK's default checksum headers (the other tests set when_required): both work on Ceph 16
    // because every body goes up with its length (streamed bodies are what Ceph 16 rejects).
    return { backend: backend(s3, bucket, prefix, { env: {} }), dispose: () => emptyPrefix(rawClient(s3), bucket, prefix) };
  });
}

void describe('S3Backend on Ceph RGW', { skip }, () => {
  const bucket = uniqueBucket('s3backend');
  const client = s3 ? rawClient(s3) : undefined;
  before(async () => {
    await backend(s3!, bucket, 'first').create(); // the bucket did not exist: create makes it
  });
  after(async () => {
    await emptyPrefix(client!, bucket, '');
  });

  void it('uploads a large pack in parts and reads ranges across part boundaries', async () => {
    const b = backend(s3!, bucket, 'multipart', { partSize: 5 * 1024 * 1024, multipartAbove: 5 * 1024 * 1024 });
    await b.create();
    const data = randomBytes(11 * 1024 * 1024 + 123);
    const parts = [data.subarray(0, 3_000_000), data.subarray(3_000_000, 9_000_000), data.subarray(9_000_000)];
    const name = 'ef'.repeat(32);
    await b.save('data', name, parts);
    assert.ok((await b.load('data', name)).equals(data));
    const at = 5 * 1024 * 1024 - 10;
    assert.ok((await b.load('data', name, { offset: at, length: 20 })).equals(data.subarray(at, at + 20)));
    assert.equal((await b.load('data', name, { offset: data.length - 5, length: 100 })).length, 5);
    assert.equal((await b.load('data', name, { offset: data.length + 5, length: 100 })).length, 0);
    assert.deepEqual((await b.list('data')).map((f) => [f.name, f.size]), [[name, data.length]]);
    assert.deepEqual(await b.listTemporary(), [], 'a completed upload leaves nothing behind');
    // A multipart upload S3 multipart ETags are "<md5 of md5s>-<parts>": three parts went up.
    const head = await client!.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: 'multipart/data/' }));
    assert.match(head.Versions?.[0]?.ETag ?? '', /-3"?$/);
    await b.close();
  });

  void it("a pack's SHA-256 hint is the upload's signed payload hash: the server stores a matching body and refuses one that does not match", async () => {
    const b = backend(s3!, bucket, 'payload-hash');
    await b.create();
    const data = randomBytes(100_000);
    const name = createHash('sha256').update(data).digest('hex');
    await b.save('data', name, [data.subarray(0, 5), data.subarray(5)], { sha256: name });
    assert.ok((await b.load('data', name)).equals(data));
    // The bytes changed after they were hashed (memory, a bug): the server refuses them.
    const altered = Buffer.from(data);
    altered[50_000]! ^= 1;
    const other = 'ab'.repeat(32);
    await assert.rejects(b.save('data', other, altered, { sha256: name }), (error: Error) => /sha256|SHA256|BadDigest|mismatch/i.test(`${error.name} ${error.message}`));
    assert.equal(await b.stat('data', other), undefined, 'nothing was stored');
    await b.close();
  });

  void it('signedLoad: the SDK\'s signed GET of a range, made by another client (a worker), returns exactly those bytes; altered, the server refuses it; no secret key in it', async () => {
    for (const env of [{}, { CVAT_BACKUP_S3_CHECKSUMS: 'when_required' }]) {
      const b = backend(s3!, bucket, 'signed', { env });
      await b.create().catch(() => undefined);
      const data = randomBytes(3 * 1024 * 1024 + 77);
      const name = '5a'.repeat(32);
      await b.save('data', name, data);
      const getter = new SignedGetter();
      try {
        for (const range of [
          { offset: 0, length: data.length },
          { offset: 1_000_001, length: 2_000_000 },
          { offset: data.length - 1, length: 1 },
        ]) {
          const request = (await b.signedLoad('data', name, range))!;
          assert.ok(request, 'a request');
          assert.ok(!JSON.stringify(request).includes(s3!.owner.secretAccessKey), 'the secret key is not in it');
          const into = Buffer.alloc(range.length);
          await getter.get(request, into);
          assert.ok(into.equals(data.subarray(range.offset, range.offset + range.length)), JSON.stringify(range));
        }
        // The signature covers the range: another range is refused.
        const request = (await b.signedLoad('data', name, { offset: 0, length: 10 }))!;
        const headers = Object.fromEntries(Object.entries(request.headers).map(([k, v]) => [k, k.toLowerCase() === 'range' ? 'bytes=0-19' : v]));
        await assert.rejects(getter.get({ ...request, headers }, Buffer.alloc(20)), /HTTP 403/);
        // A missing file: not 206, so the caller falls back to load (which says ENOENT).
        await assert.rejects(getter.get((await b.signedLoad('data', 'ab'.repeat(32), { offset: 0, length: 10 }))!, Buffer.alloc(10)), /HTTP 404/);
      } finally {
        getter.close();
        await b.close();
      }
    }
  });

  void it('create refuses a prefix that holds something else, and leaves it alone', async () => {
    await client!.send(new PutObjectCommand({ Bucket: bucket, Key: 'photos/holiday.jpg', Body: 'jpeg' }));
    await assert.rejects(backend(s3!, bucket, 'photos').create(), (e: unknown) => e instanceof TargetNotEmptyError && /not empty/.test(e.message));
    const kept = await client!.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: 'photos/' }));
    assert.deepEqual(kept.Versions?.map((v) => v.Key), ['photos/holiday.jpg']);
    await backend(s3!, bucket, 'photos2').create(); // an unused prefix in a bucket that exists is fine
  });

  void it('shows abandoned multipart uploads as temporary files and aborts them', async () => {
    const b = backend(s3!, bucket, 'abandoned');
    await client!.send(new CreateMultipartUploadCommand({ Bucket: bucket, Key: 'abandoned/data/12/' + '12'.repeat(32) }));
    const temporaries = await b.listTemporary();
    assert.equal(temporaries.length, 1);
    assert.equal(temporaries[0]!.kind, 'data');
    assert.ok(temporaries[0]!.modifiedMs !== undefined);
    await b.removeTemporary(temporaries[0]!);
    assert.deepEqual(await b.listTemporary(), []);
    assert.deepEqual(await b.list('data'), []);
  });

  void it('wrong credentials fail with one line that names no secret', async () => {
    const secret = 'Sup3rSecretValueNeverPrinted0123456789';
    const b = backend(s3!, bucket, 'x', { credentials: { accessKeyId: s3!.owner.accessKeyId, secretAccessKey: secret } });
    const error = await b.list('data').then(() => undefined, (e: unknown) => e as Error);
    assert.ok(error instanceof UsageError, String(error));
    assert.doesNotMatch(error.message, /\n/);
    assert.ok(!error.message.includes(secret) && !JSON.stringify(error, Object.getOwnPropertyNames(error)).includes(secret));
    const unknown = backend(s3!, bucket, 'x', { credentials: { accessKeyId: 'NOSUCHKEY', secretAccessKey: secret } });
    await assert.rejects(unknown.stat('config', 'config'), (e: unknown) => e instanceof UsageError && !e.message.includes(secret));
  });
});

void describe('S3 Object Lock on Ceph RGW', { skip }, () => {
  const client = s3 ? rawClient(s3) : undefined;
  const buckets: string[] = [];
  after(async () => {
    for (const b of buckets) await emptyPrefix(client!, b, '');
  });

  void it('compliance: every repository object but locks is retained; remove refuses until the retention ends, then frees every version', async () => {
    const bucket = uniqueBucket('lock-compliance');
    buckets.push(bucket);
    const b = backend(s3!, bucket, 'repo', { objectLock: { mode: 'compliance', seconds: 4 } });
    await b.create();
    const config = await client!.send(new GetObjectLockConfigurationCommand({ Bucket: bucket }));
    assert.equal(config.ObjectLockConfiguration?.ObjectLockEnabled, 'Enabled');
    await b.save('config', 'config', Buffer.from('c'));
    await b.save('snapshots', 's1', Buffer.from('snapshot'));
    await b.save('locks', 'l1', Buffer.from('lock'));
    const retention = await client!.send(new GetObjectRetentionCommand({ Bucket: bucket, Key: 'repo/snapshots/s1' }));
    assert.equal(retention.Retention?.Mode, 'COMPLIANCE');
    await assert.rejects(client!.send(new GetObjectRetentionCommand({ Bucket: bucket, Key: 'repo/locks/l1' })), 'a lock file has no retention');
    await b.remove('locks', 'l1');
    assert.deepEqual(await b.list('locks'), []);
    assert.deepEqual((await b.listHidden()).map((h) => h.key), [], 'a removed lock leaves no version behind');

    // A later process learns the retention from the config object.
    const later = backend(s3!, bucket, 'repo');
    assert.deepEqual(await later.retention(), { mode: 'compliance', seconds: 4 });
    await assert.rejects(later.remove('snapshots', 's1'), (e: unknown) => e instanceof ObjectLockedError && e.exitCode === 18 && /until/.test(e.message));
    // Not even the owner with the governance bypass can delete the version.
    const versions = await client!.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: 'repo/snapshots/s1' }));
    await assert.rejects(client!.send(new DeleteObjectCommand({ Bucket: bucket, Key: 'repo/snapshots/s1', VersionId: versions.Versions![0]!.VersionId!, BypassGovernanceRetention: true })));
    await new Promise((r) => setTimeout(r, 4500));
    await later.remove('snapshots', 's1');
    const left = await client!.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: 'repo/snapshots/' }));
    assert.deepEqual([...(left.Versions ?? []), ...(left.DeleteMarkers ?? [])], [], 'after the retention every version is gone');
  });

  void it('a plain DELETE or an overwrite by the host only hides the data: listHidden names it and undelete brings the bytes back', async () => {
    const bucket = uniqueBucket('lock-attack');
    buckets.push(bucket);
    const b = backend(s3!, bucket, 'repo', { objectLock: { mode: 'governance', seconds: 3600 } });
    await b.create();
    const pack = randomBytes(1000);
    const name = 'aa'.repeat(32);
    await b.save('config', 'config', Buffer.from('c'));
    await b.save('data', name, pack);
    await b.save('index', 'i1', Buffer.from('index'));
    // The attacker, with the credentials the backup ran with.
    await client!.send(new DeleteObjectCommand({ Bucket: bucket, Key: `repo/data/aa/${name}` }));
    await client!.send(new PutObjectCommand({ Bucket: bucket, Key: 'repo/index/i1', Body: 'garbage' }));
    const versions = await client!.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: `repo/data/aa/${name}` }));
    await assert.rejects(client!.send(new DeleteObjectCommand({ Bucket: bucket, Key: `repo/data/aa/${name}`, VersionId: versions.Versions![0]!.VersionId! })), 'a retained version cannot be deleted without the bypass');
    assert.equal(await b.stat('data', name), undefined, 'hidden');
    assert.deepEqual((await b.listHidden()).map((h) => h.key), [`data/aa/${name}`, 'index/i1']);
    assert.equal(await b.undelete(), 2);
    assert.ok((await b.load('data', name)).equals(pack));
    assert.equal((await b.load('index', 'i1')).toString(), 'index');
    assert.deepEqual(await b.listHidden(), []);
  });

  void it("governance: the CVAT host's own user (the README's bucket policy) backs up but cannot lift the retention; the owner can", async () => {
    const bucket = uniqueBucket('lock-governance');
    buckets.push(bucket);
    await backend(s3!, bucket, '', { objectLock: { mode: 'governance', seconds: 3600 } }).create(); // the owner makes the bucket
    const resources = [`arn:aws:s3:::${bucket}`, `arn:aws:s3:::${bucket}/*`];
    const principal = { AWS: ['arn:aws:iam:::user/host'] };
    const policy = {
      Version: '2012-10-17',
      Statement: [
        { Effect: 'Allow', Principal: principal, Action: HOST_ACTIONS, Resource: resources },
        { Effect: 'Deny', Principal: principal, Action: ['s3:BypassGovernanceRetention'], Resource: resources },
      ],
    };
    await client!.send(new PutBucketPolicyCommand({ Bucket: bucket, Policy: JSON.stringify(policy) }));
    const host = backend(s3!, bucket, 'repo', { credentials: s3!.host, objectLock: { mode: 'governance', seconds: 3600 } });
    await host.create();
    await host.save('config', 'config', Buffer.from('c'));
    await host.save('snapshots', 's1', Buffer.from('snapshot'));
    await host.save('locks', 'l1', Buffer.from('lock'));
    await host.remove('locks', 'l1');
    assert.equal(await host.extendRetention([{ kind: 'snapshots', name: 's1' }]), 1);
    await assert.rejects(host.remove('snapshots', 's1'), ObjectLockedError);
    const hostClient = rawClient(s3!, 'host');
    const versionId = (await hostClient.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: 'repo/snapshots/s1' }))).Versions![0]!.VersionId!;
    await assert.rejects(hostClient.send(new DeleteObjectCommand({ Bucket: bucket, Key: 'repo/snapshots/s1', VersionId: versionId, BypassGovernanceRetention: true })), (e: unknown) => (e as Error).name === 'AccessDenied');
    assert.equal((await host.load('snapshots', 's1')).toString(), 'snapshot');
    await client!.send(new DeleteObjectCommand({ Bucket: bucket, Key: 'repo/snapshots/s1', VersionId: versionId, BypassGovernanceRetention: true }));
    assert.equal(await host.stat('snapshots', 's1'), undefined, 'governance: the owner can lift it');
  });

  void it('refuses to put an Object Lock repository into an existing bucket without Object Lock', async () => {
    const bucket = uniqueBucket('nolock');
    buckets.push(bucket);
    await backend(s3!, bucket, '').create();
    await assert.rejects(backend(s3!, bucket, 'repo', { objectLock: { mode: 'governance', seconds: 60 } }).create(), (e: unknown) => e instanceof UsageError && /without Object Lock/.test(e.message));
  });
});
