/**
 * The CLI against a real S3 server (Ceph RADOS Gateway on loopback, scripts/ceph-rgw.sh) with a
 * CVAT-shaped fixture: init, backup, check --read-data and a byte-exact restore from S3; then an
 * Object Lock (compliance) repository that an attacker with the backup's own credentials attacks
 * (a version delete fails, a plain delete and an overwrite only hide data, `check` reports them and
 * `repair undelete` brings them back), and forget that refuses inside the retention and works after.
 * Secrets never appear in any output.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { DeleteObjectCommand, ListObjectsV2Command, ListObjectVersionsCommand, PutObjectCommand } from '@aws-sdk/client-s3';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { snapshotTree, type TreeEntry } from './fixture/tree.js';
import { runCli, type CliResult } from './fixture/cli.js';
import { emptyPrefix, rawClient, testS3, uniqueBucket } from '../src/backend/s3-testing.js';

const FILE_VOLUMES = ['cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];
const isRoot = process.getuid?.() === 0;
const server = testS3();
const s3 = 'skip' in server ? undefined : server;
const skip = 'skip' in server ? server.skip : !isRoot && 'repository backups read volume folders: needs root';

describe('S3 repositories through the CLI (Ceph RGW)', { skip }, () => {
  let f: FixtureDeployment;
  let env: NodeJS.ProcessEnv;
  const buckets: string[] = [];
  const outputs: CliResult[] = [];
  const PASSWORD = 'S3 test password, never printed';
  const cli = async (args: string[], extra: NodeJS.ProcessEnv = {}): Promise<CliResult> => {
    const r = await runCli(args, { ...env, ...extra });
    outputs.push(r);
    return r;
  };
  const capture = async (): Promise<{ rows: string; trees: Record<string, Record<string, TreeEntry>> }> => {
    const trees: Record<string, Record<string, TreeEntry>> = {};
    for (const v of FILE_VOLUMES) trees[v] = await snapshotTree(await f.volumePath(v), { directoryTimes: true });
    return { rows: await databaseFingerprint(f), trees };
  };

  before(async () => {
    f = await createFixtureDeployment({ prefix: 's3' });
    env = {
      AWS_ACCESS_KEY_ID: s3!.owner.accessKeyId,
      AWS_SECRET_ACCESS_KEY: s3!.owner.secretAccessKey,
      AWS_EC2_METADATA_DISABLED: 'true',
      AWS_REQUEST_CHECKSUM_CALCULATION: 'when_required',
      AWS_RESPONSE_CHECKSUM_VALIDATION: 'when_required',
      CVAT_BACKUP_PASSWORD: PASSWORD,
    };
  });
  after(async () => {
    await f?.destroy();
    for (const b of buckets) await emptyPrefix(rawClient(s3!), b, '');
    // No secret in any output of any command the tests ran.
    for (const o of outputs) {
      for (const secret of [s3!.owner.secretAccessKey, PASSWORD]) {
        assert.ok(!o.stdout.includes(secret) && !o.stderr.includes(secret), 'a secret was printed');
      }
    }
  });

  it('init, backup, check --read-data and a byte-exact restore from an S3 bucket the tool creates', async () => {
    const bucket = uniqueBucket('cli');
    buckets.push(bucket);
    const repo = { CVAT_BACKUP_REPO: `s3:${s3!.endpoint}/${bucket}/cvat/prod` };
    const init = await cli(['--json', 'init'], repo);
    assert.equal(init.code, 0, init.stderr);
    assert.equal((JSON.parse(init.stdout) as { repository: string }).repository, `s3:${s3!.endpoint}/${bucket}/cvat/prod`);
    const again = await cli(['init'], repo);
    assert.equal(again.code, 14, again.stderr);

    const backup = await cli(['--project', f.project, '--json', 'backup'], repo);
    assert.equal(backup.code, 0, backup.stderr);
    const stored = await capture();
    const keys = await rawClient(s3!).send(new ListObjectsV2Command({ Bucket: bucket, Prefix: 'cvat/prod/' }));
    assert.ok(keys.Contents?.some((o) => /^cvat\/prod\/data\/[0-9a-f]{2}\/[0-9a-f]{64}$/.test(o.Key!)), 'packs in restic\'s layout');

    const check = await cli(['check', '--read-data'], repo);
    assert.equal(check.code, 0, check.stderr);
    assert.match(check.stdout, /blobs read and verified/);

    // Change everything, then restore: the snapshot's bytes and rows come back.
    await f.psql(`DELETE FROM engine_labeledshape; INSERT INTO engine_task (name) VALUES ('after the backup');`);
    await f.exec('cvat_server', 'set -e; rm -rf /home/django/data/data/1/raw');
    const restore = await cli(['--project', f.project, 'restore', 'latest'], repo);
    assert.equal(restore.code, 0, restore.stderr);
    await f.waitForDatabase();
    const now = await capture();
    assert.equal(now.rows, stored.rows);
    for (const v of FILE_VOLUMES) assert.deepEqual(now.trees[v], stored.trees[v], v);

    // Wrong credentials: one line, exit 2, no secret.
    const wrong = await cli(['snapshots'], { ...repo, AWS_SECRET_ACCESS_KEY: 'not-the-secret-0123456789' });
    assert.equal(wrong.code, 2, wrong.stderr);
    assert.equal(wrong.stderr.trim().split('\n').length, 1, wrong.stderr);
    assert.ok(!wrong.stderr.includes('not-the-secret-0123456789'));
  });

  it('Object Lock (compliance): the backup credentials cannot destroy a backup; check reports hidden files, repair undelete restores them; forget waits for the retention', async () => {
    const bucket = uniqueBucket('cli-lock');
    buckets.push(bucket);
    const repo = { CVAT_BACKUP_REPO: `s3:${s3!.endpoint}/${bucket}/repo` };
    const RETENTION_S = 60;
    const init = await cli(['init', '--object-lock', `${RETENTION_S}s`, '--object-lock-mode', 'compliance'], repo);
    assert.equal(init.code, 0, init.stderr);
    const b1 = await cli(['--project', f.project, '--json', 'backup'], repo);
    assert.equal(b1.code, 0, b1.stderr);
    const first = JSON.parse(b1.stdout) as { snapshot: string; retentionExtended: number };
    assert.ok(first.retentionExtended > 2, JSON.stringify(first));

    // A second backup; forgetting the first is refused while its retention lasts.
    const b2 = await cli(['--project', f.project, 'backup'], repo);
    assert.equal(b2.code, 0, b2.stderr);
    const lastWritten = Date.now();
    const refused = await cli(['forget', '--keep-last', '1', '--prune'], repo);
    assert.equal(refused.code, 18, refused.stderr);
    assert.match(refused.stderr, /forget: .*Object Lock retention.*nothing was removed/);
    assert.equal((JSON.parse((await cli(['--json', 'snapshots'], repo)).stdout) as unknown[]).length, 2);

    // The attacker holds the same keys the backups used.
    const attacker = rawClient(s3!);
    const listed = await attacker.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: 'repo/data/' }));
    const pack = listed.Contents![0]!.Key!;
    const versions = await attacker.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: pack }));
    await assert.rejects(attacker.send(new DeleteObjectCommand({ Bucket: bucket, Key: pack, VersionId: versions.Versions![0]!.VersionId!, BypassGovernanceRetention: true })));
    await attacker.send(new DeleteObjectCommand({ Bucket: bucket, Key: pack }));
    await attacker.send(new PutObjectCommand({ Bucket: bucket, Key: `repo/snapshots/${first.snapshot}`, Body: 'ransom note' }));

    const damaged = await cli(['check'], repo);
    assert.notEqual(damaged.code, 0);
    assert.match(damaged.stderr, /hidden by a delete or an overwrite.*repair undelete/);
    const undelete = await cli(['--json', 'repair', 'undelete'], repo);
    assert.equal(undelete.code, 0, undelete.stderr);
    assert.equal((JSON.parse(undelete.stdout) as { restored: number }).restored, 2);
    const healed = await cli(['check', '--read-data'], repo);
    assert.equal(healed.code, 0, healed.stderr);
    assert.match(healed.stdout, /OK: 2 snapshots/);

    // After the retention, forget and prune work (prune also replaces index files the second
    // backup wrote: they name packs its first pass wrote for files that changed again).
    await new Promise((r) => setTimeout(r, Math.max(0, lastWritten + (RETENTION_S + 2) * 1000 - Date.now())));
    const forgot = await cli(['--json', 'forget', '--keep-last', '1', '--prune'], repo);
    assert.equal(forgot.code, 0, forgot.stderr);
    assert.deepEqual((JSON.parse(forgot.stdout) as { removed: string[] }).removed, [first.snapshot]);
    const check = await cli(['check', '--read-data'], repo);
    assert.equal(check.code, 0, check.stderr);
  });
});
