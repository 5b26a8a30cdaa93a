/**
 * A repository on a slow remote through its local cache (backend/cache.ts): damaged cached copies
 * never break a read, and a two-phase backup's final pass (the archiver over a folder, as
 * backup/repository-backup.ts runs it while CVAT is held) makes no request to the remote at all;
 * what it wrote is uploaded afterwards, packs before index, and the snapshot restores byte for
 * byte and passes `check --read-data` read straight from the remote.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { appendFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cacheFolderFor, withCache, type CachedBackend } from '../backend/cache.js';
import { FaultyBackend, type BackendMethod } from '../backend/faulty.js';
import { MemoryBackend } from '../backend/memory.js';
import { Archiver } from './archiver.js';
import { checkRepository } from './check.js';
import { restoreVolumeToFolder } from './folder-restore.js';
import type { Repository } from './repository.js';
import { initTestRepository, openTestRepository, prngBytes, readSnapshotFiles, writeSnapshot } from './testing.js';
import type { Snapshot, SnapshotVolume } from './tree.js';

const METHODS: BackendMethod[] = ['exists', 'create', 'save', 'load', 'list', 'stat', 'remove', 'listTemporary', 'removeTemporary'];
const LOCATION = 's3:http://127.0.0.1:9000/bucket/repo';

interface Remote {
  inner: MemoryBackend;
  counted: FaultyBackend;
  requests: () => number;
}

/** A memory repository up to 10 ms away (every request waits), every request counted. */
function slowRemote(inner = new MemoryBackend({ location: LOCATION })): Remote {
  const counted = new FaultyBackend(inner, { random: { seed: 9, probability: {}, latencyMs: 10 } });
  return { inner, counted, requests: () => METHODS.reduce((n, m) => n + counted.count(m), 0) };
}

