/**
 * prune, check and repair index on the memory backend with an injected clock: the grace period,
 * --max-unused, separate tree and data packs, refusals on damage, header/index comparison, and
 * crashes at every write and delete of a prune.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { Backend, FileKind } from '../backend/backend.js';
import { ForwardingBackend } from '../backend/forwarding.js';
import { FaultyBackend, type BackendMethod } from '../backend/faulty.js';
import { MemoryBackend } from '../backend/memory.js';
import { ManualClock } from '../clock.js';
import { CorruptArchiveError } from '../errors.js';
import { checkRepository } from './check.js';
import { pruneRepository, type PruneOptions } from './prune.js';
import { repairIndex } from './repair.js';
import type { IndexFile, PackHeaderEntry, Repository } from './repository.js';
import { initTestRepository, openTestRepository, prngBytes, readSnapshotFiles, writeSnapshot } from './testing.js';

const HOUR = 3_600_000;

interface Fixture {
  clock: ManualClock;
  backend: MemoryBackend;
  repo: () => Promise<Repository>;
  prune: (options?: PruneOptions, backend?: Backend) => ReturnType<typeof pruneRepository>;
}

async function fixture(options: { modificationTimes?: boolean } = {}): Promise<Fixture> {
  const clock = new ManualClock();
  const backend = new MemoryBackend({ now: () => clock.now(), ...options });
  await initTestRepository(backend);
  const repo = (): Promise<Repository> => openTestRepository(backend);
  return {
    clock,
    backend,
    repo,
    prune: async (o = {}, b = backend) => pruneRepository(await openTestRepository(b), { clock, ...o }),
  };
}

/** Files of `n` blobs of `size` bytes each (one chunk per file). */
function files(prefix: string, seed: number, n: number, size = 20_000): Record<string, Buffer> {
  const out: Record<string, Buffer> = {};
  for (let i = 0; i < n; i++) out[`${prefix}${String(i).padStart(3, '0')}`] = prngBytes(seed * 1000 + i, size);
  return out;
}

async function packHeaders(f: Fixture): Promise<Map<string, PackHeaderEntry[]>> {
  const repo = await f.repo();
  const out = new Map<string, PackHeaderEntry[]>();
  for (const p of await f.backend.list('data')) out.set(p.name, await repo.readPackHeader(p.name));
  return out;
}

/** Every snapshot reads back byte for byte as written, and check finds nothing wrong. */
async function assertSound(f: Fixture, expected: Map<string, Record<string, Buffer>>, label = ''): Promise<void> {
  const repo = await f.repo();
  const check = await checkRepository(repo, { readData: true, clock: f.clock });
  assert.deepEqual(check.errors, [], `${label} check`);
  const present = new Set((await f.backend.list('snapshots')).map((s) => s.name));
  for (const [id, content] of expected) {
    if (!present.has(id)) continue;
    const got = await readSnapshotFiles(await f.repo(), id);
    assert.deepEqual(Object.keys(got).sort(), Object.keys(content).sort(), `${label} ${id.slice(0, 8)} names`);
    for (const [name, bytes] of Object.entries(content)) assert.ok(got[name]!.equals(bytes), `${label} ${id.slice(0, 8)} ${name}`);
  }
}

void describe('packs: one packer per blob type', () => {
  void it('tree blobs and data blobs never share a pack, also after a repack', async () => {
    const f = await fixture();
    const repo = await f.repo();
    const a = await writeSnapshot(repo, files('a', 1, 30));
    await writeSnapshot(repo, files('b', 2, 30));
    const typesOf = async (): Promise<string[]> => [...(await packHeaders(f)).values()].map((h) => [...new Set(h.map((e) => e.type))].join('+')).sort();
    const before = await typesOf();
    assert.ok(before.includes('tree') && before.includes('data'), before.join(' '));
    assert.ok(before.every((t) => t === 'tree' || t === 'data'), before.join(' '));
    await f.backend.remove('snapshots', a);
    await f.prune({ maxUnused: 0 });
    const after = await typesOf();
    assert.ok(after.every((t) => t === 'tree' || t === 'data'), after.join(' '));
  });
});

