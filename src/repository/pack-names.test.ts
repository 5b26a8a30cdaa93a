/**
 * Packs named by the SHA-256 of their bytes: new packs (collected or streamed) are, the index says
 * so, and `check --read-data` verifies it — a damaged byte shows as a hash mismatch. Repositories
 * of earlier builds (random pack names, no such word in the index) keep checking clean, also
 * after new packs join them and after `repair index`.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LocalBackend } from '../backend/local.js';
import { MemoryBackend } from '../backend/memory.js';
import { checkRepository } from './check.js';
import { repairIndex } from './repair.js';
import type { IndexedPack, Repository } from './repository.js';
import { initTestRepository, openTestRepository, prngBytes, readSnapshotFiles, writeSnapshot } from './testing.js';

const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

function files(seed: number, n: number, size = 30_000): Record<string, Buffer> {
  const out: Record<string, Buffer> = {};
  for (let i = 0; i < n; i++) out[`f${seed}-${i}`] = prngBytes(seed * 1000 + i, size);
  return out;
}

/** Every index entry of the repository, by pack. */
async function indexedPacks(repo: Repository): Promise<Map<string, IndexedPack>> {
  const out = new Map<string, IndexedPack>();
  for (const f of await repo.backend.list('index')) for (const p of (await repo.readIndexFile(f.name)).packs) out.set(p.id, p);
  return out;
}

/**
 * Turns a repository into one an earlier build wrote: every pack renamed to 32 random bytes and
 * index files without `nameIsHash`. Returns the new names.
 */
async function makeOldStyle(backend: MemoryBackend): Promise<string[]> {
  const repo = await openTestRepository(backend);
  const renamed = new Map<string, string>();
  for (const f of await backend.list('data')) {
    const name = randomBytes(32).toString('hex');
    await backend.save('data', name, backend.raw('data', f.name)!);
    await backend.remove('data', f.name);
    renamed.set(f.name, name);
  }
  const packs: IndexedPack[] = [];
  for (const f of await backend.list('index')) {
    for (const p of (await repo.readIndexFile(f.name)).packs) packs.push({ id: renamed.get(p.id)!, blobs: p.blobs });
    await backend.remove('index', f.name);
  }
  await repo.saveIndexFiles(packs);
  return [...renamed.values()];
}

/** The first of `names` that holds data blobs (a damaged tree pack would show without --read-data). */
async function dataPack(repo: Repository, names: string[]): Promise<string> {
  for (const name of [...names].sort()) if ((await repo.readPackHeader(name))[0]?.type === 'data') return name;
  throw new Error('no data pack');
}

/** Flips one byte in the middle of the first blob of pack `name`. */
async function damage(backend: MemoryBackend, repo: Repository, name: string): Promise<void> {
  const [first] = await repo.readPackHeader(name);
  backend.raw('data', name)![first!.offset + (first!.length >> 1)]! ^= 0x40;
}

