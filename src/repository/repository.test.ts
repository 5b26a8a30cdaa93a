import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmodSync, linkSync, mkdirSync, mkdtempSync, readlinkSync, rmSync, readdirSync, readFileSync, symlinkSync, writeFileSync, truncateSync, statSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Chunker, DEFAULT_CHUNKER } from './chunker.js';
import { open, seal } from './crypto.js';
import { Repository } from './repository.js';
import { LocalBackend } from '../backend/local.js';
import { FaultyBackend } from '../backend/faulty.js';
import { checkRepository } from './check.js';
import { CorruptArchiveError, WrongPasswordError } from '../errors.js';
import { Archiver } from './archiver.js';
import { restoreVolumeToFolder } from './folder-restore.js';
import type { TreeNode } from './tree.js';
import { prngBytes, testMediaVolume } from './testing.js';


const SMALL = { minSize: 2048, avgSize: 8192, maxSize: 32768, seed: '00'.repeat(32) };

function chunk(data: Buffer, params = SMALL, pieces = 1): Buffer[] {
  const c = new Chunker(params);
  const out: Buffer[] = [];
  const step = Math.max(1, Math.ceil(data.length / pieces));
  for (let i = 0; i < data.length; i += step) out.push(...c.push(data.subarray(i, i + step)));
  out.push(...c.finish());
  return out;
}

const fastKdf = { algorithm: 'scrypt' as const, N: 1024, r: 8, p: 1 };

void describe('Chunker (property tests)', () => {
  void it('round-trips any byte sequence and is deterministic however the input is split', () => {
    for (let seed = 1; seed <= 30; seed++) {
      const data = prngBytes(seed, seed * 7919 % 300000);
      const whole = chunk(data);
      assert.ok(Buffer.concat(whole).equals(data), `seed ${seed}: concatenation`);
      const split = chunk(data, SMALL, 1 + (seed % 13));
      assert.deepEqual(split.map((c) => c.length), whole.map((c) => c.length), `seed ${seed}: split input`);
      for (const c of whole.slice(0, -1)) assert.ok(c.length >= SMALL.minSize && c.length <= SMALL.maxSize, `seed ${seed}: size ${c.length}`);
    }
  });

  void it('cut() over a growing buffer gives exactly the chunks of push/finish (the workers cut that way)', () => {
    for (let seed = 1; seed <= 30; seed++) {
      const data = prngBytes(seed * 31, (seed * 104729) % 400000);
      const params = seed % 3 === 0 ? { ...SMALL, minSize: 1, avgSize: 64, maxSize: 256 } : SMALL;
      const expected = chunk(data, params).map((c) => c.length);
      // As a worker does: bytes arrive in reads of varying size; the current chunk is [start, end).
      const chunker = new Chunker(params);
      const lengths: number[] = [];
      let start = 0;
      let end = 0;
      let step = 1 + (seed % 7);
      while (end < data.length) {
        end = Math.min(data.length, end + step);
        step = 1 + ((step * 37 + seed) % 5000);
        for (let cut = chunker.cut(data.subarray(start, end)); cut !== undefined; cut = chunker.cut(data.subarray(start, end))) {
          lengths.push(cut);
          start += cut;
        }
      }
      if (end > start) lengths.push(end - start);
      assert.deepEqual(lengths, expected, `seed ${seed}`);
    }
  });

  void it('an insertion changes only the chunks around it', () => {
    const data = prngBytes(99, 400000);
    const edited = Buffer.concat([data.subarray(0, 200000), Buffer.from('inserted bytes'), data.subarray(200000)]);
    const a = new Set(chunk(data).map((c) => c.toString('base64')));
    const b = chunk(edited).map((c) => c.toString('base64'));
    const shared = b.filter((c) => a.has(c)).length;
    assert.ok(shared >= b.length - 3, `${shared} of ${b.length} chunks shared`);
  });

  void it('averages near 1 MiB with the default parameters', () => {
    const data = prngBytes(7, 24 << 20);
    const sizes = chunk(data, { ...DEFAULT_CHUNKER, seed: 'ab'.repeat(32) }, 24).map((c) => c.length);
    const average = data.length / sizes.length;
    assert.ok(average > 600 * 1024 && average < 1800 * 1024, `average ${average}`);
  });
});