void describe('prune: grace period for what writers may still need', () => {
  void it('a pack no index names survives while younger than the grace period, and goes once older', async () => {
    const f = await fixture();
    const kept = await writeSnapshot(await f.repo(), files('k', 1, 5));
    // A backup killed after writing a pack, before its index: the pack is named by no index.
    const killed = await f.repo();
    await killed.loadIndex();
    await killed.saveBlob('data', prngBytes(77, 50_000));
    await killed.flushPacksOnly();
    const packs = async (): Promise<number> => (await f.backend.list('data')).length;
    const before = await packs();

    await f.clock.advance(23 * HOUR);
    const young = await f.prune();
    assert.equal(young.unindexedKept, 1);
    assert.equal(young.unindexedDeleted, 0);
    assert.equal(await packs(), before, 'kept at 23 h');

    await f.clock.advance(2 * HOUR);
    const old = await f.prune();
    assert.equal(old.unindexedDeleted, 1);
    assert.equal(await packs(), before - 1, 'deleted at 25 h');
    await assertSound(f, new Map([[kept, files('k', 1, 5)]]));
  });

  void it('a prune whose own clock runs a day ahead measures ages on the storage’s clock', async () => {
    const f = await fixture();
    const killed = await f.repo();
    await killed.saveBlob('data', prngBytes(76, 50_000));
    await killed.flushPacksOnly();
    await f.clock.advance(HOUR);
    const ahead = new ManualClock(f.clock.now() + 25 * HOUR);
    const repo = await openTestRepository(f.backend, { locks: { clock: ahead, hostname: 'fast-host', pid: 1 } });
    const lock = await repo.lock('prune');
    const result = await pruneRepository(repo, { clock: ahead });
    assert.equal(result.unindexedKept, 1, 'one hour old by the storage, whatever this host believes');
    await lock.release();
  });

  void it('the grace period is an option (--unused-grace)', async () => {
    const f = await fixture();
    const killed = await f.repo();
    await killed.saveBlob('data', prngBytes(78, 50_000));
    await killed.flushPacksOnly();
    await f.clock.advance(2 * HOUR);
    assert.equal((await f.prune({ graceMs: 3 * HOUR })).unindexedDeleted, 0);
    assert.equal((await f.prune({ graceMs: 1 * HOUR })).unindexedDeleted, 1);
  });

  void it('where the backend tells no modification time, prune remembers when it first saw a pack and decides on a later run', async () => {
    const f = await fixture({ modificationTimes: false });
    const kept = await writeSnapshot(await f.repo(), files('k', 1, 3));
    const killed = await f.repo();
    await killed.saveBlob('data', prngBytes(79, 50_000));
    await killed.flushPacksOnly();
    await f.clock.advance(100 * HOUR); // the pack is old, but nobody can tell yet
    assert.equal((await f.prune()).unindexedKept, 1, 'first sight: kept');
    assert.equal((await f.backend.list('state')).length, 1, 'remembered in a sealed state object');
    assert.doesNotMatch(f.backend.raw('state', (await f.backend.list('state'))[0]!.name)!.toString('latin1'), /[0-9a-f]{64}/, 'pack names sealed');
    await f.clock.advance(23 * HOUR);
    assert.equal((await f.prune()).unindexedKept, 1, '23 h after first sight: kept');
    await f.clock.advance(2 * HOUR);
    assert.equal((await f.prune()).unindexedDeleted, 1, '25 h after first sight: deleted');
    assert.equal((await f.backend.list('state')).length, 0, 'nothing left to remember');
    await assertSound(f, new Map([[kept, files('k', 1, 3)]]));
  });

  void it('an index file that appears after prune listed the index keeps its packs, however old they are', async () => {
    const f = await fixture();
    const kept = await writeSnapshot(await f.repo(), files('k', 1, 3));
    // A writer (its lock lost to a skewed clock) wrote a pack a day ago and indexes it only now.
    const writer = await f.repo();
    await writer.loadIndex();
    const late = await writer.saveBlob('data', prngBytes(80, 50_000));
    await writer.flushPacksOnly();
    await f.clock.advance(25 * HOUR);
    let hooked = false;
    const hooking = new HookedBackend(f.backend, async (method, kind) => {
      if (method === 'list' && kind === 'data' && !hooked) {
        hooked = true; // prune has loaded the index and is listing the packs
        await writer.flush();
      }
    });
    const result = await f.prune({}, hooking);
    assert.ok(hooked);
    assert.equal(result.unindexedDeleted, 0, 'prune planned to delete it, and kept it…');
    assert.equal(result.unindexedKept, 1);
    const reader = await f.repo();
    await reader.loadIndex();
    assert.equal((await reader.loadBlob(late.id)).length, 50_000, '…and kept it: the new index file names it');
    await assertSound(f, new Map([[kept, files('k', 1, 3)]]));
  });

  void it('temporary files of interrupted saves go after the grace period', async () => {
    const f = await fixture();
    f.backend.plantTemporary('data', 'ab/.tmp-1', 1000);
    await f.clock.advance(23 * HOUR);
    f.backend.plantTemporary('index', '.tmp-2', 10);
    await f.clock.advance(2 * HOUR);
    const result = await f.prune();
    assert.equal(result.temporaryDeleted, 1);
    assert.deepEqual((await f.backend.listTemporary()).map((t) => t.name), ['.tmp-2']);
  });
});

