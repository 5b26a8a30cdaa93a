/**
 * The snapshot repository end to end on a real engine: init, nightly-style backups that only read
 * what changed, restore of an older and of the latest snapshot (rows, bytes, owners, modes, links,
 * holes), damage found by check --read-data and refused by restore, a wrong password, and backups
 * killed with SIGKILL at random points.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { allocatedBytes, snapshotTree, type TreeEntry } from './fixture/tree.js';
import { runCli, startCli } from './fixture/cli.js';

const FILE_VOLUMES = ['cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];
const isRoot = process.getuid?.() === 0;

interface BackupJson {
  snapshot: string;
  parent: string | null;
  volumes: { name: string; files: number; bytes: number; filesUnchanged: number; bytesRead: number }[];
  bytesAdded: number;
  downtimeMs: number;
}

describe('snapshot repository', { skip: !isRoot && 'repository backups read volume folders: needs root' }, () => {
  let f: FixtureDeployment;
  let work: string;
  let env: NodeJS.ProcessEnv;
  let first: BackupJson;
  let second: BackupJson;
  const state: Record<string, { rows: string; trees: Record<string, Record<string, TreeEntry>> }> = {};

  const capture = async (): Promise<{ rows: string; trees: Record<string, Record<string, TreeEntry>> }> => {
    const trees: Record<string, Record<string, TreeEntry>> = {};
    for (const v of FILE_VOLUMES) trees[v] = await snapshotTree(await f.volumePath(v), { directoryTimes: true });
    return { rows: await databaseFingerprint(f), trees };
  };
  const allRunning = async (): Promise<void> => {
    const states = await f.states();
    assert.equal(Object.keys(states).length, 9);
    assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
  };

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'rp' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-repo-'));
    env = { CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'correct horse battery staple' };
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('backup before init says to run init (exit 14); init creates the repository, once', async () => {
    const none = await runCli(['--project', f.project, 'backup'], env);
    assert.equal(none.code, 14, none.stderr);
    assert.match(none.stderr, /cvat-backup init/);
    const init = await runCli(['init'], env);
    assert.equal(init.code, 0, init.stderr);
    const again = await runCli(['init'], env);
    assert.equal(again.code, 14);
    assert.match(again.stderr, /already exists/);
    // The password is nowhere in the repository.
    const keys = await readdir(join(work, 'repo', 'keys'));
    const keyText = await readFile(join(work, 'repo', 'keys', keys[0]!), 'utf8');
    assert.doesNotMatch(keyText, /correct horse/);
  });

  it('first backup stores everything; a second one reads only what changed', async () => {
    const r1 = await runCli(['--project', f.project, '--json', 'backup'], env);
    assert.equal(r1.code, 0, r1.stderr);
    first = JSON.parse(r1.stdout) as BackupJson;
    assert.equal(first.parent, null);
    state['first'] = await capture();
    await allRunning();

    // A day of annotation work: rows added and changed, one media file added, one replaced.
    await f.psql(`INSERT INTO engine_task (name) SELECT 'day 2 task ' || g FROM generate_series(1, 50) g; UPDATE engine_labeledshape SET label = 'relabelled' WHERE id % 10 = 0;`);
    await f.exec('cvat_server', `set -e; cd /home/django/data/data/1; head -c 500000 /dev/urandom > raw/frame_000002.jpg; chown 1000:1000 raw/frame_000002.jpg; head -c 1000 /dev/urandom > manifest.jsonl`);
    const r2 = await runCli(['--project', f.project, '--json', 'backup'], env);
    assert.equal(r2.code, 0, r2.stderr);
    second = JSON.parse(r2.stdout) as BackupJson;
    assert.equal(second.parent, first.snapshot);
    state['second'] = await capture();
    const media = second.volumes.find((v) => v.name === 'cvat_data')!;
    assert.ok(media.filesUnchanged >= media.files - 3, JSON.stringify(media));
    assert.ok(media.bytesRead < 1024 * 1024, `only changed media was read: ${media.bytesRead}`);
    assert.ok(second.bytesAdded < first.bytesAdded / 2, `${second.bytesAdded} added vs ${first.bytesAdded}`);

    const list = await runCli(['--json', 'snapshots'], env);
    assert.equal(list.code, 0, list.stderr);
    assert.deepEqual((JSON.parse(list.stdout) as { id: string }[]).map((s) => s.id), [first.snapshot, second.snapshot]);
  });

  it('restore of the first snapshot (by id prefix) brings back its rows and files; restore latest the second', async () => {
    const r = await runCli(['--project', f.project, '--json', 'restore', first.snapshot.slice(0, 8)], env);
    assert.equal(r.code, 0, r.stderr);
    // The media unchanged since the first snapshot is kept (linked), the replaced frame written.
    const media = (JSON.parse(r.stdout) as { volumes: { composeName: string; files: number; keptFiles?: number }[] }).volumes.find((v) => v.composeName === 'cvat_data')!;
    assert.ok(media.keptFiles !== undefined && media.keptFiles >= 2 && media.keptFiles < media.files, JSON.stringify(media));
    await allRunning();
    await f.waitForDatabase();
    const now = await capture();
    assert.equal(now.rows, state['first']!.rows);
    for (const v of FILE_VOLUMES) assert.deepEqual(now.trees[v], state['first']!.trees[v], v);
    // Holes stay holes.
    assert.ok((await allocatedBytes(join(await f.volumePath('cvat_data'), 'data/1/sparse.bin'))) < 1024 * 1024);

    const latest = await runCli(['--project', f.project, 'restore', 'latest'], env);
    assert.equal(latest.code, 0, latest.stderr);
    await f.waitForDatabase();
    const then = await capture();
    assert.equal(then.rows, state['second']!.rows);
    for (const v of FILE_VOLUMES) assert.deepEqual(then.trees[v], state['second']!.trees[v], v);
  });

  it('a wrong password is refused with exit 13', async () => {
    const r = await runCli(['snapshots'], { ...env, CVAT_BACKUP_PASSWORD: 'wrong' });
    assert.equal(r.code, 13);
    assert.match(r.stderr, /wrong repository password/);
  });

  it('backups killed with SIGKILL at random points: CVAT starts again, check passes, the next backup succeeds', async () => {
    // More data so that a backup takes long enough to be killed in the middle. Written through the
    // volume's folder: a killed backup may have left the server stopped.
    const video = join(await f.volumePath('cvat_data'), 'data/1/raw/video.mp4');
    const newVideo = async (): Promise<void> => writeFile(video, randomBytes(150_000_000));
    await newVideo();
    for (let trial = 0; trial < 10; trial++) {
      const cli = startCli(['--project', f.project, 'backup'], env);
      // From its first line of progress (past opening the repository), a later point each trial.
      await cli.waitForStderr(/\S/, 60_000).catch(() => undefined);
      await new Promise((resolve) => setTimeout(resolve, trial * 300));
      cli.kill('SIGKILL');
      await cli.result;
      // The repository stays consistent whatever the moment of the kill.
      const check = await runCli(['check'], env);
      assert.equal(check.code, 0, `trial ${trial}: ${check.stderr}`);
      // New data every few trials, so backups keep having something to write.
      if (trial % 3 === 2) await newVideo();
    }
    // The next backup notices the dead holder's lock and starts what it had stopped.
    const next = await runCli(['--project', f.project, '--json', 'backup'], env);
    assert.equal(next.code, 0, next.stderr);
    await allRunning();
    const full = await runCli(['check', '--read-data'], env);
    assert.equal(full.code, 0, full.stderr);
  });

  it('forget --keep-last 2 --prune keeps two snapshots, frees the rest and leaves a sound repository', async () => {
    const before = JSON.parse((await runCli(['--json', 'snapshots'], env)).stdout) as { id: string }[];
    assert.ok(before.length >= 3, `${before.length} snapshots`);
    const dry = await runCli(['forget', '--keep-last', '2', '--dry-run'], env);
    assert.equal(dry.code, 0, dry.stderr);
    assert.equal((JSON.parse((await runCli(['--json', 'snapshots'], env)).stdout) as unknown[]).length, before.length, 'dry run removes nothing');
    const refused = await runCli(['forget'], env);
    assert.equal(refused.code, 2, 'no rule, no forgetting');

    const r = await runCli(['--json', 'forget', '--keep-last', '2', '--prune'], env);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout) as { kept: { id: string }[]; removed: string[]; prune: { bytesFreed: number; packsDeleted: number } };
    assert.deepEqual(result.kept.map((k) => k.id), before.slice(-2).map((s) => s.id).reverse());
    assert.ok(result.prune.packsDeleted > 0 && result.prune.bytesFreed > 0, JSON.stringify(result.prune));
    const after = JSON.parse((await runCli(['--json', 'snapshots'], env)).stdout) as { id: string }[];
    assert.deepEqual(after.map((s) => s.id), before.slice(-2).map((s) => s.id));
    const full = await runCli(['check', '--read-data'], env);
    assert.equal(full.code, 0, full.stderr);
    const rows = await databaseFingerprint(f);
    const restored = await runCli(['--project', f.project, 'restore', 'latest'], env);
    assert.equal(restored.code, 0, restored.stderr);
    await f.waitForDatabase();
    assert.equal(await databaseFingerprint(f), rows);
    first = { ...first, snapshot: after[0]!.id };
  });

  it('a flipped bit: check --read-data names the damaged snapshot; restore refuses it before touching anything', async () => {
    const dataDir = join(work, 'repo', 'data');
    // One flipped bit in every pack (some packs are orphans of the killed backups).
    for (const sub of await readdir(dataDir)) {
      for (const name of await readdir(join(dataDir, sub))) {
        const path = join(dataDir, sub, name);
        const bytes = await readFile(path);
        bytes[Math.floor(bytes.length / 3)] = bytes[Math.floor(bytes.length / 3)]! ^ 0x04;
        await writeFile(path, bytes);
      }
    }

    const check = await runCli(['check', '--read-data'], env);
    assert.equal(check.code, 8, check.stderr);
    assert.match(check.stderr, /damages snapshot [0-9a-f]{8}/);

    const rows = await databaseFingerprint(f);
    const r = await runCli(['--project', f.project, 'restore', first.snapshot], env);
    assert.equal(r.code, 8, r.stderr);
    assert.match(r.stderr, new RegExp(`snapshot ${first.snapshot.slice(0, 8)} is damaged`));
    await allRunning();
    assert.equal(await databaseFingerprint(f), rows);
  });
});
