/**
 * The main promise, end to end on a real engine: back up a CVAT-shaped deployment, change rows and
 * files, restore, and find every row and every file (bytes, owner, mode, times, links) as they
 * were, with every container running.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, open, readFile, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { allocatedBytes, snapshotTree, type TreeEntry } from './fixture/tree.js';
import { runCli } from './fixture/cli.js';

const FILE_VOLUMES = ['cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];

const isRoot = process.getuid?.() === 0;
const BIG = 'data/1/over-8-GiB.bin';
const BIG_SIZE = 9 * 1024 ** 3;
const BIG_OFFSET = 8.5 * 1024 ** 3;

for (const via of ['host', 'engine'] as const) {
describe(`backup --to, then restore (round trip, --via ${via})`, { skip: via === 'host' && !isRoot && 'the host path needs root' }, () => {
  let f: FixtureDeployment;
  let work: string;
  const trees: Record<string, Record<string, TreeEntry>> = {};
  let rowsBefore: string;
  let backupJson: {
    cvatVersion: string;
    volumes: { name: string; files: number; bytes: number }[];
    downtimeMs: number;
    durationMs: number;
  };

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'rt' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-rt-'));
    if (via === 'host') {
      // Over 8 GiB and sparse: cheap to make, back up and restore only where holes are kept.
      await f.exec('cvat_server', `truncate -s ${BIG_SIZE} /home/django/data/${BIG} && printf 'far away' | dd of=/home/django/data/${BIG} bs=1 seek=${BIG_OFFSET} conv=notrunc 2>/dev/null`);
    }
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('backs up every volume but the cache and reports it as JSON', async () => {
    const dir = join(work, 'backup');
    const r = await runCli(['--project', f.project, '--json', 'backup', '--to', dir, '--via', via]);
    assert.equal(r.code, 0, r.stderr);
    backupJson = JSON.parse(r.stdout) as typeof backupJson;
    assert.equal(backupJson.cvatVersion, '2.73.0');
    assert.deepEqual(
      backupJson.volumes.map((v) => v.name).sort(),
      ['cvat_data', 'cvat_db', 'cvat_events_db', 'cvat_inmem_db', 'cvat_keys', 'cvat_logs'],
    );
    const data = backupJson.volumes.find((v) => v.name === 'cvat_data')!;
    assert.ok(data.files >= 10 && data.bytes > 64 * 1024 * 1024, JSON.stringify(data));
    assert.ok(backupJson.downtimeMs > 0 && backupJson.downtimeMs <= backupJson.durationMs);
    assert.deepEqual(
      (await readdir(dir)).sort(),
      ['cvat_data.tar.gz', 'cvat_db.tar.gz', 'cvat_events_db.tar.gz', 'cvat_inmem_db.tar.gz', 'cvat_keys.tar.gz', 'cvat_logs.tar.gz', 'manifest.json'],
    );
    const manifest = JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8')) as {
      cvat: { version: string; serverImageDigest: string };
      volumes: { composeName: string; name: string; mountPath: string; sha256: string }[];
    };
    assert.equal(manifest.cvat.version, '2.73.0');
    assert.match(manifest.cvat.serverImageDigest, /^sha256:/);
    const db = manifest.volumes.find((v) => v.composeName === 'cvat_db')!;
    assert.equal(db.name, `${f.project}_cvat_db`);
    assert.equal(db.mountPath, '/var/lib/postgresql/data');
    // Every container runs again after the backup.
    assert.ok(Object.values(await f.states()).every((s) => s === 'running'), JSON.stringify(await f.states()));
    // What the restore must bring back: taken now, while nothing has changed since the backup.
    rowsBefore = await databaseFingerprint(f);
    for (const v of FILE_VOLUMES) trees[v] = await snapshotTree(await f.volumePath(v), { directoryTimes: true, exclude: (p) => p === BIG });
  });

  it('verify accepts the set', async () => {
    const r = await runCli(['verify', join(work, 'backup')]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /OK: 6 archives of CVAT 2\.73\.0/);
  });

  it('restore brings back every row and every file, owners, modes and links, and CVAT runs', async () => {
    // Damage: rows deleted, added and changed; files overwritten, deleted, added, re-owned.
    await f.psql(`DELETE FROM engine_labeledshape WHERE id % 3 = 0; INSERT INTO engine_task (name) VALUES ('after backup'); UPDATE engine_task SET name = 'renamed' WHERE id < 50;`);
    await f.exec(
      'cvat_server',
      `set -e; cd /home/django/data
head -c 1000 /dev/urandom > data/1/raw/frame_000001.jpg
rm -f data/1/preview.jpg data/1/compressed/0-hardlink.zip
chmod 0600 data/1/manifest.jsonl; chown 1:1 data/1/manifest.jsonl
mkdir -p data/2 && echo new > data/2/new.txt
echo "SECRET_KEY = 'changed'" > /home/django/keys/secret_key.py`,
    );
    assert.notEqual(await databaseFingerprint(f), rowsBefore);

    const r = await runCli(['--project', f.project, 'restore', join(work, 'backup'), '--via', via]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /Restored 6 volumes of CVAT 2\.73\.0/);

    const states = await f.states();
    assert.equal(Object.keys(states).length, 9);
    assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
    await f.waitForDatabase();
    assert.equal(await databaseFingerprint(f), rowsBefore);
    for (const v of FILE_VOLUMES) {
      const after = await snapshotTree(await f.volumePath(v), { directoryTimes: true, exclude: (p) => p === BIG });
      assert.deepEqual(after, trees[v], `volume ${v} differs after restore`);
    }
    // PostgreSQL's folder: uid 70, 0700, as postgres:15-alpine requires.
    const pg = await snapshotTree(await f.volumePath('cvat_db'));
    assert.equal(pg['.']?.uid, 70);
    assert.equal(pg['.']?.mode, '700');
    assert.equal(pg['PG_VERSION']?.uid, 70);
    const media = await f.volumePath('cvat_data');
    if (via === 'host') {
      // Sparse files stay sparse; a file over 8 GiB keeps its size and its bytes far out.
      assert.ok((await allocatedBytes(join(media, 'data/1/sparse.bin'))) < 1024 * 1024);
      assert.equal((await stat(join(media, BIG))).size, BIG_SIZE);
      assert.ok((await allocatedBytes(join(media, BIG))) < 1024 * 1024);
      const handle = await open(join(media, BIG), 'r');
      const far = Buffer.alloc(8);
      await handle.read(far, 0, 8, BIG_OFFSET);
      await handle.close();
      assert.equal(far.toString(), 'far away');
    }
    // No rollback folder is left behind.
    for (const v of [...FILE_VOLUMES, 'cvat_db']) {
      assert.ok(!(await readdir(await f.volumePath(v))).some((n) => n.startsWith('.cvat-backup')), v);
    }
  });

  it('the fixture really has the awkward cases the round trip claims to cover', () => {
    const data = trees['cvat_data']!;
    const names = Object.keys(data);
    assert.ok(names.some((n) => n.includes('\n')), 'a name with a newline');
    assert.ok(names.some((n) => n.includes('caf\xe9')), 'a name that is not UTF-8');
    assert.ok(names.some((n) => n.length > 255), 'a path longer than 255 bytes');
    assert.ok(names.some((n) => n.split('/').some((part) => part.length >= 200)), 'a 200-byte name');
    assert.equal(data['data/1/preview.jpg']?.type, 'symlink');
    assert.equal(data['data/1/compressed/0.zip']?.linkGroup, data['data/1/compressed/0-hardlink.zip']?.linkGroup);
    assert.ok(data['data/1/compressed/0.zip']?.linkGroup);
    assert.equal(data['data/1/manifest.jsonl']?.uid, 12345);
    assert.equal(data['tasks/1/artifacts']?.mode, '2775');
    assert.equal(data['empty']?.type, 'dir');
    assert.equal(data['data/1/sparse.bin']?.size, 64 * 1024 * 1024 + 4);
  });
});
}