void describe('prune: --max-unused', () => {
  /** 10 data packs of 10 blobs; the second snapshot keeps k of each pack i's blobs (k = i). */
  const shaped = async (): Promise<{ f: Fixture; keep: string; all: string; kept: Record<string, Buffer> }> => {
    const f = await fixture();
    const repo = await f.repo();
    const everything = files('x', 5, 100);
    const all = await writeSnapshot(repo, everything, { flushEvery: 10 });
    const kept: Record<string, Buffer> = {};
    for (let pack = 0; pack < 10; pack++) for (let j = 0; j < pack; j++) kept[`x${String(pack * 10 + j).padStart(3, '0')}`] = everything[`x${String(pack * 10 + j).padStart(3, '0')}`]!;
    const keep = await writeSnapshot(repo, kept);
    return { f, keep, all, kept };
  };

  void it('wholly unused packs always go; nothing is repacked when unused data is allowed (unlimited)', async () => {
    const { f, keep, all, kept } = await shaped();
    await f.backend.remove('snapshots', all);
    const result = await f.prune({ maxUnused: 1 });
    assert.equal(result.packsRepacked, 0);
    assert.ok(result.packsDeleted >= 1, 'pack 0 (no blob kept) is deleted');
    assert.ok(result.unusedAfter > 0);
    await assertSound(f, new Map([[keep, kept]]));
  });

  void it('0 % repacks every partly used pack; the bytes freed are deleted minus written', async () => {
    const { f, keep, all, kept } = await shaped();
    await f.backend.remove('snapshots', all);
    const sizeBefore = (await f.backend.list('data')).reduce((n, p) => n + p.size, 0) + (await f.backend.list('index')).reduce((n, p) => n + p.size, 0);
    const result = await f.prune({ maxUnused: 0 });
    assert.equal(result.packsRepacked, 9);
    assert.equal(result.unusedAfter, 0);
    const sizeAfter = (await f.backend.list('data')).reduce((n, p) => n + p.size, 0) + (await f.backend.list('index')).reduce((n, p) => n + p.size, 0);
    assert.equal(result.bytesFreed, sizeBefore - sizeAfter, 'reported = really freed');
    assert.ok(result.bytesWritten > 0 && result.bytesDeleted > result.bytesWritten);
    await assertSound(f, new Map([[keep, kept]]));
  });

  void it('the default 5 % repacks the emptiest packs first, and only until the unused share is at most 5 %', async () => {
    const { f, keep, all, kept } = await shaped();
    const originals = new Set((await f.backend.list('data')).map((p) => p.name));
    await f.backend.remove('snapshots', all);
    // Unused blobs per pack: 10, 9, 8, …, 1 of 10 (pack 0 goes whole). Repacking the emptiest
    // first, the unused share falls 50 % → 44 → 38 → 32 → 25 → 18 → 12 → 6.3 → 2.2 %: eight packs
    // are repacked, and the fullest (9 of 10 blobs used) stays as it is.
    const dry = await f.prune({ maxUnused: 0.05, dryRun: true });
    assert.ok(dry.unusedBefore / dry.totalBefore > 0.4, `${dry.unusedBefore} / ${dry.totalBefore}`);
    assert.equal(dry.packsRepacked, 8);
    const result = await f.prune({ maxUnused: 0.05 });
    assert.equal(result.packsRepacked, 8);
    assert.ok(result.unusedAfter / result.totalAfter <= 0.05, `${result.unusedAfter} / ${result.totalAfter}`);
    const repo = await f.repo();
    await repo.loadIndex();
    const left = [...originals].filter((p) => [...repo.blobIds()].some(([, w]) => w.pack === p && w.type === 'data'));
    assert.equal(left.length, 1, 'one original data pack stays');
    const inLeft = [...repo.blobIds()].filter(([, w]) => w.pack === left[0]).length;
    assert.equal(inLeft, 10, 'the fullest: its 9 used blobs and 1 unused, untouched');
    await assertSound(f, new Map([[keep, kept]]));
    assert.equal((await f.prune({ maxUnused: 0.05 })).packsRepacked, 0, 'a second prune finds nothing to do');
  });
});

