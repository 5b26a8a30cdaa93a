/**
 * Rollback points and the recovery after a killed restore, without an engine: the helper scripts
 * run with this host's sh on temporary folders standing in for the volumes (an engine that runs
 * helpers as local processes), and the lock's marker container is a map. States a SIGKILL can
 * leave are built as the scripts leave them at that point.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { hostname } from 'node:os';
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DockerEngine, HelperSpec } from '../docker/engine.js';
import type { Deployment, DeploymentContainer } from '../deployment/discover.js';
import type { ProgressEvent } from '../events.js';
import { lockDeployment, type KilledRestore } from '../deployment/lock.js';
import { ROLLBACK_DIR, RETIRED_DIR, commitVolume, prepareRollback, recoverKilledRestore, rollbackVolume, type VolumeTarget } from './volume-rollback.js';

const isRoot = process.getuid?.() === 0;

interface FakeEngine {
  engine: DockerEngine;
  calls: string[];
  markers: Map<string, Record<string, string>>;
}

/** Helpers run as `sh -c script` here, the mount path mapped to a folder; markers live in a map. */
function fakeEngine(folders: Map<string, string>): FakeEngine {
  const calls: string[] = [];
  const markers = new Map<string, Record<string, string>>();
  const engine = {
    local: false,
    endpoint: 'fake',
    runHelper: (spec: HelperSpec) => {
      const [mount, ...rest] = spec.args;
      const dir = folders.get(mount ?? '');
      if (dir === undefined) throw new Error(`no folder for ${mount}`);
      calls.push(`helper ${mount}`);
      const r = spawnSync('sh', ['-c', spec.script, 'helper', dir, ...rest], { encoding: 'utf8' });
      return Promise.resolve({ exitCode: r.status ?? -1, stdout: r.stdout, stderr: r.stderr });
    },
    createMarker: (name: string, _image: string, labels: Record<string, string>) => {
      if (markers.has(name)) return Promise.resolve(false);
      markers.set(name, { ...labels });
      return Promise.resolve(true);
    },
    inspectMarker: (name: string) => Promise.resolve(markers.get(name)),
    removeContainer: (name: string) => {
      markers.delete(name);
      return Promise.resolve();
    },
    startContainer: (id: string) => {
      calls.push(`start ${id}`);
      return Promise.resolve();
    },
    unpauseContainer: () => Promise.resolve(false),
    listContainers: () => Promise.resolve([]),
  } as unknown as DockerEngine;
  return { engine, calls, markers };
}

/** Entry → content (files) or 'dir', with owner and mode: what must come back byte-exact. */
function contents(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (dir: string, rel: string): void => {
    for (const name of readdirSync(dir).sort()) {
      const path = join(dir, name);
      const st = statSync(path);
      const r = `${rel}${name}`;
      out[r] = `${st.isDirectory() ? 'dir' : readFileSync(path, 'utf8')} ${st.uid}:${st.gid} ${(st.mode & 0o7777).toString(8)}`;
      if (st.isDirectory()) walk(path, `${r}/`);
    }
  };
  const st = statSync(root);
  out['.'] = `${st.uid}:${st.gid} ${(st.mode & 0o7777).toString(8)}`;
  walk(root, '');
  return out;
}

function oldData(dir: string): void {
  writeFileSync(join(dir, 'a.txt'), 'old a');
  writeFileSync(join(dir, '.hidden'), 'old hidden');
  writeFileSync(join(dir, '..dots'), 'old dots');
  // A user's file with the name earlier versions gave the saved root owner and mode.
  writeFileSync(join(dir, '.root-owner-mode'), 'users own file');
  mkdirSync(join(dir, 'sub'));
  writeFileSync(join(dir, 'sub', 'b.txt'), 'old b');
  chownSync(join(dir, 'sub'), 1000, 1001);
  chownSync(dir, 70, 70);
  chmodSync(dir, 0o700);
}

function newData(dir: string): void {
  writeFileSync(join(dir, 'a.txt'), 'NEW a');
  writeFileSync(join(dir, 'new.txt'), 'NEW');
  chmodSync(dir, 0o755);
}

const target = (mount: string): VolumeTarget => ({ composeName: mount.slice(1), containerId: `c-${mount}`, image: 'img', mountPath: mount });

