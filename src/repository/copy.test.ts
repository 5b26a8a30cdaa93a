/**
 * copy between repositories on memory and local backends: what arrives reads back byte for byte
 * and passes `check --read-data`; only what the target lacks is sent; snapshots the target holds
 * are recognised by content; damaged source snapshots are skipped and named; a copy killed at any
 * write leaves the target sound and a re-run finishes; `init --copy-chunker-params` makes later
 * backups into the target deduplicate against the copied chunks.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Backend, FileKind } from '../backend/backend.js';
import { FaultyBackend } from '../backend/faulty.js';
import { LocalBackend } from '../backend/local.js';
import { MemoryBackend } from '../backend/memory.js';
import { UsageError } from '../errors.js';
import { Archiver } from './archiver.js';
import { checkRepository } from './check.js';
import { copySnapshots, snapshotContent, type CopyEvent, type CopyResult } from './copy.js';
import { Repository, sha256 } from './repository.js';
import { readSnapshots } from './snapshots.js';
import { TEST_KDF, initTestRepository, openTestRepository, prngBytes, readSnapshotFiles, writeSnapshot } from './testing.js';
import type { Snapshot, TreeNode } from './tree.js';

type Files = Record<string, Buffer>;

function files(prefix: string, seed: number, n: number, size = 20_000): Files {
  const out: Files = {};
  for (let i = 0; i < n; i++) out[`${prefix}${i}`] = prngBytes(seed * 1000 + i, size);
  return out;
}

/** A source with three snapshots that share data and point at their parents; their files by id. */
async function sourceWithHistory(backend: Backend): Promise<Map<string, Files>> {
  const repo = await initTestRepository(backend);
  const written = new Map<string, Files>();
  let parent: string | undefined;
  let content: Files = files('a', 1, 3);
  for (let i = 0; i < 3; i++) {
    content = { ...content, ...files(`s${i}-`, 10 + i, 2) };
    const id = await writeSnapshot(repo, content, { time: `2026-01-0${i + 1}T00:00:00Z`, ...(parent !== undefined ? { parent } : {}) });
    written.set(id, content);
    parent = id;
  }
  return written;
}

/** Every source snapshot has exactly one copy in the target, reading back byte for byte; check --read-data is clean. */
async function assertCopied(target: Backend, expected: Map<string, Files>): Promise<Map<string, string>> {
  const repo = await openTestRepository(target);
  const check = await checkRepository(repo, { readData: true });
  assert.deepEqual(check.errors, []);
  const { snapshots, damaged } = await readSnapshots(repo);
  assert.deepEqual(damaged, []);
  const copyOf = new Map<string, string>();
  for (const s of snapshots) {
    assert.ok(s.original !== undefined && expected.has(s.original), `target snapshot ${s.id} is a copy of a source snapshot`);
    assert.ok(!copyOf.has(s.original), 'one copy per source snapshot');
    copyOf.set(s.original, s.id);
    assert.deepEqual(await readSnapshotFiles(repo, s.id), expected.get(s.original));
  }
  assert.equal(copyOf.size, expected.size);
  return copyOf;
}

async function copy(source: Backend, target: Backend, options: Parameters<typeof copySnapshots>[2] = {}): Promise<CopyResult> {
  return copySnapshots(await openTestRepository(source), await openTestRepository(target), options);
}

async function names(backend: Backend): Promise<Record<string, string[]>> {
  const out: Record<string, string[]> = {};
  for (const kind of ['data', 'index', 'snapshots', 'keys', 'config'] satisfies FileKind[]) out[kind] = (await backend.list(kind)).map((f) => f.name).sort();
  return out;
}

function node(name: string, fields: Partial<TreeNode> & Pick<TreeNode, 'type'>): TreeNode {
  return { name: Buffer.from(name).toString('base64'), mode: 0o755, uid: 0, gid: 0, mtimeNs: '0', ctimeNs: '0', inode: '0', size: 0, ...fields };
}