void describe('prune refuses before deleting anything', () => {
  const everything = async (b: MemoryBackend): Promise<string[]> =>
    (await Promise.all((['data', 'index', 'snapshots'] as FileKind[]).map(async (k) => (await b.list(k)).map((f) => `${k}/${f.name}`)))).flat().sort();

  void it('when a blob a snapshot needs is in no index, and says to run repair index', async () => {
    const f = await fixture();
    const repo = await f.repo();
    const a = await writeSnapshot(repo, files('a', 1, 5));
    const b = await writeSnapshot(repo, files('b', 2, 5));
    // The index file naming b's blobs is lost; b's packs are still there.
    const indexFiles = (await f.backend.list('index')).sort((x, y) => (x.modifiedMs ?? 0) - (y.modifiedMs ?? 0));
    await f.backend.remove('index', indexFiles[indexFiles.length - 1]!.name);
    await f.clock.advance(48 * HOUR); // b's packs look like a killed backup's, and old
    const before = await everything(f.backend);
    await assert.rejects(f.prune(), (e: unknown) => e instanceof CorruptArchiveError && /in no index/.test(e.message) && /repair index/.test(e.message));
    assert.deepEqual(await everything(f.backend), before, 'nothing deleted');
    // repair index rebuilds it from the packs' headers; then prune runs and both snapshots restore.
    const r = await repairIndex(await f.repo());
    assert.equal(r.damagedPacks.length, 0);
    await f.prune();
    await assertSound(
      f,
      new Map([
        [a, files('a', 1, 5)],
        [b, files('b', 2, 5)],
      ]),
    );
  });

  void it('when a snapshot is damaged', async () => {
    const f = await fixture();
    const repo = await f.repo();
    await writeSnapshot(repo, files('a', 1, 5));
    const b = await writeSnapshot(repo, files('b', 2, 5));
    const bytes = Buffer.from(f.backend.raw('snapshots', b)!);
    bytes[bytes.length - 3]! ^= 0x10;
    f.backend.replace('snapshots', b, bytes);
    await f.clock.advance(48 * HOUR);
    const before = await everything(f.backend);
    await assert.rejects(f.prune(), (e: unknown) => e instanceof CorruptArchiveError && /snapshot [0-9a-f]{8} is damaged/.test(e.message) && /stopped before deleting anything/.test(e.message));
    assert.deepEqual(await everything(f.backend), before, 'nothing deleted');
  });

  void it('when a pack a snapshot needs is missing', async () => {
    const f = await fixture();
    const repo = await f.repo();
    await writeSnapshot(repo, files('a', 1, 5));
    const dataPack = [...(await packHeaders(f))].find(([, h]) => h[0]!.type === 'data')![0];
    await f.backend.remove('data', dataPack);
    const before = await everything(f.backend);
    await assert.rejects(f.prune(), /missing or truncated.*stopped|stopped before deleting anything/);
    assert.deepEqual(await everything(f.backend), before);
  });
});