async function withWork(fn: (work: string) => Promise<void>): Promise<void> {
  const work = mkdtempSync(join(tmpdir(), 'remote-cache-'));
  try {
    await fn(work);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** Every file of the cache folder whose content the test damages. */
function cachedFiles(dir: string, kind: string): string[] {
  return readdirSync(join(dir, kind), { recursive: true, encoding: 'utf8' })
    .map((p) => join(dir, kind, p))
    .filter((p) => /[0-9a-f]{64}$/.test(p));
}

void describe('a repository through its local cache', () => {
  void it('damaged cached copies (index file, tree pack, snapshot) are dropped and read once from the remote: the snapshot reads back byte-exact', () =>
    withWork(async (work) => {
      const remote = slowRemote();
      const files = { 'a.bin': prngBytes(1, 300_000), 'b.txt': Buffer.from('hello\n') };
      const writer = await initTestRepository(await withCache(remote.counted, { dir: work }));
      const id = await writeSnapshot(writer, files);
      const dir = cacheFolderFor(work, LOCATION);
      const damaged = [...cachedFiles(dir, 'index'), ...cachedFiles(dir, 'data'), ...cachedFiles(dir, 'snapshots')];
      assert.equal(damaged.length, 3, 'index file, tree pack and snapshot were cached when written');
      for (const path of damaged) {
        const bytes = readFileSync(path);
        bytes[Math.floor(bytes.length / 2)]! ^= 0x01;
        writeFileSync(path, bytes);
      }
      const warnings: string[] = [];
      const loads = (): number[] => ['index', 'snapshots', 'data'].map((k) => remote.counted.count('load', k as 'data'));
      const [index0, snapshots0, data0] = loads();
      const reader = await openTestRepository(await withCache(remote.counted, { dir: work }), { onWarning: (m) => warnings.push(m) });
      assert.deepEqual(await readSnapshotFiles(reader, id), files);
      assert.equal(warnings.length, 3, warnings.join('\n'));
      assert.ok(warnings.every((w) => /cached copy .* damaged .* read from the repository/.test(w)));
      const [index1, snapshots1, data1] = loads();
      assert.deepEqual([index1! - index0!, snapshots1! - snapshots0!], [1, 1], 'the damaged index file and snapshot were read from the remote, once each');
      // Good copies replaced the damaged ones: the next reader reads only file data from the remote.
      const again = await openTestRepository(await withCache(remote.counted, { dir: work }));
      assert.deepEqual(await readSnapshotFiles(again, id), files);
      const [index2, snapshots2, data2] = loads();
      assert.deepEqual([index2! - index1!, snapshots2! - snapshots1!], [0, 0]);
      assert.equal(data1! - data0! - (data2! - data1!), 1, 'the first reader also fetched the tree pack again; the second read it from the cache');
    }));

  void it('a copy damaged the same way on the remote is reported, not hidden: the remote decides', () =>
    withWork(async (work) => {
      const remote = slowRemote();
      const repo = await initTestRepository(await withCache(remote.counted, { dir: work }));
      const id = await writeSnapshot(repo, { 'x.bin': prngBytes(2, 1000) });
      const [snapshot] = await remote.inner.list('snapshots');
      const bytes = Buffer.from(remote.inner.raw('snapshots', snapshot!.name)!);
      bytes[40]! ^= 0x01;
      remote.inner.replace('snapshots', snapshot!.name, bytes);
      const dir = cacheFolderFor(work, LOCATION);
      writeFileSync(cachedFiles(dir, 'snapshots')[0]!, bytes);
      const reader = await openTestRepository(await withCache(remote.counted, { dir: work }));
      await assert.rejects(reader.loadObject('snapshots', id), /damaged|does not match/);
    }));
});

/** A volume folder with some files (the "CVAT data" the backup copies). */
function makeVolume(dir: string): void {
  mkdirSync(join(dir, 'data', 'tasks', '1'), { recursive: true });
  mkdirSync(join(dir, 'keys'), { recursive: true });
  for (let i = 0; i < 40; i++) writeFileSync(join(dir, 'data', 'tasks', '1', `frame_${i}.jpg`), prngBytes(100 + i, 20_000 + i * 997));
  writeFileSync(join(dir, 'data', 'big.bin'), prngBytes(7, 3_000_000));
  writeFileSync(join(dir, 'keys', 'secret_key'), 'k'.repeat(50));
}

/** What changes while CVAT runs during phase 1. */
function changeVolume(dir: string): void {
  writeFileSync(join(dir, 'data', 'tasks', '1', 'frame_3.jpg'), prngBytes(999, 33_333));
  unlinkSync(join(dir, 'data', 'tasks', '1', 'frame_4.jpg'));
  appendFileSync(join(dir, 'keys', 'secret_key'), 'more');
  mkdirSync(join(dir, 'data', 'tasks', '2'));
  for (let i = 0; i < 5; i++) writeFileSync(join(dir, 'data', 'tasks', '2', `new_${i}.jpg`), prngBytes(500 + i, 40_000));
}

/** Every file under `dir`, relative path → bytes. */
function contents(dir: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const p of readdirSync(dir, { recursive: true, encoding: 'utf8' }).sort()) {
    try {
      out.set(p, readFileSync(join(dir, p)));
    } catch {
      // a folder
    }
  }
  return out;
}

/**
 * Phase 1 (running), then phase 2 as the backup runs it: `beforeFinal` starts the deferral, the
 * final pass compares with phase 1's tree, `afterFinal` uploads. Returns the snapshot's volume and
 * the remote requests the final pass made.
 */
async function twoPhase(
  repo: Repository,
  remote: Remote,
  volume: string,
  hooks: { beforeFinal?: () => Promise<void>; afterFinal?: () => Promise<void> } = {},
): Promise<{ volume: SnapshotVolume; finalRequests: number; snapshotId: string }> {
  const lock = await repo.lock('backup');
  try {
    await repo.loadIndex();
    // As the backup does: a file touched from phase 1's start on is read again in phase 2.
    await new Promise((resolve) => setTimeout(resolve, 50));
    const since = BigInt(Date.now()) * 1_000_000n;
    const precopy = await new Archiver(repo, { tolerateChanges: true }).archive(volume, undefined);
    await repo.flushPacksOnly();
    changeVolume(volume);
    await hooks.beforeFinal?.();
    const before = remote.requests();
    const archiver = new Archiver(repo, { racySinceNs: since });
    const final = await archiver.archive(volume, precopy.tree);
    const finalRequests = remote.requests() - before;
    assert.ok(archiver.stats.filesUnchanged > 30, `the final pass compared with phase 1's trees (${archiver.stats.filesUnchanged} unchanged)`);
    await hooks.afterFinal?.();
    await repo.flush();
    const snapshotVolume: SnapshotVolume = {
      composeName: 'cvat_data',
      name: 'p_cvat_data',
      role: 'media',
      mountPath: '/home/django/data',
      tree: final.tree,
      root: final.root,
      entries: archiver.stats.entries + 1,
      files: archiver.stats.files,
      bytes: archiver.stats.bytes,
    };
    const snapshot: Snapshot = {
      version: 1,
      time: new Date().toISOString(),
      hostname: 'test',
      tool: 'test',
      project: 'p',
      cvat: { version: '2.73.0', versionSource: 'given', serverImage: null, serverImageDigest: null },
      downtimeMs: 0,
      durationMs: 0,
      volumes: [snapshotVolume],
      skipped: [],
    };
    const snapshotId = await repo.saveObject('snapshots', snapshot);
    return { volume: snapshotVolume, finalRequests, snapshotId };
  } finally {
    await lock.release();
  }
}

void describe('two-phase backup to a slow remote', () => {
  void it('the final pass makes no request to the remote; the upload after it sends packs before index; restored byte-exact, check --read-data clean from the remote', () =>
    withWork(async (work) => {
      const remote = slowRemote();
      const volume = join(work, 'volume');
      makeVolume(volume);
      const repo = await initTestRepository(await withCache(remote.counted, { dir: join(work, 'cache') }));
      const order: string[] = [];
      let summary: { packs: number; files: number; bytes: number } | undefined;
      let drain: (() => Promise<void>) | undefined;
      const { volume: snapshotVolume, finalRequests } = await twoPhase(repo, remote, volume, {
        beforeFinal: async () => {
          const deferral = await repo.deferUploads();
          assert.ok(deferral.active);
          // Uploaded after the pass (CVAT running again).
          const saves = remote.counted.count('save');
          drain = async () => {
            summary = await deferral.drain({ onUploaded: (f) => order.push(f.kind), onStart: (p) => (summary = p) });
            assert.equal(remote.counted.count('save') - saves, summary.files);
          };
        },
        afterFinal: () => drain!(),
      });
      assert.equal(finalRequests, 0, 'the final pass never reached the remote');
      assert.ok(summary && summary.packs >= 2 && summary.bytes > 100_000, JSON.stringify(summary));
      assert.deepEqual(order, [...order.filter((k) => k === 'data'), 'index'], `packs first, then the index: ${order.join(' ')}`);

      // Read straight from the remote (no cache), as check does.
      const plain = await openTestRepository(remote.inner);
      const check = await checkRepository(plain, { readData: true });
      assert.deepEqual(check.errors, []);
      assert.equal(check.unindexed.length, 0, 'every uploaded pack is indexed');
      const target = join(work, 'restored');
      mkdirSync(target);
      await plain.loadIndex();
      await restoreVolumeToFolder(plain, snapshotVolume, target);
      assert.deepEqual(contents(target), contents(volume), 'restored byte for byte');
      assert.deepEqual(readdirSync(join(cacheFolderFor(join(work, 'cache'), LOCATION), 'spool')), [], 'the spool is empty');
    }));

  void it('(control) without the cache the same final pass waits on the remote', () =>
    withWork(async (work) => {
      const remote = slowRemote();
      const volume = join(work, 'volume');
      makeVolume(volume);
      const repo = await initTestRepository(await withCache(remote.counted, { dir: join(work, 'cache'), disabled: true }));
      const { finalRequests } = await twoPhase(repo, remote, volume, {
        beforeFinal: async () => {
          assert.equal((await repo.deferUploads()).active, false, 'nothing to defer to');
        },
      });
      assert.ok(finalRequests > 0, `requests during the final pass: ${finalRequests}`);
    }));

  void it('a backup that fails during the downtime leaves the remote as it was and no spool; the repository forgets what only the spool held', () =>
    withWork(async (work) => {
      const remote = slowRemote();
      const volume = join(work, 'volume');
      makeVolume(volume);
      const cache = (await withCache(remote.counted, { dir: join(work, 'cache') })) as CachedBackend;
      const repo = await initTestRepository(cache);
      await repo.loadIndex();
      const precopy = await new Archiver(repo, { tolerateChanges: true }).archive(volume, undefined);
      await repo.flushPacksOnly();
      const remoteData = (await remote.inner.list('data')).map((f) => f.name).sort();
      const remoteIndex = (await remote.inner.list('index')).map((f) => f.name);
      changeVolume(volume);
      const deferral = await repo.deferUploads();
      const final = await new Archiver(repo).archive(volume, precopy.tree);
      await repo.flushPacksOnly();
      const fresh = final.tree;
      assert.ok(repo.has(fresh));
      await deferral.abandon(); // the final pass failed here
      assert.deepEqual((await remote.inner.list('data')).map((f) => f.name).sort(), remoteData, 'no pack of the downtime reached the remote');
      assert.deepEqual((await remote.inner.list('index')).map((f) => f.name), remoteIndex);
      assert.deepEqual(readdirSync(join(cache.dir, 'spool')), []);
      assert.equal(repo.has(fresh), false, 'blobs only the spool held are no longer known');
      // The next backup with the same repository object stores them again, on the remote.
      await repo.loadIndex();
      const again = await new Archiver(repo).archive(volume, undefined);
      await repo.flush();
      assert.equal(again.tree, fresh);
      const plain = await openTestRepository(remote.inner);
      await plain.loadIndex();
      assert.ok(plain.has(fresh));
      assert.deepEqual((await checkRepository(plain, { readData: true })).errors, []);
    }));
});