function deploymentOf(mounts: string[]): Deployment {
  const containers: DeploymentContainer[] = [{ id: 'c-db', name: 'db', service: 'cvat_db', state: 'exited', image: 'img', imageId: 'sha', dependsOn: undefined }];
  return {
    project: 'p',
    containers,
    binds: [],
    version: { version: '2.73.0', source: 'image-tag', serverImage: 'img', serverImageDigest: undefined },
    volumes: mounts.map((m) => ({
      composeName: m.slice(1),
      name: `p_${m.slice(1)}`,
      role: 'media',
      description: '',
      mountPath: m,
      container: { ...containers[0]!, id: `c-${m}` },
      mountedBy: ['cvat_db'],
      backedUpByDefault: true,
    })),
  } as unknown as Deployment;
}

void describe('rollback points and the recovery after a killed restore', { skip: !isRoot && 'owners are part of what comes back: needs root' }, () => {
  let work: string;
  let folders: Map<string, string>;
  let fake: FakeEngine;
  let events: ProgressEvent[];
  const killed: KilledRestore = { id: `${hostname()}/4242/2026-01-01T00:00:00.000Z`, pid: '4242', started: '2026-01-01T00:00:00.000Z' };

  before(() => {
    work = mkdtempSync(join(tmpdir(), 'rollback-'));
  });
  after(() => rmSync(work, { recursive: true, force: true }));

  const volumes = (...mounts: string[]): string[] => {
    folders = new Map();
    const dirs: string[] = [];
    for (const m of mounts) {
      const dir = mkdtempSync(join(work, 'vol-'));
      oldData(dir);
      folders.set(m, dir);
      dirs.push(dir);
    }
    fake = fakeEngine(folders);
    events = [];
    return dirs;
  };
  const recover = (mounts: string[]): Promise<void> => recoverKilledRestore(fake.engine, deploymentOf(mounts), killed, (e) => events.push(e));
  const warnings = (): string[] => events.flatMap((e) => (e.type === 'warning' ? [e.message] : []));

  it('prepare then roll back gives back every entry, the root owner and mode, and a file named like the old meta file', async () => {
    const [dir] = volumes('/v');
    const before = contents(dir!);
    await prepareRollback(fake.engine, target('/v'));
    assert.deepEqual(readdirSync(dir!), [ROLLBACK_DIR]);
    newData(dir!);
    await rollbackVolume(fake.engine, target('/v'));
    assert.deepEqual(contents(dir!), before);
  });

  it('killed while moving the old data aside: the next run moves it back', async () => {
    const [dir] = volumes('/v');
    const before = contents(dir!);
    // PREPARE's state after moving two of the entries into the temporary rollback folder.
    mkdirSync(join(dir!, `${ROLLBACK_DIR}.tmp`), { mode: 0o700 });
    writeFileSync(join(dir!, `${ROLLBACK_DIR}.tmp`, '.cvat-backup-root'), '70:70 700\n');
    renameSync(join(dir!, 'a.txt'), join(dir!, `${ROLLBACK_DIR}.tmp`, 'a.txt'));
    renameSync(join(dir!, 'sub'), join(dir!, `${ROLLBACK_DIR}.tmp`, 'sub'));
    chmodSync(dir!, 0o755);
    await recover(['/v']);
    assert.deepEqual(contents(dir!), before);
    assert.match(warnings().join('\n'), /restore killed earlier \(pid 4242.*previous data of v was put back/);
  });

  it('killed while writing: the half-restored data goes, the previous data comes back, and the run says so', async () => {
    const [one, two] = volumes('/one', '/two');
    const before = [contents(one!), contents(two!)];
    await prepareRollback(fake.engine, target('/one'));
    await prepareRollback(fake.engine, target('/two'));
    newData(one!); // two was not reached
    await recover(['/one', '/two']);
    assert.deepEqual([contents(one!), contents(two!)], before);
    assert.equal(warnings().length, 1);
    assert.match(warnings()[0]!, /left volumes half restored: the previous data of one, two was put back/);
  });

  it('killed while committing: every volume was written, so the others are committed too (never a mix of old and new)', async () => {
    const [one, two] = volumes('/one', '/two');
    await prepareRollback(fake.engine, target('/one'));
    await prepareRollback(fake.engine, target('/two'));
    newData(one!);
    newData(two!);
    const withoutRollback = (c: Record<string, string>): Record<string, string> => Object.fromEntries(Object.entries(c).filter(([k]) => !k.startsWith('.cvat-backup-')));
    const restored = [withoutRollback(contents(one!)), withoutRollback(contents(two!))];
    await commitVolume(fake.engine, target('/one'), killed.id);
    assert.ok(existsSync(join(one!, RETIRED_DIR)));
    await recover(['/one', '/two']);
    assert.deepEqual([contents(one!), contents(two!)], restored, 'the restored data stays, without rollback or retired folders');
    assert.match(warnings()[0]!, /had written every volume and was committing: kept the restored data of two/);
  });

  it('a retired folder of an earlier restore does not count as committed: the killed one is rolled back', async () => {
    const [one, two] = volumes('/one', '/two');
    const before = contents(two!);
    await prepareRollback(fake.engine, target('/one'));
    await commitVolume(fake.engine, target('/one'), 'other-host/1/2025-01-01T00:00:00.000Z');
    await prepareRollback(fake.engine, target('/two'));
    newData(two!);
    await recover(['/one', '/two']);
    assert.deepEqual(contents(two!), before);
    assert.ok(!existsSync(join(one!, RETIRED_DIR)), 'the old retired folder is deleted');
  });

  it('nothing to recover: nothing said, nothing changed', async () => {
    const [dir] = volumes('/v');
    const before = contents(dir!);
    await recover(['/v']);
    assert.deepEqual(contents(dir!), before);
    assert.deepEqual(warnings(), []);
  });

  it("lockDeployment: a dead restore's volumes are put right before its stopped containers start; a failure keeps the lock for the next run", async () => {
    const [dir] = volumes('/v');
    const before = contents(dir!);
    await prepareRollback(fake.engine, target('/v'));
    newData(dir!);
    const gone = spawn('true');
    await once(gone, 'exit');
    const deadLabels = (operation: string, extra: Record<string, string> = {}): Record<string, string> => ({
      'io.cvat-backup.lock': 'p',
      'io.cvat-backup.pid': String(gone.pid),
      'io.cvat-backup.host': hostname(),
      'io.cvat-backup.operation': operation,
      'io.cvat-backup.started': '2026-01-01T00:00:00.000Z',
      'io.cvat-backup.running': 'c-db',
      ...extra,
    });
    const deployment = deploymentOf(['/v']);
    // A failing recovery: no container is started, and the marker stays with the work left to do.
    fake.markers.set('cvat-backup-lock-p', deadLabels('restore'));
    await assert.rejects(
      lockDeployment(fake.engine, deployment, 'backup', () => undefined, () => Promise.resolve(deployment), () => Promise.reject(new Error('helper failed'))),
      /helper failed/,
    );
    assert.ok(!fake.calls.some((c) => c.startsWith('start')), 'CVAT is not started on half-restored volumes');
    const kept = fake.markers.get('cvat-backup-lock-p');
    assert.equal(kept?.['io.cvat-backup.pending-restore'], `${hostname()}/${gone.pid}/2026-01-01T00:00:00.000Z`);
    assert.equal(kept?.['io.cvat-backup.running'], 'c-db');
    // That run died too: the next one inherits the pending recovery, recovers, then starts CVAT.
    fake.markers.set('cvat-backup-lock-p', { ...kept, 'io.cvat-backup.pid': String(gone.pid), 'io.cvat-backup.operation': 'backup' });
    const order: string[] = [];
    const { lock } = await lockDeployment(fake.engine, deployment, 'backup', (e) => events.push(e), () => Promise.resolve(deployment), async (engine, d, k, onProgress) => {
      order.push(`recover ${k.pid}`);
      await recoverKilledRestore(engine, d, k, onProgress);
    });
    order.push(...fake.calls.filter((c) => c.startsWith('start')));
    assert.deepEqual(order, [`recover ${gone.pid}`, 'start c-db']);
    assert.deepEqual(contents(dir!), before);
    assert.match(warnings().join('\n'), /previous data of v was put back/);
    await lock.release();
  });
});
