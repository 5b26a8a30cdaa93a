/**
 * Rollback points and the recovery after a killed restore, without an engine: temporary folders
 * stand in for the volumes, and the lock's marker container is a map. Every case runs twice: with
 * the helper scripts (run with this host's sh: an engine that runs helpers as local processes)
 * and with the same steps on this host through folder handles (the volume's folder on this host;
 * no helper may run). States a SIGKILL can leave are built as the steps leave them at that point.
 */
import { after, afterEach, before, describe, it } from 'node:test';
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
import { symlinkSync } from 'node:fs';
import {
  ROLLBACK_DIR,
  RETIRED_DIR,
  STAGED_DIR,
  commitVolume,
  prepareRollback,
  recoverKilledRestore,
  removeStaged,
  rollbackVolume,
  stageVolume,
  swapInStaged,
  type VolumeTarget,
} from './volume-rollback.js';

type Mode = 'helper' | 'host';

const isRoot = process.getuid?.() === 0;

interface FakeEngine {
  engine: DockerEngine;
  calls: string[];
  markers: Map<string, Record<string, string>>;
}

/** Helpers run as `sh -c script` here, the mount path mapped to a folder; markers live in a map. */
function fakeEngine(folders: Map<string, string>, mode: Mode): FakeEngine {
  const calls: string[] = [];
  const markers = new Map<string, Record<string, string>>();
  const engine = {
    local: mode === 'host',
    // Host mode: volume `p_NAME` is the folder of mount `/NAME`, local driver.
    inspectVolume: (name: string) => {
      const dir = folders.get(`/${name.replace(/^p_/, '')}`);
      return Promise.resolve(dir === undefined ? undefined : { name, driver: 'local', mountpoint: dir, labels: {} });
    },
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

for (const mode of ['helper', 'host'] as Mode[])
void describe(`rollback points and the recovery after a killed restore (${mode})`, { skip: !isRoot && 'owners are part of what comes back: needs root' }, () => {
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
    fake = fakeEngine(folders, mode);
    events = [];
    return dirs;
  };
  const target = (mount: string): VolumeTarget => ({
    composeName: mount.slice(1),
    containerId: `c-${mount}`,
    image: 'img',
    mountPath: mount,
    hostPath: mode === 'host' ? folders.get(mount) : undefined,
  });
  afterEach(() => {
    if (mode === 'host') assert.deepEqual(fake.calls.filter((c) => c.startsWith('helper')), [], 'no helper container on this host');
  });
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

void describe('staged restores on this host: written while CVAT runs, moved in while it is stopped', { skip: !isRoot && 'owners are part of what comes back: needs root' }, () => {
  let work: string;
  let folders: Map<string, string>;
  let fake: FakeEngine;
  let events: ProgressEvent[];
  const killed: KilledRestore = { id: `${hostname()}/4343/2026-01-01T00:00:00.000Z`, pid: '4343', started: '2026-01-01T00:00:00.000Z' };
  before(() => {
    work = mkdtempSync(join(tmpdir(), 'staged-'));
  });
  after(() => rmSync(work, { recursive: true, force: true }));
  const volume = (mount = '/v'): { dir: string; target: VolumeTarget } => {
    const dir = mkdtempSync(join(work, 'vol-'));
    oldData(dir);
    folders = new Map([[mount, dir]]);
    fake = fakeEngine(folders, 'host');
    events = [];
    return { dir, target: { composeName: mount.slice(1), containerId: `c-${mount}`, image: 'img', mountPath: mount, hostPath: dir } };
  };
  /** What the staged writer leaves: new entries in the staged folder, whose own mode stays 0700. */
  const stage = async (dir: string): Promise<string> => {
    const staged = await stageVolume(dir);
    assert.equal(staged, join(dir, STAGED_DIR));
    const st = statSync(staged);
    assert.equal(`${st.uid}:${st.gid} ${(st.mode & 0o7777).toString(8)}`, '0:0 700', 'CVAT users cannot reach the staged data');
    writeFileSync(join(staged, 'a.txt'), 'NEW a');
    mkdirSync(join(staged, 'sub2'));
    writeFileSync(join(staged, 'sub2', 'c.txt'), 'NEW c');
    chownSync(join(staged, 'sub2'), 1000, 1001);
    return staged;
  };
  const expected = (meta: string): Record<string, string> => ({ '.': meta, 'a.txt': 'NEW a 0:0 644', sub2: 'dir 1000:1001 755', 'sub2/c.txt': 'NEW c 0:0 644' });
  const withoutOurs = (c: Record<string, string>): Record<string, string> => Object.fromEntries(Object.entries(c).filter(([k]) => !k.startsWith('.cvat-backup-')));
  const recover = (): Promise<void> => recoverKilledRestore(fake.engine, deploymentOf(['/v']), killed, (e) => events.push(e));

  it('stage, make the rollback point, move in, commit: the new entries and the root owner and mode, the old data retired', async () => {
    const { dir, target } = volume();
    await stage(dir);
    await prepareRollback(fake.engine, target);
    assert.deepEqual(readdirSync(dir).sort(), [ROLLBACK_DIR, STAGED_DIR].sort(), 'the staged folder is not taken into the rollback point');
    await swapInStaged(dir, { uid: 1000, gid: 1000, mode: 0o751, mtime: 1_700_000_000 });
    await commitVolume(fake.engine, target, 'me/1/now');
    assert.deepEqual(withoutOurs(contents(dir)), expected('1000:1000 751'));
    assert.deepEqual(readdirSync(dir).filter((n) => n.startsWith('.cvat-backup-')), [RETIRED_DIR]);
    assert.equal(readFileSync(join(dir, RETIRED_DIR, 'a.txt'), 'utf8'), 'old a', 'the old data waits in the retired folder');
    assert.deepEqual(fake.calls, []);
  });

  it('killed while staging (CVAT never stopped): the next run deletes the staged data, the volume is as it was, nothing said', async () => {
    const { dir } = volume();
    const before = contents(dir);
    await stage(dir);
    await recover();
    assert.deepEqual(contents(dir), before);
    assert.deepEqual(
      events.filter((e) => e.type === 'warning'),
      [],
    );
  });

  it('killed while moving the staged data in: the next run deletes it and puts the old data back', async () => {
    const { dir, target } = volume();
    const before = contents(dir);
    const staged = await stage(dir);
    await prepareRollback(fake.engine, target);
    renameSync(join(staged, 'a.txt'), join(dir, 'a.txt')); // the first rename of swapInStaged
    chmodSync(dir, 0o755);
    await recover();
    assert.deepEqual(contents(dir), before);
    assert.match(events.map((e) => (e.type === 'warning' ? e.message : '')).join('\n'), /previous data of v was put back/);
  });

  it('a failure after staging deletes the staged data only (removeStaged), and a failure in the downtime rolls back staged and old alike', async () => {
    const { dir, target } = volume();
    const before = contents(dir);
    await stage(dir);
    await removeStaged(dir);
    assert.deepEqual(contents(dir), before);
    await stage(dir);
    await prepareRollback(fake.engine, target);
    await rollbackVolume(fake.engine, target);
    assert.deepEqual(contents(dir), before);
  });

  it('hostile volume content: a link planted as the staged folder is replaced, never followed; a staged folder swapped for a link fails the move and nothing outside changes', async () => {
    const { dir, target } = volume();
    const outside = mkdtempSync(join(work, 'outside-'));
    writeFileSync(join(outside, 'keep.txt'), 'outside');
    symlinkSync(outside, join(dir, STAGED_DIR));
    await stage(dir);
    assert.deepEqual(readdirSync(outside), ['keep.txt'], 'nothing written through the planted link');
    await prepareRollback(fake.engine, target);
    rmSync(join(dir, STAGED_DIR), { recursive: true });
    symlinkSync(outside, join(dir, STAGED_DIR));
    await assert.rejects(swapInStaged(dir, { uid: 0, gid: 0, mode: 0o755, mtime: undefined }), (error: NodeJS.ErrnoException) => ['ELOOP', 'ENOTDIR'].includes(error.code ?? ''));
    assert.deepEqual(readdirSync(outside), ['keep.txt']);
    assert.equal(readFileSync(join(outside, 'keep.txt'), 'utf8'), 'outside');
    // A name of ours inside the staged data is never moved over the rollback point.
    rmSync(join(dir, STAGED_DIR));
    await stage(dir);
    mkdirSync(join(dir, STAGED_DIR, ROLLBACK_DIR));
    await swapInStaged(dir, { uid: 0, gid: 0, mode: 0o755, mtime: undefined });
    assert.equal(readFileSync(join(dir, ROLLBACK_DIR, 'a.txt'), 'utf8'), 'old a', 'the rollback point is intact');
    assert.ok(!existsSync(join(dir, STAGED_DIR)));
  });
});