void describe('crypto', () => {
  void it('seal/open round-trips and detects any flipped bit', () => {
    const key = randomBytes(32);
    for (let i = 0; i < 20; i++) {
      const plain = prngBytes(i + 1, i * 100);
      const sealed = seal(key, plain, 'blob:data');
      assert.ok(open(key, sealed, 'blob:data', 'x').equals(plain));
      const flipped = Buffer.from(sealed);
      const at = Math.floor((sealed.length * (i + 0.5)) / 20);
      flipped[at] = flipped[at]! ^ 0x01;
      assert.throws(() => open(key, flipped, 'blob:data', 'x'), /damaged|not a sealed object/);
    }
    assert.throws(() => open(key, seal(key, Buffer.from('a'), 'index'), 'snapshots', 'x'), /damaged/);
  });
});

void describe('Repository on a local backend', () => {
  const withRepo = async (fn: (dir: string, repo: Repository) => Promise<void>): Promise<void> => {
    const dir = mkdtempSync(join(tmpdir(), 'repo-test-'));
    try {
      await fn(dir, await Repository.init(new LocalBackend(join(dir, 'repo')), 'pw', { kdf: fastKdf }));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };

  void it('stores blobs once, reads them back after reopening, refuses a wrong password', async () => {
    await withRepo(async (dir, repo) => {
      const blobs = Array.from({ length: 40 }, (_, i) => (i % 2 ? prngBytes(i + 1, 300000) : Buffer.from('text '.repeat(i * 1000 + 1))));
      const ids: string[] = [];
      let added = 0;
      for (const b of blobs) {
        const r = await repo.saveBlob('data', b);
        ids.push(r.id);
        added += r.added;
      }
      const again = await repo.saveBlob('data', blobs[3]!);
      assert.equal(again.added, 0, 'a known blob is not stored twice');
      await repo.flush();
      assert.ok(added < blobs.reduce((s, b) => s + b.length, 0), 'text compressed');
      const reopened = await Repository.open(new LocalBackend(join(dir, 'repo')), 'pw');
      await reopened.loadIndex();
      for (let i = 0; i < blobs.length; i++) assert.ok((await reopened.loadBlob(ids[i]!)).equals(blobs[i]!));
      await assert.rejects(Repository.open(new LocalBackend(join(dir, 'repo')), 'not the password'), WrongPasswordError);
    });
  });

  void it('a backend that fails writes: the save fails, nothing half-written is visible, the next save works', async () => {
    await withRepo(async (dir) => {
      const healthy = new LocalBackend(join(dir, 'repo'));
      for (const nth of [[1], [2], [3, 4]]) {
        const faulty = await Repository.open(new FaultyBackend(healthy, { failSaves: { kind: 'data', nth } }), 'pw');
        await faulty.loadIndex();
        const ids: string[] = [];
        await assert.rejects(async () => {
          for (let i = 0; i < 80; i++) ids.push((await faulty.saveBlob('data', prngBytes(1000 + nth[0]! * 100 + i, 1 << 20))).id);
          await faulty.flush();
          await faulty.saveObject('snapshots', { ids });
        }, /injected fault/);
        // What a reader sees afterwards is consistent, and no snapshot appeared.
        const reader = await Repository.open(healthy, 'pw');
        assert.deepEqual((await checkRepository(reader, { readData: true })).errors, []);
        assert.equal((await healthy.list('snapshots')).length, 0);
        assert.deepEqual(await healthy.listTemporary(), [], 'a failed save leaves no temporary file');
      }
      const writer = await Repository.open(healthy, 'pw');
      await writer.loadIndex();
      const id = (await writer.saveBlob('data', Buffer.from('after the faults'))).id;
      await writer.flush();
      const reader = await Repository.open(healthy, 'pw');
      await reader.loadIndex();
      assert.equal((await reader.loadBlob(id)).toString(), 'after the faults');
    });
  });

  void it('reading through a backend that truncates every pack read is refused, never wrong data', async () => {
    await withRepo(async (dir, repo) => {
      const id = (await repo.saveBlob('data', prngBytes(5, 300000))).id;
      await repo.flush();
      const truncating = await Repository.open(new FaultyBackend(new LocalBackend(join(dir, 'repo')), { truncateLoads: 'data' }), 'pw');
      await truncating.loadIndex();
      await assert.rejects(truncating.loadBlob(id), /damaged|not a sealed object/);
    });
  });

  void it('check --read-data finds a flipped bit and a truncated pack', async () => {
    await withRepo(async (dir, repo) => {
      for (let i = 0; i < 30; i++) await repo.saveBlob('data', prngBytes(100 + i, 1 << 20));
      await repo.flush();
      assert.deepEqual((await checkRepository(repo, { readData: true })).errors, []);
      const dataDir = join(dir, 'repo', 'data');
      const packs = readdirSync(dataDir).flatMap((sub) => readdirSync(join(dataDir, sub)).map((name) => join(dataDir, sub, name)));
      assert.ok(packs.length >= 2);
      const bytes = readFileSync(packs[0]!);
      bytes[1000] = bytes[1000]! ^ 0x40;
      writeFileSync(packs[0]!, bytes);
      truncateSync(packs[1]!, Math.floor(statSync(packs[1]!).size / 2));
      const fresh = await Repository.open(new LocalBackend(join(dir, 'repo')), 'pw');
      const structural = await checkRepository(fresh, { readData: false });
      assert.equal(structural.errors.length, 1, structural.errors.join('\n'));
      assert.match(structural.errors[0]!, /truncated/);
      const full = await checkRepository(fresh, { readData: true });
      assert.ok(full.errors.some((e) => /damaged \(authentication failed\)/.test(e)), full.errors.join('\n'));
    });
  });
});

void describe('folder restore (trees written straight into a folder)', () => {
  const snapshotVolume = testMediaVolume;

  void it('gives back every byte, mode, time, link and hole, with and without workers', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'folder-restore-'));
    try {
      const src = join(dir, 'src');
      mkdirSync(join(src, 'a/b'), { recursive: true });
      writeFileSync(join(src, 'a/b/big.bin'), prngBytes(7, 3_000_000));
      writeFileSync(join(src, 'a/small.txt'), 'small');
      writeFileSync(join(src, 'empty'), '');
      linkSync(join(src, 'a/small.txt'), join(src, 'a/b/hard.txt'));
      symlinkSync('../a/small.txt', join(src, 'a/link'));
      writeFileSync(join(src, 'sparse'), '');
      truncateSync(join(src, 'sparse'), 8 << 20);
      chmodSync(join(src, 'a/small.txt'), 0o640);
      chmodSync(join(src, 'a/b'), 0o750);
      utimesSync(join(src, 'a/b/big.bin'), 1_600_000_000.25, 1_600_000_000.25);
      const repo = await Repository.init(new LocalBackend(join(dir, 'repo')), 'pw', { kdf: fastKdf });
      for (const workers of [false, true]) {
        const pool = workers ? repo.createChunkPool(2) : undefined;
        try {
          const archived = await new Archiver(repo, pool ? { pool } : {}).archive(src, undefined);
          await repo.flush();
          const out = join(dir, `out-${workers}`);
          mkdirSync(out);
          const result = await restoreVolumeToFolder(repo, snapshotVolume(archived.tree, archived.root), out, pool ? { pool } : {});
          assert.equal(result.stats.files, 5);
          for (const file of ['a/b/big.bin', 'a/small.txt', 'empty', 'sparse', 'a/b/hard.txt']) {
            assert.ok(readFileSync(join(out, file)).equals(readFileSync(join(src, file))), file);
          }
          for (const path of ['a/small.txt', 'a/b', 'a/b/big.bin', 'a', '.']) {
            const [a, b] = [statSync(join(src, path)), statSync(join(out, path))];
            assert.equal(b.mode, a.mode, `${path} mode`);
            assert.equal(b.uid, a.uid, `${path} owner`);
            assert.equal(Math.round(b.mtimeMs), Math.round(a.mtimeMs), `${path} mtime`);
          }
          assert.equal(statSync(join(out, 'a/b/hard.txt')).ino, statSync(join(out, 'a/small.txt')).ino, 'hard link');
          assert.equal(readlinkSync(join(out, 'a/link')), '../a/small.txt');
          assert.ok(statSync(join(out, 'sparse')).blocks * 512 < 1 << 20, 'the hole stays a hole');
        } finally {
          await pool?.close();
        }
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void it('refuses a tree whose names would leave the folder', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'folder-restore-'));
    try {
      const repo = await Repository.init(new LocalBackend(join(dir, 'repo')), 'pw', { kdf: fastKdf });
      const node = (name: string, type: TreeNode['type']): TreeNode => ({
        name: Buffer.from(name).toString('base64'),
        type,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtimeNs: '0',
        ctimeNs: '0',
        inode: '1',
        size: 0,
      });
      mkdirSync(join(dir, 'outside'));
      for (const bad of ['..', 'x/../../outside/f', '.', '']) {
        const tree = await repo.saveBlob('tree', Buffer.from(JSON.stringify({ nodes: [{ ...node(bad, 'file'), content: [] }] })));
        const out = mkdtempSync(join(dir, 'out-'));
        await assert.rejects(restoreVolumeToFolder(repo, snapshotVolume(tree.id, node('', 'dir')), out), CorruptArchiveError, `name '${bad}'`);
        assert.deepEqual(readdirSync(out), []);
      }
      assert.deepEqual(readdirSync(join(dir, 'outside')), []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
