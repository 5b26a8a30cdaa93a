/**
 * A two-phase (and a freeze) backup of a real CVAT-shaped deployment into a repository on a slow
 * remote (a folder behind up to 60 ms of latency per request, every request counted), through the local
 * cache: from the moment phase 2 begins until CVAT runs again (the end of the final pass), not one
 * request reaches the remote; what the final pass wrote is uploaded after, and the snapshot,
 * read straight from the remote without any cache, passes `check --read-data` and restores every
 * volume byte for byte (owners, modes, times, links) as it was while CVAT was held.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { mkdirSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, type FixtureDeployment } from './fixture/deployment.js';
import { run } from './fixture/engine.js';
import { snapshotTree, type TreeEntry } from './fixture/tree.js';
import { createDockerEngine } from '../src/docker/engine.js';
import { cacheFolderFor, withCache } from '../src/backend/cache.js';
import { FaultyBackend, type BackendMethod } from '../src/backend/faulty.js';
import { LocalBackend } from '../src/backend/local.js';
import { Repository } from '../src/repository/repository.js';
import { checkRepository } from '../src/repository/check.js';
import { restoreVolumeToFolder } from '../src/repository/folder-restore.js';
import { backupToRepository, type RepositoryBackupResult } from '../src/backup/repository-backup.js';
import type { ProgressEvent } from '../src/events.js';

const isRoot = process.getuid?.() === 0;
const METHODS: BackendMethod[] = ['exists', 'create', 'save', 'load', 'list', 'stat', 'remove', 'listTemporary', 'removeTemporary'];
const KDF = { algorithm: 'scrypt' as const, N: 1024, r: 8, p: 1 };

describe('backup to a slow remote: the downtime never waits on the network', { skip: !isRoot && 'reads volume folders: needs root' }, () => {
  let f: FixtureDeployment;
  let work: string;
  const engine = createDockerEngine();

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'rd' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-remote-'));
    const media = join(await f.volumePath('cvat_data'), 'data', 'bulk');
    await run('sh', ['-c', `mkdir -p ${media} && for i in $(seq 1 40); do head -c 500000 /dev/urandom > ${media}/$i.jpg; done; chown -R 1000:1000 ${media}`]);
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('two-phase, then freeze: no request during the final pass; uploaded after; check --read-data clean and a byte-exact restore from the remote', async (t) => {
    const remoteDir = join(work, 'remote');
    const counted = new FaultyBackend(new LocalBackend(remoteDir), { random: { seed: 1, probability: {}, latencyMs: 60 } });
    const requests = (): number => METHODS.reduce((n, m) => n + counted.count(m), 0);
    const cacheRoot = join(work, 'cache');
    const repo = await Repository.init(await withCache(counted, { dir: cacheRoot }), 'pw', { kdf: KDF });

    const backup = async (mode: 'two-phase' | 'freeze'): Promise<{ result: RepositoryBackupResult; duringFinal: number; held: Map<string, Record<string, TreeEntry>>; events: ProgressEvent[] }> => {
      const events: ProgressEvent[] = [];
      let atPhase2: number | undefined;
      let atHeld: number | undefined;
      const held = new Map<string, Record<string, TreeEntry>>();
      // Files change while phase 1 runs, so the final pass has something to write.
      const server = await f.container('cvat_server');
      const result = await backupToRepository(engine, repo, {
        project: f.project,
        mode,
        onProgress: (e) => {
          events.push(e);
          if (e.type === 'phase' && e.message.startsWith('phase 1')) void run('docker', ['exec', server, 'sh', '-c', `head -c 300000 /dev/urandom > /home/django/data/data/during-${mode}.bin`]);
          if (e.type === 'phase' && e.message.startsWith('phase 2')) atPhase2 = requests();
        },
        whileHeld: async () => {
          atHeld = requests();
          for (const v of ['cvat_data', 'cvat_db', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db']) held.set(v, await snapshotTree(await f.volumePath(v)));
        },
      });
      assert.ok(atPhase2 !== undefined && atHeld !== undefined);
      return { result, duringFinal: atHeld - atPhase2, held, events };
    };

    const first = await backup('two-phase');
    assert.equal(first.result.mode, 'two-phase');
    assert.equal(first.duringFinal, 0, 'no request reached the remote from phase 2 on until CVAT ran again');
    const upload = first.events.find((e) => e.type === 'phase' && e.message.startsWith('uploading'));
    assert.ok(upload, 'the upload after the downtime is reported');
    t.diagnostic(`two-phase: ${JSON.stringify(upload)}; downtime ${first.result.snapshot.downtimeMs} ms`);
    const phases = first.events.filter((e) => e.type === 'phase').map((e) => (e as { message: string }).message);
    assert.ok(phases.findIndex((m) => m.startsWith('uploading')) > phases.findIndex((m) => m.startsWith('phase 2')));
    assert.ok(first.events.findIndex((e) => e.type === 'container-started') < first.events.indexOf(upload), 'uploaded once CVAT runs again');

    const second = await backup('freeze');
    assert.equal(second.result.mode, 'freeze');
    assert.equal(second.duringFinal, 0, 'freeze: no request either');

    // Straight from the remote folder, no cache, no latency: what a restore on another machine sees.
    const plain = await Repository.open(new LocalBackend(remoteDir), 'pw');
    const check = await checkRepository(plain, { readData: true });
    assert.deepEqual(check.errors, []);
    assert.equal(check.snapshots, 2);
    assert.deepEqual(check.unindexed, [], 'every uploaded pack is indexed');
    await plain.loadIndex();
    for (const [run, snapshot] of [
      [first, first.result.snapshot],
      [second, second.result.snapshot],
    ] as const) {
      for (const volume of snapshot.volumes) {
        const target = join(work, 'restored', snapshot.id.slice(0, 8), volume.composeName);
        mkdirSync(target, { recursive: true });
        await restoreVolumeToFolder(plain, volume, target);
        assert.deepEqual(await snapshotTree(target), run.held.get(volume.composeName), `${snapshot.id.slice(0, 8)} ${volume.composeName}: restored as it was while CVAT was held`);
      }
    }
    assert.deepEqual(readdirSync(join(cacheFolderFor(cacheRoot, remoteDir), 'spool')), [], 'nothing left in the spool');
    const states = await f.states();
    assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
  });
});
