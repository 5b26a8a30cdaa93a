/**
 * The start of a repository command against a remote store (`restore latest`, as cli/main.ts and
 * restore/snapshot-restore.ts run it): open the repository, take the lock, resolve the snapshot,
 * load the index. Every request to a remote store costs a round trip; what does not depend on
 * another request's answer must not wait for it, and what does (the lock before the snapshots,
 * the snapshot listing before the index listing) still must. Counted in rounds
 * (backend/round-trips.ts: requests made side by side share one), never in time.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Backend } from '../backend/backend.js';
import { withCache, type CachedBackend } from '../backend/cache.js';
import { ForwardingBackend } from '../backend/forwarding.js';
import { MemoryBackend } from '../backend/memory.js';
import { RoundTripBackend, type RecordedCall } from '../backend/round-trips.js';
import { CorruptArchiveError, LockedError, RepositoryError, UsageError, WrongPasswordError } from '../errors.js';
import { inOrder, STOP } from './in-order.js';
import { createKeyFile, openMasterKey } from './keys.js';
import { acquireLock } from './locks.js';
import { Repository, sha256 } from './repository.js';
import { resolveSnapshot } from './snapshots.js';
import { initTestRepository, prngBytes, TEST_KDF, writeSnapshot } from './testing.js';

const LOCATION = 's3:http://127.0.0.1:9000/bucket/repo';

/** A repository of `count` backups (an index file each), with a backup of another host running. */
async function remoteRepository(count = 8): Promise<{ memory: MemoryBackend; latest: string }> {
  const memory = new MemoryBackend({ location: LOCATION });
  const repo = await initTestRepository(memory);
  let latest = '';
  for (let i = 0; i < count; i++) {
    latest = await writeSnapshot(repo, { [`f${i}`]: prngBytes(i + 1, 5000) }, { time: new Date(Date.UTC(2026, 10, 1 + i)).toISOString() });
  }
  await acquireLock(memory, 'backup', { hostname: 'other-host', pid: 7, refreshIntervalMs: 3600_000 });
  return { memory, latest };
}

/** What `restore latest` does before its first data byte. */
async function startRestore(backend: Backend): Promise<{ repo: Repository; snapshot: string; release: () => Promise<void> }> {
  const repo = await Repository.open(backend, 'pw', { locks: { hostname: 'this-host', pid: 8 } });
  const lock = await repo.lock('restore');
  const found = await resolveSnapshot(repo, 'latest');
  await repo.loadIndex();
  return { repo, snapshot: found.id, release: () => lock.release() };
}

/** The round of the first call that matches (`last`: of the last one). */
function roundOf(calls: RecordedCall[], method: RecordedCall['method'], kind: RecordedCall['kind'], which: 'first' | 'last' = 'first'): number {
  const matching = calls.filter((c) => c.method === method && c.kind === kind);
  const call = which === 'first' ? matching[0] : matching[matching.length - 1];
  assert.ok(call, `a ${method} of ${kind}`);
  return call.round;
}

function show(calls: RecordedCall[]): string {
  return calls.map((c) => `${c.round}:${c.method} ${c.kind ?? ''}${c.name && c.kind !== 'config' ? `/${c.name.slice(0, 6)}` : ''}`).join(', ');
}

/** The order the repository's guarantees need, whatever else runs side by side. */
function assertOrder(calls: RecordedCall[], ownLock: string): void {
  assert.equal(calls.filter((c) => c.method === 'exists').length, 0, 'a missing config says there is no repository: no request asks first');
  // The listing that decides whether we hold the lock is the last one (an earlier one only reads
  // the lock files already there, while ours is written).
  assert.ok(roundOf(calls, 'save', 'locks') < roundOf(calls, 'list', 'locks', 'last'), 'our lock file is written before the locks are listed');
  assert.ok(roundOf(calls, 'list', 'locks', 'last') < roundOf(calls, 'list', 'snapshots'), 'the lock is held before the snapshots are read');
  const decided = roundOf(calls, 'list', 'locks', 'last');
  assert.ok(
    calls.filter((c) => c.kind === 'locks' && c.method === 'load').every((c) => c.round <= decided),
    'the other locks were read by the time the deciding listing came back',
  );
  assert.ok(roundOf(calls, 'list', 'snapshots') < roundOf(calls, 'list', 'index'), 'the index is listed after the snapshots: it has the blobs of every snapshot listed');
  assert.equal(calls.filter((c) => c.method === 'load' && c.kind === 'locks' && c.name === ownLock).length, 0, 'our own lock file is not read back');
  const loads = calls.filter((c) => c.method === 'load').map((c) => `${c.kind}/${c.name}`);
  assert.deepEqual(loads, [...new Set(loads)], 'no file is loaded twice');
}

