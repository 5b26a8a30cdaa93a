/**
 * Object Lock logic on the memory backend with an injected clock (the S3 behaviour itself is
 * tested on Ceph in backend/s3.test.ts and test/s3.test.ts): a backup extends the retention of
 * exactly what its snapshot uses, and prune refuses before changing anything while a pack it would
 * delete is retained, and works once the retention has passed.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { FileKind } from '../backend/backend.js';
import { MemoryBackend } from '../backend/memory.js';
import { ManualClock } from '../clock.js';
import { ObjectLockedError } from '../errors.js';
import { extendSnapshotRetention } from './object-lock.js';
import { pruneRepository } from './prune.js';
import type { Snapshot } from './tree.js';
import { initTestRepository, openTestRepository, prngBytes, readSnapshotFiles, writeSnapshot } from './testing.js';

const DAY = 86_400_000;

/** A memory backend that keeps retention as the S3 backend does (locks and state get none). */
class RetainingBackend extends MemoryBackend {
  readonly until = new Map<string, number>();
  constructor(
    private readonly clock: ManualClock,
    private readonly seconds: number,
  ) {
    super({ now: () => clock.now() });
  }
  override async save(kind: FileKind, name: string, data: Buffer | Buffer[]): Promise<void> {
    await super.save(kind, name, data);
    if (kind !== 'locks' && kind !== 'state') this.until.set(`${kind}/${name}`, this.clock.now() + this.seconds * 1000);
  }
  override async remove(kind: FileKind, name: string): Promise<void> {
    if ((this.until.get(`${kind}/${name}`) ?? 0) > this.clock.now()) throw new ObjectLockedError(`${kind}/${name} is retained`);
    await super.remove(kind, name);
  }
  retention(): Promise<{ mode: 'compliance'; seconds: number }> {
    return Promise.resolve({ mode: 'compliance', seconds: this.seconds });
  }
  retainedUntil(kind: FileKind, name: string): Promise<number | undefined> {
    return Promise.resolve(this.until.get(`${kind}/${name}`));
  }
  extendRetention(files: { kind: FileKind; name: string }[]): Promise<number> {
    for (const f of files) this.until.set(`${f.kind}/${f.name}`, this.clock.now() + this.seconds * 1000);
    return Promise.resolve(files.length);
  }
}

function files(prefix: string, seed: number, n: number): Record<string, Buffer> {
  const out: Record<string, Buffer> = {};
  for (let i = 0; i < n; i++) out[`${prefix}${i}`] = prngBytes(seed * 1000 + i, 30_000);
  return out;
}

