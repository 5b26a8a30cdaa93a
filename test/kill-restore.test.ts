/**
 * Restores killed with SIGKILL at random points. Whatever the moment, the next run of cvat-backup
 * (here: the nightly backup) leaves the deployment in one of two states, never a mix: the data
 * before the restore (the kill came before the restore was complete: the rollback points are put
 * back, and the run says so) or the restored snapshot (it was complete) — every volume and the
 * database alike, with CVAT running and no rollback folder left behind.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { snapshotTree, type TreeEntry } from './fixture/tree.js';
import { runCli, startCli } from './fixture/cli.js';

const KILLS = Number(process.env['CVAT_BACKUP_TEST_RESTORE_KILLS'] ?? 20);
const FILE_VOLUMES = ['cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];
const isRoot = process.getuid?.() === 0;

interface State {
  rows: string;
  trees: Record<string, Record<string, TreeEntry>>;
}

describe('restore killed with SIGKILL at random points', { skip: !isRoot && 'repository restores write volume folders: needs root' }, () => {
  let f: FixtureDeployment;
  let work: string;
  let env: NodeJS.ProcessEnv;
  const snapshots: { id: string; state: State }[] = [];

  const capture = async (): Promise<State> => {
    const trees: Record<string, Record<string, TreeEntry>> = {};
    for (const v of FILE_VOLUMES) trees[v] = await snapshotTree(await f.volumePath(v), { directoryTimes: true });
    return { rows: await databaseFingerprint(f), trees };
  };
  const allRunning = async (label: string): Promise<void> => {
    const states = await f.states();
    assert.equal(Object.keys(states).length, 9, label);
    assert.ok(Object.values(states).every((s) => s === 'running'), `${label}: ${JSON.stringify(states)}`);
  };
  const same = (a: State, b: State): boolean => {
    try {
      assert.deepEqual(a, b);
      return true;
    } catch {
      return false;
    }
  };

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'kr' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-killrestore-'));
    env = { CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'kill-restore-pw' };
    assert.equal((await runCli(['init'], env)).code, 0);
    // Two states that differ in every volume's data and in the database.
    const media = await f.volumePath('cvat_data');
    for (const [i, rows] of [[1, 100], [2, 300]] as const) {
      await writeFile(join(media, 'data/1/raw/video.mp4'), randomBytes(120_000_000));
      await writeFile(join(await f.volumePath('cvat_logs'), `state-${i}.log`), `state ${i}\n`);
      await f.psql(`INSERT INTO engine_task (name) SELECT 'state ${i} task ' || g FROM generate_series(1, ${rows}) g;`);
      const b = await runCli(['--project', f.project, '--json', 'backup'], env);
      assert.equal(b.code, 0, b.stderr);
      snapshots.push({ id: (JSON.parse(b.stdout) as { snapshot: string }).snapshot, state: await capture() });
    }
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it(`${KILLS} kills: the next run puts back the previous data or keeps the complete restore, CVAT runs, nothing is lost`, async () => {
    // How long a whole restore takes: kills land uniformly over it.
    const began = Date.now();
    const whole = await runCli(['--project', f.project, 'restore', snapshots[0]!.id], env);
    assert.equal(whole.code, 0, whole.stderr);
    const span = Date.now() - began;
    await f.waitForDatabase();
    let current = snapshots[0]!.state;
    assert.ok(same(await capture(), current), 'a restore that is not killed restores the snapshot');
    let kills = 0;
    let rolledBack = 0;
    let completed = 0;
    for (let trial = 0; kills < KILLS && trial < KILLS * 3; trial++) {
      const target = snapshots[(trial + 1) % 2]!;
      const cli = startCli(['--project', f.project, 'restore', target.id], env);
      let exited = false;
      void cli.result.then(() => (exited = true));
      await new Promise((resolve) => setTimeout(resolve, Math.floor(Math.random() * span)));
      if (!exited) cli.kill('SIGKILL');
      const result = await cli.result;
      if (result.signal === 'SIGKILL') kills++;
      else assert.equal(result.code, 0, result.stderr);
      const label = `trial ${trial} (${result.signal ?? `exit ${result.code}`})`;
      // The next run: it recovers what the killed restore left, then backs up as every night.
      const next = await runCli(['--project', f.project, 'backup'], env);
      assert.equal(next.code, 0, `${label}: next run: ${next.stderr}`);
      await allRunning(label);
      await f.waitForDatabase();
      for (const v of FILE_VOLUMES) {
        const left = (await readdir(await f.volumePath(v))).filter((n) => n.startsWith('.cvat-backup-'));
        assert.deepEqual(left, [], `${label}: ${v} still holds ${left.join(', ')}`);
      }
      const now = await capture();
      if (same(now, target.state)) {
        completed++;
        current = target.state;
      } else {
        assert.ok(same(now, current), `${label}: the deployment holds neither the previous data nor the restored snapshot`);
        rolledBack++;
        // Once the volumes' data was being replaced (written in place, or the staged data moved in),
        // there was something to put back, and the next run says so.
        if (/^(restoring (?!while)|moving the restored data in)/m.test(result.stderr)) {
          assert.match(next.stderr, /put back|rolled back|previous data/i, `${label}: the next run says it put the previous data back`);
        }
      }
    }
    assert.equal(kills, KILLS, `${kills} kills in ${completed + rolledBack} trials`);
    assert.ok(rolledBack > 0, `some kills landed before the restore was complete (${rolledBack} rolled back, ${completed} complete)`);
    const check = await runCli(['check', '--read-data'], env);
    assert.equal(check.code, 0, check.stderr);
  });
});