void describe('pack names', () => {
  void it('new packs are named by the SHA-256 of their bytes, collected (remote) or streamed (local), and the index says so', async () => {
    const memory = new MemoryBackend();
    const repo = await initTestRepository(memory);
    await writeSnapshot(repo, files(1, 40), { flushEvery: 10 });
    const packs = await memory.list('data');
    assert.ok(packs.length >= 4, `${packs.length} packs`);
    for (const p of packs) assert.equal(sha256(memory.raw('data', p.name)!), p.name);
    const indexed = await indexedPacks(repo);
    assert.deepEqual([...indexed.keys()].sort(), packs.map((p) => p.name).sort());
    for (const p of indexed.values()) assert.equal(p.nameIsHash, true);

    const dir = mkdtempSync(join(tmpdir(), 'pack-names-'));
    try {
      const local = new LocalBackend(join(dir, 'repo'));
      assert.equal(typeof local.stage, 'function', 'the local backend streams packs');
      await writeSnapshot(await initTestRepository(local), files(2, 30), { flushEvery: 10 });
      const names = (await local.list('data')).map((f) => f.name);
      assert.ok(names.length >= 3);
      for (const name of names) {
        assert.equal(sha256(readFileSync(local.localPath('data', name))), name);
        assert.ok(readdirSync(join(dir, 'repo', 'data', name.slice(0, 2))).includes(name), 'in the folder of its name');
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void it('check --read-data reports a damaged byte in a new pack as a hash mismatch, with the snapshot it hurts', async () => {
    const memory = new MemoryBackend();
    const repo = await initTestRepository(memory);
    const snapshot = await writeSnapshot(repo, files(3, 20), { flushEvery: 5 });
    assert.deepEqual((await checkRepository(await openTestRepository(memory), { readData: true })).errors, []);
    const victim = await dataPack(repo, (await memory.list('data')).map((f) => f.name));
    await damage(memory, repo, victim);
    const quick = await checkRepository(await openTestRepository(memory));
    assert.deepEqual(quick.errors, [], 'without --read-data the pack is not read');
    const full = await checkRepository(await openTestRepository(memory), { readData: true });
    const mismatch = full.errors.filter((e) => /do not hash to its name/.test(e));
    assert.equal(mismatch.length, 1, full.errors.join('\n'));
    assert.match(mismatch[0]!, new RegExp(`^pack ${victim.slice(0, 8)}: its bytes do not hash to its name .*damages snapshot ${snapshot.slice(0, 8)}`));
  });

  void it('a repository of an earlier build (random pack names) checks clean, also with new packs beside its old ones and after repair index', async () => {
    const memory = new MemoryBackend();
    const first = files(4, 20);
    const old = await writeSnapshot(await initTestRepository(memory), first, { flushEvery: 5 });
    const oldPacks = await makeOldStyle(memory);
    for (const name of oldPacks) assert.notEqual(sha256(memory.raw('data', name)!), name, 'old packs do not hash to their names');
    assert.deepEqual((await checkRepository(await openTestRepository(memory), { readData: true })).errors, [], 'an old repository checks clean');

    // Upgraded: new backups add packs named by their hash; the old ones stay as they are.
    const second = files(5, 20);
    const upgraded = await writeSnapshot(await openTestRepository(memory), second, { flushEvery: 5 });
    const newPacks = (await memory.list('data')).map((f) => f.name).filter((n) => !oldPacks.includes(n));
    assert.ok(newPacks.length >= 4);
    for (const name of newPacks) assert.equal(sha256(memory.raw('data', name)!), name);
    assert.deepEqual((await checkRepository(await openTestRepository(memory), { readData: true })).errors, [], 'old and new packs side by side');

    // repair index keeps what the old index said: old packs unmarked, new ones marked.
    await repairIndex(await openTestRepository(memory));
    const after = await indexedPacks(await openTestRepository(memory));
    for (const name of oldPacks) assert.equal(after.get(name)?.nameIsHash, undefined);
    for (const name of newPacks) assert.equal(after.get(name)?.nameIsHash, true);
    assert.deepEqual((await checkRepository(await openTestRepository(memory), { readData: true })).errors, [], 'after repair index');
    const reader = await openTestRepository(memory);
    for (const [id, content] of [
      [old, first],
      [upgraded, second],
    ] as const) {
      const got = await readSnapshotFiles(reader, id);
      for (const [name, bytes] of Object.entries(content)) assert.ok(got[name]!.equals(bytes), `${id.slice(0, 8)} ${name}`);
    }

    // Damage: an old pack's is found blob by blob (its name proves nothing); a new pack's also by its hash.
    const repo = await openTestRepository(memory);
    const [oldVictim, newVictim] = [await dataPack(repo, oldPacks), await dataPack(repo, newPacks)];
    await damage(memory, repo, oldVictim);
    await damage(memory, repo, newVictim);
    const errors = (await checkRepository(await openTestRepository(memory), { readData: true })).errors;
    assert.deepEqual(
      errors.filter((e) => /do not hash/.test(e)).map((e) => e.slice(5, 13)),
      [newVictim.slice(0, 8)],
    );
    assert.ok(errors.some((e) => e.includes(`pack ${oldVictim.slice(0, 12)} blob`)), errors.join('\n'));
    assert.ok(errors.some((e) => e.includes(`pack ${newVictim.slice(0, 12)} blob`)), errors.join('\n'));
  });
});