/** A snapshot of one volume whose root folder is `tree`. */
function snapshotOf(tree: string, options: { time: string; bytes: number; root?: TreeNode }): Snapshot {
  return {
    version: 1,
    time: options.time,
    hostname: 'test',
    tool: 'test',
    project: 'p',
    cvat: { version: '2.73.0', versionSource: 'given', serverImage: null, serverImageDigest: null },
    downtimeMs: 0,
    durationMs: 0,
    volumes: [
      { composeName: 'cvat_data', name: 'p_cvat_data', role: 'media', mountPath: '/home/django/data', tree, root: options.root ?? node('', { type: 'dir' }), entries: 100, files: 10, bytes: options.bytes },
    ],
    skipped: [],
  };
}

describe('copy between repositories', () => {
  it('copies every snapshot, verified, with parents pointing at the copies; a second run copies nothing', async () => {
    const source = new MemoryBackend();
    const expected = await sourceWithHistory(source);
    const target = new MemoryBackend();
    await initTestRepository(target);
    const events: CopyEvent[] = [];
    const result = await copy(source, target, { onEvent: (e) => events.push(e) });

    assert.deepEqual(result.snapshots.map((s) => s.status), ['copied', 'copied', 'copied']);
    const copyOf = await assertCopied(target, expected);
    const targetRepo = await openTestRepository(target);
    const sourceRepo = await openTestRepository(source);
    for (const s of (await readSnapshots(sourceRepo)).snapshots) {
      const copied = await targetRepo.loadObject<Snapshot>('snapshots', copyOf.get(s.id)!);
      assert.equal(copied.parent, s.parent === undefined ? undefined : copyOf.get(s.parent), 'the parent is the parent\'s copy');
      assert.equal(snapshotContent(copied), snapshotContent(s));
    }
    // Each distinct blob crossed once: as many as the source stores.
    await sourceRepo.loadIndex();
    assert.equal(result.blobsCopied, [...sourceRepo.blobIds()].length);
    assert.ok(result.packsVerified >= 2);
    const starts = events.filter((e) => e.type === 'snapshot-start');
    assert.equal(starts.length, 3);
    const lastProgress = events.filter((e) => e.type === 'snapshot-progress').pop();
    assert.equal(lastProgress?.type === 'snapshot-progress' && lastProgress.bytes, Object.values(expected.get(result.snapshots[2]!.source)!).reduce((n, b) => n + b.length, 0));

    const before = await names(target);
    const again = await copy(source, target);
    assert.deepEqual(again.snapshots.map((s) => s.status), ['present', 'present', 'present']);
    assert.equal(again.blobsCopied, 0);
    assert.deepEqual(await names(target), before, 'nothing written by the second run');
  });

  it('sends only the blobs the target lacks', async () => {
    const a = prngBytes(1, 200_000); // 4 chunks of 64 KiB
    const b = prngBytes(2, 100_000); // 2 chunks
    const source = new MemoryBackend();
    const sourceRepo = await initTestRepository(source);
    const id = await writeSnapshot(sourceRepo, { a, b });
    const target = new MemoryBackend();
    await writeSnapshot(await initTestRepository(target), { a }, { project: 'other' });

    const result = await copy(source, target);
    assert.equal(result.blobsCopied, 3, "b's two chunks and the new tree");
    const tree = await openTestRepository(source).then(async (r) => (await r.loadIndex(), r.location((await r.loadObject<Snapshot>('snapshots', id)).volumes[0]!.tree)!));
    assert.equal(result.bytesCopied, b.length + tree.rawLength);
    assert.equal(result.bytesProcessed, a.length + b.length);
    const targetRepo = await openTestRepository(target);
    const copied = (await readSnapshots(targetRepo)).snapshots.find((s) => s.original === id)!;
    assert.deepEqual(await readSnapshotFiles(targetRepo, copied.id), { a, b });
  });

  it('walks every tree, even one the target has: a tree there says nothing about its chunks', async () => {
    const source = new MemoryBackend();
    const sourceRepo = await initTestRepository(source);
    const content = files('f', 3, 4);
    const id = await writeSnapshot(sourceRepo, content);
    await sourceRepo.loadIndex();
    const treeId = (await sourceRepo.loadObject<Snapshot>('snapshots', id)).volumes[0]!.tree;
    // The target holds the snapshot's tree but none of its chunks (as after a prune that dropped
    // an unused tree's data packs and left the tree's pack alone).
    const target = new MemoryBackend();
    const targetRepo = await initTestRepository(target);
    await targetRepo.saveCopiedBlob(await sourceRepo.readBlobForCopy(treeId));
    await targetRepo.flush();

    const result = await copy(source, target);
    assert.equal(result.blobsCopied, 4, 'every chunk, not the tree');
    await assertCopied(target, new Map([[id, content]]));
  });

  for (const [label, make] of [
    ['local → local', ['local', 'local']],
    ['memory → local', ['memory', 'local']],
    ['local → memory', ['local', 'memory']],
  ] as const) {
    it(`works between backends: ${label}`, async () => {
      const dir = await mkdtemp(join(tmpdir(), 'cvat-backup-copy-'));
      try {
        const open = (kind: 'local' | 'memory', name: string): Backend => (kind === 'local' ? new LocalBackend(join(dir, name)) : new MemoryBackend());
        const source = open(make[0], 'source');
        const target = open(make[1], 'target');
        const expected = await sourceWithHistory(source);
        await initTestRepository(target);
        const result = await copy(source, target);
        assert.equal(result.snapshots.filter((s) => s.status === 'copied').length, 3);
        await assertCopied(target, expected);
        assert.deepEqual((await copy(source, target)).blobsCopied, 0);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    });
  }

  it('a damaged source snapshot is skipped and named; the others are copied', async () => {
    const source = new MemoryBackend();
    const repo = await initTestRepository(source);
    const good = { a: prngBytes(1, 30_000) };
    const s1 = await writeSnapshot(repo, good, { time: '2026-01-01T00:00:00Z' });
    const s2 = await writeSnapshot(repo, { b: prngBytes(2, 30_000) }, { time: '2026-01-02T00:00:00Z' });
    const s3 = await writeSnapshot(repo, { c: prngBytes(3, 30_000) }, { time: '2026-01-03T00:00:00Z' });
    // s2: one bit of its data flipped inside its pack; s3: its snapshot file cut short.
    await repo.loadIndex();
    const bBlob = repo.location(sha256(prngBytes(2, 30_000)))!;
    const pack = await source.load('data', bBlob.pack);
    pack[bBlob.offset + 40]! ^= 1;
    await source.remove('data', bBlob.pack);
    await source.save('data', bBlob.pack, pack);
    const s3File = await source.load('snapshots', s3);
    await source.remove('snapshots', s3);
    await source.save('snapshots', s3, s3File.subarray(0, 20));

    const target = new MemoryBackend();
    await initTestRepository(target);
    const warnings: string[] = [];
    const result = await copy(source, target, { onEvent: (e) => e.type === 'snapshot-done' && e.outcome.status === 'damaged' && warnings.push(e.outcome.source) });
    const byId = new Map(result.snapshots.map((s) => [s.source, s]));
    assert.equal(byId.get(s1)?.status, 'copied');
    const d2 = byId.get(s2);
    assert.ok(d2?.status === 'damaged' && /authentication failed/.test(d2.error), JSON.stringify(d2));
    assert.equal(byId.get(s3)?.status, 'damaged');
    assert.deepEqual(warnings.sort(), [s2, s3].sort());
    await assertCopied(target, new Map([[s1, good]]));

    // Named on its own: skipped and named, nothing written.
    const before = await names(target);
    const named = await copy(source, target, { refs: [s2.slice(0, 8)] });
    assert.deepEqual(named.snapshots.map((s) => [s.source, s.status]), [[s2, 'damaged']]);
    assert.deepEqual((await names(target)).snapshots, before.snapshots);
  });

  it('a folder shared with a damaged snapshot is copied with the next snapshot that has it', async () => {
    const source = new MemoryBackend();
    const repo = await initTestRepository(source);
    await repo.loadIndex();
    const chunk = async (seed: number): Promise<string> => (await repo.saveBlob('data', prngBytes(seed, 10_000))).id;
    const tree = async (nodes: TreeNode[]): Promise<string> => (await repo.saveBlob('tree', Buffer.from(JSON.stringify({ nodes })))).id;
    const bad = await chunk(1);
    const shared = await tree([node('x', { type: 'file', size: 20_000, content: [await chunk(2), await chunk(3)] })]);
    // Snapshot 1: a file whose chunk is damaged, read ahead of the shared folder's blobs.
    const first = await tree([node('a', { type: 'file', size: 10_000, content: [bad] }), node('b', { type: 'dir', subtree: shared })]);
    const second = await tree([node('dir', { type: 'dir', subtree: shared })]);
    await repo.flush();
    const s1 = await repo.saveObject('snapshots', snapshotOf(first, { time: '2026-01-01T00:00:00Z', bytes: 30_000 }));
    const s2 = await repo.saveObject('snapshots', snapshotOf(second, { time: '2026-01-02T00:00:00Z', bytes: 20_000 }));
    const where = repo.location(bad)!;
    const pack = await source.load('data', where.pack);
    pack[where.offset + 30]! ^= 1;
    await source.remove('data', where.pack);
    await source.save('data', where.pack, pack);

    const target = new MemoryBackend();
    await initTestRepository(target);
    const result = await copy(source, target);
    assert.deepEqual(result.snapshots.map((s) => [s.source, s.status]), [[s1, 'damaged'], [s2, 'copied']]);
    assert.deepEqual((await checkRepository(await openTestRepository(target), { readData: true })).errors, []);
  });

  it('checks each blob on arrival: one whose bytes do not hash to its id is refused', async () => {
    const source = new MemoryBackend();
    const repo = await initTestRepository(source);
    const claimed = prngBytes(1, 50_000);
    const actual = prngBytes(2, 50_000);
    // A blob stored under the id of other bytes (sealed with the right key: only a hash shows it).
    await repo.saveCopiedBlob({ id: sha256(claimed), type: 'data', rawLength: actual.length, framed: Buffer.concat([Buffer.from([0]), actual]), plaintext: actual });
    const id = await writeSnapshot(repo, { x: claimed }, { chunk: claimed.length });
    const target = new MemoryBackend();
    await initTestRepository(target);
    const result = await copy(source, target);
    const outcome = result.snapshots[0];
    assert.ok(outcome?.status === 'damaged' && outcome.source === id && /does not match its id/.test(outcome.error), JSON.stringify(outcome));
    assert.deepEqual((await readSnapshots(await openTestRepository(target))).snapshots, []);
  });

  it('killed at any write of the target, the target stays sound and a re-run finishes', async () => {
    const source = new MemoryBackend();
    const expected = await sourceWithHistory(source);
    let completedAt: number | undefined;
    for (let k = 1; completedAt === undefined; k++) {
      assert.ok(k < 100, 'the copy makes fewer than 100 saves');
      const target = new MemoryBackend();
      await initTestRepository(target);
      const faulty = new FaultyBackend(target, { rules: [{ method: 'save', nth: [k], die: true }] });
      let failed = false;
      try {
        await copySnapshots(await openTestRepository(source), await openTestRepository(faulty));
      } catch {
        failed = true;
      }
      if (!failed) {
        completedAt = k;
        break;
      }
      assert.ok(faulty.died);
      // What the killed copy left: sound, and each snapshot there complete.
      const repo = await openTestRepository(target);
      assert.deepEqual((await checkRepository(repo, { readData: true })).errors, [], `killed at save ${k}`);
      for (const s of (await readSnapshots(repo)).snapshots) assert.deepEqual(await readSnapshotFiles(repo, s.id), expected.get(s.original!));
      const rerun = await copy(source, target);
      assert.ok(rerun.snapshots.every((s) => s.status !== 'damaged'));
      await assertCopied(target, expected);
    }
    assert.ok(completedAt > 6, `the kill points covered packs, index files and snapshots (${completedAt - 1} of them)`);
  });

  it('resolves latest and id prefixes like other commands; refuses unknown ones and a copy into itself', async () => {
    const source = new MemoryBackend();
    const repo = await initTestRepository(source);
    const p1 = await writeSnapshot(repo, { a: prngBytes(1, 1000) }, { time: '2026-01-01T00:00:00Z', project: 'one' });
    const p2 = await writeSnapshot(repo, { a: prngBytes(2, 1000) }, { time: '2026-01-02T00:00:00Z', project: 'two' });
    const target = new MemoryBackend();
    await initTestRepository(target);

    const latestOfOne = await copy(source, target, { refs: ['latest'], project: 'one' });
    assert.deepEqual(latestOfOne.snapshots.map((s) => [s.source, s.status]), [[p1, 'copied']]);
    const byPrefix = await copy(source, target, { refs: [p2.slice(0, 6), 'latest', p1.slice(0, 10)] });
    assert.deepEqual(byPrefix.snapshots.map((s) => [s.source, s.status]), [[p1, 'present'], [p2, 'copied']]);
    await assert.rejects(copy(source, target, { refs: ['ffffffff'] }), UsageError);
    await assert.rejects(copy(source, source), UsageError);
  });

  it('init --copy-chunker-params: a fresh backup into the copy deduplicates against the copied chunks; without, it stores them again', async (t) => {
    const dir = await mkdtemp(join(tmpdir(), 'cvat-backup-chunker-'));
    try {
      const volume = join(dir, 'volume');
      await mkdir(volume);
      await writeFile(join(volume, 'one.bin'), prngBytes(7, 5 << 20));
      await writeFile(join(volume, 'two.bin'), prngBytes(8, 3 << 20));
      const dataBytes = 8 << 20;

      const source = new MemoryBackend();
      const sourceRepo = await initTestRepository(source);
      await sourceRepo.loadIndex();
      const archived = await new Archiver(sourceRepo).archive(volume, undefined);
      await sourceRepo.flush();
      await sourceRepo.saveObject('snapshots', snapshotOf(archived.tree, { time: '2026-01-01T00:00:00Z', bytes: dataBytes, root: archived.root }));

      const plain = new MemoryBackend();
      const same = new MemoryBackend();
      await Repository.init(plain, 'pw', { kdf: TEST_KDF });
      const sameRepo = await Repository.init(same, 'pw', { kdf: TEST_KDF, chunker: sourceRepo.config.chunker });
      assert.deepEqual(sameRepo.config.chunker, sourceRepo.config.chunker);
      assert.notEqual((await openTestRepository(plain)).config.chunker.seed, sourceRepo.config.chunker.seed);

      const added: Record<string, number> = {};
      const copied: Record<string, CopyResult> = {};
      for (const [name, backend] of [['plain', plain], ['same', same]] as const) {
        copied[name] = await copy(source, backend);
        const repo = await openTestRepository(backend);
        assert.deepEqual((await checkRepository(repo, { readData: true })).errors, []);
        const [s] = (await readSnapshots(repo)).snapshots;
        assert.equal(s?.volumes[0]?.tree, archived.tree, 'the copied data is the same');
        await repo.loadIndex();
        const archiver = new Archiver(repo);
        await archiver.archive(volume, undefined);
        await repo.flush();
        added[name] = archiver.stats.bytesAdded;
      }
      assert.equal(copied['plain']!.bytesCopied, copied['same']!.bytesCopied);
      assert.equal(copied['plain']!.blobsCopied, copied['same']!.blobsCopied);
      t.diagnostic(`fresh backup of ${dataBytes} bytes after the copy: ${added['same']} bytes added with the source's chunker parameters, ${added['plain']} without`);
      assert.equal(added['same'], 0);
      assert.ok(added['plain']! > 0.9 * dataBytes, `${added['plain']} bytes added without the option`);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