void describe('Object Lock: retention that follows the snapshots', () => {
  void it('a backup extends the packs its snapshot uses, the keys and the config, and nothing only a forgotten snapshot used', async () => {
    const clock = new ManualClock();
    const backend = new RetainingBackend(clock, 10 * 86_400);
    await initTestRepository(backend);
    const shared = files('shared', 1, 3);
    const old = await writeSnapshot(await openTestRepository(backend), { ...shared, ...files('gone', 2, 3) });
    const oldPacks = new Set((await backend.list('data')).map((f) => f.name));
    await clock.advance(5 * DAY);
    const repo = await openTestRepository(backend);
    const now = await writeSnapshot(repo, { ...shared, ...files('new', 3, 2) });
    await backend.remove('snapshots', old).catch(() => undefined); // still retained: stays, as forget would refuse
    const extended = await extendSnapshotRetention(repo, { ...(await repo.loadObject<Snapshot>('snapshots', now)), id: now });
    const until = (kind: FileKind, name: string): number => backend.until.get(`${kind}/${name}`)!;
    const fresh = clock.now() + 10 * DAY;
    assert.equal(until('config', 'config'), fresh);
    for (const k of await backend.list('keys')) assert.equal(until('keys', k.name), fresh);
    // The packs of the shared files are extended; those only the old snapshot used keep their date.
    const extendedOld = [...oldPacks].filter((p) => until('data', p) === fresh);
    const notExtended = [...oldPacks].filter((p) => until('data', p) !== fresh);
    assert.ok(extendedOld.length > 0, 'shared packs extended');
    assert.ok(notExtended.length > 0, 'packs only the old snapshot used are not');
    assert.ok(extended >= 3 + extendedOld.length);
  });

  void it('prune refuses before changing anything while a pack it would delete is retained, and works after', async () => {
    const clock = new ManualClock();
    const backend = new RetainingBackend(clock, 2 * 86_400);
    await initTestRepository(backend);
    const old = await writeSnapshot(await openTestRepository(backend), files('old', 1, 4));
    const kept = await writeSnapshot(await openTestRepository(backend), files('kept', 2, 4));
    backend.until.delete(`snapshots/${old}`); // forget after the snapshot's own retention
    await backend.remove('snapshots', old);
    const state = async (): Promise<string> => JSON.stringify(await Promise.all((['data', 'index', 'snapshots'] as const).map(async (k) => (await backend.list(k)).map((f) => f.name).sort())));
    const before = await state();
    await clock.advance(DAY);
    await assert.rejects(pruneRepository(await openTestRepository(backend), { clock, maxUnused: 0 }), (e: unknown) => e instanceof ObjectLockedError && /nothing was removed/.test(e.message));
    assert.equal(await state(), before, 'nothing written, nothing removed');
    await clock.advance(2 * DAY);
    const result = await pruneRepository(await openTestRepository(backend), { clock, maxUnused: 0 });
    assert.ok(result.packsDeleted > 0);
    assert.deepEqual(await readSnapshotFiles(await openTestRepository(backend), kept), files('kept', 2, 4));
  });

  void it('prune also refuses while an index file it would replace is retained, though the packs are not', async () => {
    const clock = new ManualClock();
    const backend = new RetainingBackend(clock, 2 * 86_400);
    await initTestRepository(backend);
    const old = await writeSnapshot(await openTestRepository(backend), files('old', 1, 4));
    await writeSnapshot(await openTestRepository(backend), files('kept', 2, 4));
    for (const key of [...backend.until.keys()]) if (!key.startsWith('index/')) backend.until.delete(key);
    await backend.remove('snapshots', old);
    const indexBefore = (await backend.list('index')).map((f) => f.name).sort();
    const packsBefore = (await backend.list('data')).length;
    await assert.rejects(pruneRepository(await openTestRepository(backend), { clock, maxUnused: 0 }), (e: unknown) => e instanceof ObjectLockedError && /nothing was removed/.test(e.message));
    assert.deepEqual((await backend.list('index')).map((f) => f.name).sort(), indexBefore);
    assert.equal((await backend.list('data')).length, packsBefore);
  });

  void it('prune leaves a partly used pack alone while it is retained (repacking cannot free it)', async () => {
    const clock = new ManualClock();
    const backend = new RetainingBackend(clock, 2 * 86_400);
    await initTestRepository(backend);
    // One pack holds the blobs of both snapshots; the second snapshot keeps it retained.
    const both = { ...files('a', 1, 2), ...files('b', 2, 2) };
    const old = await writeSnapshot(await openTestRepository(backend), both);
    const oldPacks = (await backend.list('data')).map((f) => f.name);
    await clock.advance(3 * DAY); // what only the old snapshot uses is past its retention
    const repo = await openTestRepository(backend);
    const kept = await writeSnapshot(repo, files('a', 1, 2));
    await extendSnapshotRetention(repo, { ...(await repo.loadObject<Snapshot>('snapshots', kept)), id: kept });
    await backend.remove('snapshots', old);
    const result = await pruneRepository(await openTestRepository(backend), { clock, maxUnused: 0 });
    assert.equal(result.packsRepacked, 0);
    assert.ok(result.packsDeleted > 0, "the old snapshot's own tree pack goes");
    const shared = oldPacks.filter((p) => backend.until.get(`data/${p}`)! > clock.now());
    assert.equal(shared.length, 1);
    assert.ok((await backend.list('data')).some((f) => f.name === shared[0]), 'the retained shared pack stays');
    await clock.advance(3 * DAY);
    const later = await pruneRepository(await openTestRepository(backend), { clock, maxUnused: 0 });
    assert.ok(later.packsRepacked > 0, 'after the retention it is repacked');
    assert.deepEqual(await readSnapshotFiles(await openTestRepository(backend), kept), files('a', 1, 2));
  });
});
