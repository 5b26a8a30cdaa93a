/**
 * The repository on a flaky store: memory behind random faults (throttling, resets, uploads
 * dropped part-way, replies lost after the storage acted, short reads, latency; seeded) behind
 * the retry wrapper, as every remote backend is opened. Real file trees are backed up three times
 * as they change, the oldest snapshot is forgotten and pruned (repacking), and the end is what a
 * user checks: `check --read-data` clean and a byte-exact restore of every snapshot kept.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { FaultyBackend } from '../backend/faulty.js';
import { MemoryBackend } from '../backend/memory.js';
import { RetryBackend, type RetryEvent } from '../backend/retry.js';
import { Archiver } from './archiver.js';
import { checkRepository } from './check.js';
import { restoreVolumeToFolder } from './folder-restore.js';
import { pruneRepository } from './prune.js';
import type { Repository } from './repository.js';
import { applyRetention } from './retention.js';
import { listSnapshots } from './snapshots.js';
import { initTestRepository, instantClock, openTestRepository, prngBytes } from './testing.js';
import type { Snapshot } from './tree.js';


/** What a user would compare: every file's bytes and every symlink's target, by path. */
function contents(root: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (dir: string): void => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      const key = relative(root, path);
      if (entry.isDirectory()) walk(path);
      else if (entry.isSymbolicLink()) out.set(key, `-> ${readlinkSync(path)}`);
      else out.set(key, `${statSync(path).mode.toString(8)} ${readFileSync(path).toString('base64')}`);
    }
  };
  walk(root);
  return out;
}

async function backup(repo: Repository, src: string, time: string, parent?: string): Promise<{ id: string; tree: string }> {
  await repo.loadIndex();
  const archived = await new Archiver(repo).archive(src, parent);
  await repo.flush();
  const snapshot: Snapshot = {
    version: 1,
    time,
    hostname: 'test',
    tool: 'test',
    project: 'p',
    cvat: { version: '2.73.0', versionSource: 'given', serverImage: null, serverImageDigest: null },
    downtimeMs: 0,
    durationMs: 0,
    volumes: [{ composeName: 'cvat_data', name: 'p_cvat_data', role: 'media', mountPath: '/home/django/data', tree: archived.tree, root: archived.root, entries: 1000, files: 0, bytes: 0 }],
    skipped: [],
  };
  return { id: await repo.saveObject('snapshots', snapshot), tree: archived.tree };
}

void describe('the repository on a flaky store, through the retry wrapper', () => {
  void it('backs up, forgets, prunes, checks every byte clean and restores byte for byte', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'flaky-storage-'));
    try {
      const memory = new MemoryBackend();
      const faulty = new FaultyBackend(memory, {
        random: { seed: 20261126, latencyMs: 2, probability: { save: 0.4, load: 0.2, list: 0.2, stat: 0.2, remove: 0.2, exists: 0.2, create: 0.2 } },
      });
      const retries: RetryEvent[] = [];
      const store = new RetryBackend(faulty, { clock: instantClock(), onRetry: (e) => retries.push(e) });

      const src = join(dir, 'src');
      mkdirSync(join(src, 'data/tasks/1'), { recursive: true });
      writeFileSync(join(src, 'data/tasks/1/frame.bin'), prngBytes(1, 2_500_000));
      for (let i = 0; i < 30; i++) writeFileSync(join(src, `data/tasks/1/small-${i}.json`), JSON.stringify({ i, pad: 'x'.repeat(i * 97) }));
      writeFileSync(join(src, 'empty'), '');
      symlinkSync('data/tasks/1/small-3.json', join(src, 'link'));

      const repo = await initTestRepository(store);
      const expected = new Map<string, Map<string, string>>();
      const first = await backup(repo, src, '2026-11-01T00:00:00Z');
      expected.set(first.id, contents(src));

      writeFileSync(join(src, 'data/tasks/1/frame.bin'), prngBytes(2, 1_800_000));
      unlinkSync(join(src, 'data/tasks/1/small-7.json'));
      mkdirSync(join(src, 'data/tasks/2'));
      writeFileSync(join(src, 'data/tasks/2/new.bin'), prngBytes(3, 700_000));
      const second = await backup(await openTestRepository(store), src, '2026-11-02T00:00:00Z', first.tree);
      expected.set(second.id, contents(src));

      writeFileSync(join(src, 'data/tasks/1/small-1.json'), 'changed');
      const third = await backup(await openTestRepository(store), src, '2026-11-03T00:00:00Z', second.tree);
      expected.set(third.id, contents(src));

      // forget --keep-last 2 --prune
      const decision = applyRetention(await listSnapshots(await openTestRepository(store)), { last: 2 });
      assert.deepEqual(
        decision.remove.map((s) => s.id),
        [first.id],
      );
      for (const s of decision.remove) await store.remove('snapshots', s.id);
      expected.delete(first.id);
      const pruned = await pruneRepository(await openTestRepository(store), { maxUnused: 0 });
      assert.ok(pruned.packsDeleted > 0, 'the first backup left data to prune');

      const check = await checkRepository(await openTestRepository(store), { readData: true });
      assert.deepEqual(check.errors, []);
      assert.deepEqual(check.unindexed, [], 'no pack left behind by a retried upload');
      assert.ok(check.blobs > 0);

      const reader = await openTestRepository(store);
      await reader.loadIndex();
      for (const [id, want] of expected) {
        const snapshot = await reader.loadObject<Snapshot>('snapshots', id);
        const out = join(dir, `restore-${id.slice(0, 8)}`);
        mkdirSync(out);
        await restoreVolumeToFolder(reader, snapshot.volumes[0]!, out);
        assert.deepEqual(contents(out), want, `snapshot ${id.slice(0, 8)} restored byte for byte`);
      }

      // The store was really flaky, in every way, and the wrapper got through all of it.
      for (const kind of ['throttle', 'reset', 'drop', 'lost-reply', 'short-read']) assert.ok((faulty.randomFaults.get(kind) ?? 0) > 0, `no ${kind} fault was injected`);
      assert.ok(retries.length >= 20, `${retries.length} retries`);
      assert.ok(retries.some((e) => /^retrying save of data\/[0-9a-f]{8}… \(attempt \d+\/10\): /.test(e.message)));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