void describe('check compares every pack header with the index', () => {
  const rewriteIndex = async (f: Fixture, change: (packs: IndexFile['packs']) => void): Promise<void> => {
    const repo = await f.repo();
    for (const { name } of await f.backend.list('index')) {
      const file = await repo.readIndexFile(name);
      change(file.packs);
      await repo.saveObject('index', file);
      await f.backend.remove('index', name);
    }
  };

  void it('a blob at another offset in the index than in its pack is an error', async () => {
    const f = await fixture();
    await writeSnapshot(await f.repo(), files('a', 1, 5));
    assert.deepEqual((await checkRepository(await f.repo())).errors, []);
    await rewriteIndex(f, (packs) => {
      const p = packs.find((x) => x.blobs.length > 2 && x.blobs[0]!.type === 'data')!;
      [p.blobs[1]!.offset, p.blobs[2]!.offset] = [p.blobs[2]!.offset, p.blobs[1]!.offset];
    });
    const errors = (await checkRepository(await f.repo())).errors;
    assert.ok(errors.some((e) => /header and the index differ \(2 blob entries only in the index, 2 only in the header/.test(e)), errors.join('\n'));
  });

  void it('a blob of the header that the index leaves out is an error', async () => {
    const f = await fixture();
    await writeSnapshot(await f.repo(), files('a', 1, 5));
    await rewriteIndex(f, (packs) => {
      const p = packs.find((x) => x.blobs[0]!.type === 'data')!;
      p.blobs.pop();
    });
    const errors = (await checkRepository(await f.repo())).errors;
    assert.ok(errors.some((e) => /0 blob entries only in the index, 1 only in the header/.test(e)), errors.join('\n'));
  });

  void it('packs no index names are listed as information with their age, not as errors', async () => {
    const f = await fixture();
    await writeSnapshot(await f.repo(), files('a', 1, 2));
    const killed = await f.repo();
    await killed.saveBlob('data', prngBytes(9, 1000));
    await killed.flushPacksOnly();
    await f.clock.advance(HOUR);
    const result = await checkRepository(await f.repo(), { clock: f.clock });
    assert.deepEqual(result.errors, []);
    assert.equal(result.unindexed.length, 1);
    assert.equal(result.unindexed[0]!.ageMs, HOUR);
  });
});

void describe('repair index', () => {
  void it('rebuilds a deleted index from the packs, writing the new index before deleting the old', async () => {
    const f = await fixture();
    const repo = await f.repo();
    const a = await writeSnapshot(repo, files('a', 1, 20));
    const b = await writeSnapshot(repo, files('b', 2, 20));
    const stale = (await f.backend.list('index'))[0]!.name;
    for (const { name } of await f.backend.list('index')) if (name !== stale) await f.backend.remove('index', name);
    assert.ok((await checkRepository(await f.repo())).errors.length > 0, 'check sees the loss');
    // Killed before deleting the old index: the new is written already (the old one stays, still true).
    const dying = new FaultyBackend(f.backend, { rules: [{ method: 'remove', kind: 'index', nth: [1], die: true }] });
    await assert.rejects(repairIndex(await openTestRepository(dying)), /injected fault/);
    assert.equal((await f.backend.list('index')).length, 2);
    const result = await repairIndex(await f.repo());
    assert.equal(result.indexFilesRemoved, 2);
    assert.equal((await f.backend.list('index')).length, 1);
    await assertSound(
      f,
      new Map([
        [a, files('a', 1, 20)],
        [b, files('b', 2, 20)],
      ]),
    );
  });

  void it('keeps the old index entries of a pack whose header is damaged', async () => {
    const f = await fixture();
    const a = await writeSnapshot(await f.repo(), files('a', 1, 4));
    const dataPack = [...(await packHeaders(f))].find(([, h]) => h[0]!.type === 'data')![0];
    const bytes = Buffer.from(f.backend.raw('data', dataPack)!);
    bytes[bytes.length - 10]! ^= 0x01; // inside the sealed header
    f.backend.replace('data', dataPack, bytes);
    const result = await repairIndex(await f.repo());
    assert.equal(result.damagedPacks.length, 1);
    assert.equal(result.damagedPacks[0]!.keptFromOldIndex, 4);
    const got = await readSnapshotFiles(await f.repo(), a);
    for (const [name, content] of Object.entries(files('a', 1, 4))) assert.ok(got[name]!.equals(content));
  });
});

void describe('prune killed at every write and every delete', () => {
  void it('every snapshot still restores byte for byte, and a second prune leaves check clean', async () => {
    const base = await fixture();
    const repo = await base.repo();
    const content = new Map<string, Record<string, Buffer>>();
    // Snapshot i holds groups i and i+1: packs of 4 files straddle groups, so forgetting some
    // snapshots leaves packs partly used (repacked) and others unused (deleted).
    const group = (j: number): Record<string, Buffer> => files(`g${j}-`, 10 + j, 6, 15_000);
    for (let i = 0; i < 5; i++) {
      const set = { ...group(i), ...group(i + 1) };
      content.set(await writeSnapshot(repo, set, { flushEvery: 4 }), set);
    }
    // A killed backup's pack, old enough to go.
    const killed = await base.repo();
    await killed.saveBlob('data', prngBytes(1234, 30_000));
    await killed.flushPacksOnly();
    await base.clock.advance(30 * HOUR);
    const ids = [...content.keys()];
    for (const id of [ids[0]!, ids[2]!]) await base.backend.remove('snapshots', id);

    // How many writes and deletes a whole prune makes.
    const counting = new FaultyBackend(base.backend.clone());
    await pruneRepository(await openTestRepository(counting), { clock: base.clock, maxUnused: 0 });
    const totals: [BackendMethod, number][] = [
      ['save', counting.count('save')],
      ['remove', counting.count('remove')],
    ];
    assert.ok(totals[0]![1] >= 3 && totals[1]![1] >= 5, JSON.stringify(totals));

    for (const [method, total] of totals) {
      for (let k = 1; k <= total; k++) {
        const backend = base.backend.clone();
        const f: Fixture = { ...base, backend, repo: () => openTestRepository(backend) };
        const dying = new FaultyBackend(backend, { rules: [{ method, nth: [k], die: true }] });
        await assert.rejects(pruneRepository(await openTestRepository(dying), { clock: base.clock, maxUnused: 0 }), /injected fault/, `${method} #${k}`);
        await assertSound(f, content, `after a crash at ${method} #${k}:`);
        const rerun = await pruneRepository(await openTestRepository(backend), { clock: base.clock, maxUnused: 0 });
        assert.equal(rerun.unusedAfter, 0, `${method} #${k}: the rerun finishes the job`);
        await assertSound(f, content, `after the rerun (${method} #${k}):`);
      }
    }
  });
});

/** A backend that runs a hook before each call (to act at a precise point of another operation). */
class HookedBackend extends ForwardingBackend {
  constructor(
    inner: Backend,
    private readonly hook: (method: string, kind: FileKind | undefined) => Promise<void>,
  ) {
    super(inner);
  }
  override async save(...args: Parameters<Backend['save']>): Promise<void> {
    await this.hook('save', args[0]);
    return this.inner.save(...args);
  }
  override async load(...args: Parameters<Backend['load']>): Promise<Buffer> {
    await this.hook('load', args[0]);
    return this.inner.load(...args);
  }
  override async list(kind: FileKind): ReturnType<Backend['list']> {
    await this.hook('list', kind);
    return this.inner.list(kind);
  }
  override async remove(kind: FileKind, name: string): Promise<void> {
    await this.hook('remove', kind);
    return this.inner.remove(kind, name);
  }
}