void describe('start-up against a remote store', () => {
  void it('restore latest: open, lock, resolve and index in 7 rounds with a cold cache (was 26), 5 with a warm one (was 10)', async () => {
    const { memory, latest } = await remoteRepository();
    const dir = mkdtempSync(join(tmpdir(), 'startup-'));
    try {
      const results: { rounds: number; simulatedMs: number }[] = [];
      for (const warm of [false, true]) {
        const remote = new RoundTripBackend(memory);
        const backend = await withCache(remote, { dir });
        const report = await remote.measure(() => startRestore(backend));
        const { repo, snapshot, release } = report.value;
        assert.equal(snapshot, latest);
        assert.ok([...repo.blobIds()].length >= 16, 'the index of every backup is loaded');
        await release();
        const calls = report.calls;
        assertOrder(calls, calls.find((c) => c.method === 'save' && c.kind === 'locks')!.name!);
        assert.deepEqual(
          calls.filter((c) => c.round === 1).map((c) => `${c.method} ${c.kind}`).sort(),
          warm ? ['list keys', 'load config', 'load keys'] : ['list keys', 'load config'],
          'the config is loaded while the keys are listed (and, once the cache knows it, the key file loaded)',
        );
        const rounds = (kind: 'snapshots' | 'index'): Set<number> => new Set(calls.filter((c) => c.method === 'load' && c.kind === kind).map((c) => c.round));
        if (warm) {
          assert.equal(rounds('snapshots').size + rounds('index').size, 0, 'snapshots and index files come from the cache');
        } else {
          assert.equal(rounds('snapshots').size, 1, `the snapshots are loaded side by side: ${show(calls)}`);
          assert.equal(rounds('index').size, 1, `the index files are loaded side by side: ${show(calls)}`);
          assert.ok(roundOf(calls, 'list', 'index') <= Math.min(...rounds('snapshots')), 'the index is listed while the snapshots load');
        }
        assert.ok(report.rounds <= (warm ? 5 : 7), `${warm ? 'warm' : 'cold'} cache: ${report.rounds} rounds: ${show(calls)}`);
        results.push(report);
      }
      // Without a cache as with a cold one.
      const remote = new RoundTripBackend(memory);
      const report = await remote.measure(() => startRestore(remote));
      await report.value.release();
      assert.ok(report.rounds <= 7, `no cache: ${report.rounds} rounds: ${show(report.calls)}`);
      assertOrder(report.calls, report.calls.find((c) => c.method === 'save' && c.kind === 'locks')!.name!);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void it('forty backups cost a few rounds more, not eighty (a few loads at a time)', async () => {
    const { memory } = await remoteRepository(40);
    const remote = new RoundTripBackend(memory);
    const report = await remote.measure(() => startRestore(remote));
    await report.value.release();
    // 2 open + 2 lock + 1 snapshot listing + 1 index listing + 40 index files 8 at a time (was 90).
    assert.ok(report.rounds <= 11, `${report.rounds} rounds: ${show(report.calls)}`);
  });

  void it('the locks read while ours is written decide nothing: a lock written meanwhile still stops us, one released meanwhile does not', async () => {
    const { memory } = await remoteRepository(1);
    for (const lock of await memory.list('locks')) await memory.remove('locks', lock.name);
    /** Runs `race` once, right before our lock file is written (after the early listing). */
    class Racing extends ForwardingBackend {
      race: (() => Promise<void>) | undefined;
      override async save(...args: Parameters<Backend['save']>): Promise<void> {
        const race = args[0] === 'locks' ? this.race : undefined;
        this.race = undefined;
        await race?.();
        return super.save(...args);
      }
    }
    const backend = new Racing(memory);
    const repo = await Repository.open(backend, 'pw', { locks: { hostname: 'this-host', pid: 8 } });
    backend.race = async () => {
      await acquireLock(memory, 'prune', { hostname: 'other-host', pid: 9, refreshIntervalMs: 3600_000 });
    };
    await assert.rejects(repo.lock('restore'), LockedError, 'a prune that locked while we wrote our lock file is seen');
    assert.equal((await memory.list('locks')).length, 1, 'ours is removed again, the prune keeps its lock');
    const [prune] = await memory.list('locks');
    backend.race = () => memory.remove('locks', prune!.name);
    const lock = await repo.lock('restore');
    await lock.release();
  });

  void it('the cached copy of the key file is used only when the remote holds the same bytes', async () => {
    const memory = new MemoryBackend({ location: LOCATION });
    await initTestRepository(memory);
    const { master } = await openMasterKey(memory, 'pw');
    const second = await createKeyFile(master, 'pw2', TEST_KDF, new Date());
    await memory.save('keys', sha256(second), second);
    const dir = mkdtempSync(join(tmpdir(), 'startup-'));
    try {
      const backend = (await withCache(memory, { dir })) as CachedBackend;
      await Repository.open(backend, 'pw2');
      const hint = await backend.keyHint();
      assert.equal(hint?.name, sha256(second));
      assert.ok(hint.file?.equals(second), 'a copy of the key file that opened is kept');
      // The copy opens the next time (same bytes on the remote).
      await Repository.open(backend, 'pw2');
      // The key is removed on the remote (its password revoked): the copy in the cache opens nothing.
      await memory.remove('keys', sha256(second));
      await assert.rejects(Repository.open(backend, 'pw2'), WrongPasswordError);
      // A copy that is another key file under the remote file's name (a hostile or stale cache):
      // the remote's file decides, and the repository opens with its master key.
      await memory.save('keys', sha256(second), second);
      const other = await createKeyFile(prngBytes(7, 32), 'pw2', TEST_KDF, new Date());
      writeFileSync(join(backend.dir, 'key'), `${sha256(second)}\n${other.toString('base64')}\n`);
      const repo = await Repository.open(backend, 'pw2');
      assert.ok((await backend.keyHint())?.file?.equals(second), 'the copy is replaced by the remote bytes');
      await repo.lock('restore').then((l) => l.release());
      // A copy that is not a key file, or not base64, is ignored.
      writeFileSync(join(backend.dir, 'key'), `${sha256(second)}\n${Buffer.from('{"kdf":{"N":1073741824}}').toString('base64')}\n`);
      await Repository.open(backend, 'pw2');
      writeFileSync(join(backend.dir, 'key'), `${sha256(second)}\n../../etc\n`);
      assert.deepEqual(await backend.keyHint(), { name: sha256(second) });
      await Repository.open(backend, 'pw2');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void it('a key hint that is stale, foreign or not a name still opens the repository with the right key', async () => {
    const memory = new MemoryBackend({ location: LOCATION });
    await initTestRepository(memory);
    const dir = mkdtempSync(join(tmpdir(), 'startup-'));
    try {
      const backend = (await withCache(memory, { dir })) as CachedBackend;
      await Repository.open(backend, 'pw');
      const [first] = await memory.list('keys');
      assert.equal((await backend.keyHint())?.name, first!.name, 'the key that opened is remembered');
      // Another password's key, remembered by another user of this cache: tried, then the listing.
      const foreign = await createKeyFile(prngBytes(99, 32), 'other password', TEST_KDF, new Date());
      await memory.save('keys', sha256(foreign), foreign);
      await backend.rememberKey(sha256(foreign));
      await Repository.open(backend, 'pw');
      assert.equal((await backend.keyHint())?.name, first!.name, 'the key that opened this time is remembered');
      // A hint naming a key that is gone.
      await backend.rememberKey('ab'.repeat(32));
      await Repository.open(backend, 'pw');
      // A hint that is not a key name is never used as a path.
      writeFileSync(join(backend.dir, 'key'), '../config\n');
      assert.equal(await backend.keyHint(), undefined);
      await Repository.open(backend, 'pw');
      assert.equal((await backend.keyHint())?.name, first!.name);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void it('says there is no repository where there is no config, and names the first failure first', async () => {
    await assert.rejects(Repository.open(new MemoryBackend({ location: LOCATION }), 'pw'), (e: unknown) => e instanceof RepositoryError && /no repository at/.test(e.message));
    const { memory } = await remoteRepository(2);
    const [index] = await memory.list('index');
    memory.replace('index', index!.name, Buffer.from('damaged'));
    const repo = await Repository.open(memory, 'pw');
    await assert.rejects(resolveSnapshot(repo, 'ffffffff'), UsageError, 'a snapshot that does not exist is said so, before the damaged index');
    await assert.rejects(resolveSnapshot(repo, 'latest'), (e: unknown) => e instanceof CorruptArchiveError && e.message.includes(index!.name.slice(0, 12)));
    await assert.rejects(repo.loadIndex(), CorruptArchiveError, 'and loading the index again fails the same way');
  });

  void it('inOrder: at most `width` loads at a time, results used in order, nothing after STOP', async () => {
    let running = 0;
    let most = 0;
    const used: number[] = [];
    const started: number[] = [];
    await inOrder(
      [5, 1, 4, 2, 3, 0, 6],
      3,
      async (n) => {
        started.push(n);
        running++;
        most = Math.max(most, running);
        await new Promise((resolve) => setTimeout(resolve, n));
        running--;
        if (n === 6) throw new Error('never used');
        return n;
      },
      async (outcome) => {
        const n = await outcome;
        used.push(n);
        return n === 0 ? STOP : undefined;
      },
    );
    assert.deepEqual(used, [5, 1, 4, 2, 3, 0]);
    assert.equal(most, 3);
    assert.ok(started.length <= 7);
  });
});
