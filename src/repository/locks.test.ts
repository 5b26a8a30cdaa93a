/**
 * Repository locks on the memory backend, with an injected clock, host name and process table:
 * modes, stale rules, refresh, losing a lock, and waiting for one — no sleeping.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBackend } from '../backend/memory.js';
import { FaultyBackend } from '../backend/faulty.js';
import { ManualClock, type Clock } from '../clock.js';
import { LockLostError, LockedError } from '../errors.js';
import type { Backend } from '../backend/backend.js';
import type { LockOperation, LockOptions } from './locks.js';
import { listLocks } from './locks.js';
import type { Repository } from './repository.js';
import { initTestRepository, openTestRepository, prngBytes, writeSnapshot } from './testing.js';

const MIN = 60_000;

/** Processes on hosts: each "process" is a Repository opened with its own host name and pid. */
class World {
  readonly clock = new ManualClock();
  readonly backend = new MemoryBackend({ now: () => this.clock.now() });
  /** pids alive, per host */
  private readonly alive = new Map<string, Set<number>>();
  private nextPid = 100;

  async init(): Promise<void> {
    await initTestRepository(this.backend);
  }

  lockOptions(host: string, pid: number, extra: LockOptions = {}): LockOptions {
    return { clock: this.clock, hostname: host, pid, processAlive: (p) => this.alive.get(host)?.has(p) ?? false, ...extra };
  }

  /**
   * A new process on `host` with the repository open. `freeze()` stops it (SIGSTOP: its timers no
   * longer fire, so its lock is not refreshed); `kill()` also ends it (SIGKILL).
   */
  async process(
    host = 'host-a',
    extra: LockOptions & { backend?: Backend } = {},
  ): Promise<{ pid: number; repo: Repository; freeze: () => void; kill: () => void }> {
    const pid = this.nextPid++;
    if (!this.alive.has(host)) this.alive.set(host, new Set());
    this.alive.get(host)!.add(pid);
    let frozen = false;
    const shared = this.clock;
    const clock: Clock = {
      now: () => shared.now(),
      sleep: (ms, signal) => shared.sleep(ms, signal),
      schedule: (ms, task) => shared.schedule(ms, () => (frozen ? undefined : task())),
    };
    const repo = await openTestRepository(extra.backend ?? this.backend, { locks: { ...this.lockOptions(host, pid, extra), clock } });
    return {
      pid,
      repo,
      freeze: () => (frozen = true),
      kill: () => {
        frozen = true;
        this.alive.get(host)!.delete(pid);
      },
    };
  }

  async locks(): Promise<{ operation?: string; hostname?: string; pid?: number; exclusive: boolean; time?: string }[]> {
    return (await listLocks(this.backend, { clock: this.clock, hostname: '?' })).map(({ operation, hostname, pid, exclusive, time }) => ({
      ...(operation !== undefined ? { operation } : {}),
      ...(hostname !== undefined ? { hostname } : {}),
      ...(pid !== undefined ? { pid } : {}),
      exclusive,
      ...(time !== undefined ? { time } : {}),
    }));
  }
}

async function world(): Promise<World> {
  const w = new World();
  await w.init();
  return w;
}

void describe('repository locks: modes', () => {
  void it('shared locks overlap: backup, import, check, restore and export at once', async () => {
    const w = await world();
    const held = [];
    for (const op of ['backup', 'import', 'check', 'restore', 'export'] as LockOperation[]) held.push(await (await w.process()).repo.lock(op));
    assert.equal((await w.locks()).length, 5);
    assert.ok((await w.locks()).every((l) => !l.exclusive));
    for (const l of held) await l.release();
    assert.deepEqual(await w.locks(), []);
  });

  void it('an exclusive lock is refused while a shared one is held, and the other way round; two exclusive ones too', async () => {
    const w = await world();
    for (const [first, second] of [
      ['backup', 'prune'],
      ['check', 'forget'],
      ['prune', 'check'],
      ['forget', 'backup'],
      ['prune', 'repair-index'],
      ['repair-index', 'prune'],
    ] as [LockOperation, LockOperation][]) {
      const holder = await (await w.process()).repo.lock(first);
      const other = await w.process();
      await assert.rejects(other.repo.lock(second), (e: unknown) => e instanceof LockedError && e.exitCode === 10 && e.message.includes(first), `${second} after ${first}`);
      await holder.release();
      const then = await other.repo.lock(second);
      await then.release();
    }
  });

  void it('the lock file says who holds it: host name, pid, time, mode and operation', async () => {
    const w = await world();
    const p = await w.process('host-x');
    const lock = await p.repo.lock('prune');
    assert.deepEqual(await w.locks(), [{ operation: 'prune', hostname: 'host-x', pid: p.pid, exclusive: true, time: new Date(w.clock.now()).toISOString() }]);
    await lock.release();
  });

  void it('takers that race never both get an exclusive lock', async () => {
    for (let round = 0; round < 30; round++) {
      const w = await world();
      const a = await w.process();
      const b = await w.process('host-b');
      const results = await Promise.allSettled([a.repo.lock('prune'), b.repo.lock(round % 2 ? 'forget' : 'backup')]);
      const won = results.filter((r) => r.status === 'fulfilled');
      assert.ok(won.length <= 1, `round ${round}: both got the lock`);
      for (const r of results) if (r.status === 'rejected') assert.ok(r.reason instanceof LockedError, String(r.reason));
      for (const r of won) await r.value.release();
    }
  });
});

void describe('repository locks: stale rules', () => {
  void it("a lock of a process that is gone on this host is stale and removed; another host's is not", async () => {
    const w = await world();
    const local = await w.process('host-a');
    await local.repo.lock('backup');
    local.kill(); // SIGKILL: no release, no more refreshes from a dead process are possible here
    const prune = await (await w.process('host-a')).repo.lock('prune');
    assert.equal((await w.locks()).length, 1, 'the dead holder’s file was removed');
    await prune.release();

    const remote = await w.process('host-b');
    await remote.repo.lock('backup');
    remote.kill(); // gone, but host-a cannot know that
    await assert.rejects((await w.process('host-a')).repo.lock('prune'), LockedError);
  });

  void it('another host’s lock turns stale only after 30 minutes without refresh', async () => {
    const w = await world();
    // A holder on host-b that was killed: its lock file stays as it was last written.
    const remote = await w.process('host-b');
    await remote.repo.lock('backup');
    remote.kill();
    await w.clock.advance(29 * MIN);
    await assert.rejects((await w.process('host-a')).repo.lock('prune'), LockedError, '29 minutes: not stale yet');
    await w.clock.advance(2 * MIN);
    const prune = await (await w.process('host-a')).repo.lock('prune');
    await prune.release();
  });

  void it('refreshing keeps a lock alive however long it is held: a new file, then the old one removed', async () => {
    const w = await world();
    const holder = await w.process('host-b');
    const lock = await holder.repo.lock('backup');
    const first = lock.fileName;
    for (let i = 0; i < 12; i++) {
      await w.clock.advance(5 * MIN);
      await assert.rejects((await w.process('host-a')).repo.lock('prune'), LockedError, `after ${(i + 1) * 5} min`);
    }
    assert.notEqual(lock.fileName, first);
    const files = await w.locks();
    assert.equal(files.length, 1, 'one file per holder');
    assert.equal(files[0]!.time, new Date(w.clock.now()).toISOString());
    await holder.repo.assertLockHeld();
    await lock.release();
    await (await (await w.process('host-a')).repo.lock('prune')).release();
  });
});

void describe('repository locks: a holder that lost its lock stops before writing an index or a snapshot', () => {
  void it('its lock file vanished (a process judged it stale while the holder was frozen): LockLostError, nothing written', async () => {
    const w = await world();
    const writer = await w.process('host-a');
    const lock = await writer.repo.lock('backup');
    await writer.repo.loadIndex();
    await writer.repo.saveBlob('data', prngBytes(1, 10_000));
    writer.freeze(); // SIGSTOP, a suspended VM: no refresh for 31 minutes
    await w.clock.advance(31 * MIN);
    const pruneLock = await (await w.process('host-b')).repo.lock('prune'); // stale by the storage's clock: removed
    await assert.rejects(writer.repo.flush(), LockLostError);
    await assert.rejects(writer.repo.saveObject('snapshots', { any: 1 }), (e: unknown) => e instanceof LockLostError && e.exitCode === 16);
    assert.equal((await w.backend.list('index')).length, 0, 'no index file written');
    assert.equal((await w.backend.list('snapshots')).length, 0, 'no snapshot written');
    assert.ok(lock.signal.aborted && lock.signal.reason instanceof LockLostError, 'the lock’s signal aborts the operation');
    await pruneLock.release();
  });

  void it('a lock file removed by hand is lost at the next check', async () => {
    const w = await world();
    const writer = await w.process('host-a');
    const lock = await writer.repo.lock('import');
    await w.backend.remove('locks', lock.fileName);
    await assert.rejects(writer.repo.saveObject('index', { packs: [] }), LockLostError);
    assert.equal((await w.backend.list('index')).length, 0);
  });

  void it('a host whose clock runs 3 hours ahead cannot take a live lock for stale (ages are on the storage’s clock)', async () => {
    const w = await world();
    const writer = await w.process('host-a');
    await writer.repo.lock('backup');
    const skewed = new ManualClock(w.clock.now() + 180 * MIN);
    const prune = await openTestRepository(w.backend, { locks: { clock: skewed, hostname: 'host-b', pid: 1 } });
    await assert.rejects(prune.lock('prune'), LockedError);
    await writer.repo.assertLockHeld();
  });

  void it('a lock that cannot be refreshed is lost after about 22 minutes (before others may call it stale), not after one failure', async () => {
    const w = await world();
    // The first lock save succeeds (taking the lock); every later one fails.
    const faulty = new FaultyBackend(w.backend, { rules: [{ method: 'save', kind: 'locks', nth: Array.from({ length: 50 }, (_, i) => i + 2) }] });
    const writer = await w.process('host-a', { backend: faulty });
    const lock = await writer.repo.lock('backup');
    await w.clock.advance(6 * MIN); // one refresh failed
    await writer.repo.assertLockHeld();
    assert.equal(lock.isLost, false);
    await w.clock.advance(17 * MIN); // 23 minutes without a refresh
    assert.equal(lock.isLost, true);
    await assert.rejects(writer.repo.saveObject('snapshots', { any: 1 }), LockLostError);
    await assert.rejects(writer.repo.saveObject('index', { packs: [] }), LockLostError);
    assert.equal((await w.backend.list('snapshots')).length + (await w.backend.list('index')).length, 0);
  });

  void it('a refresh that fails once and then works keeps the lock', async () => {
    const w = await world();
    const faulty = new FaultyBackend(w.backend, { rules: [{ method: 'save', kind: 'locks', nth: [2] }] });
    const writer = await w.process('host-a', { backend: faulty });
    await writer.repo.lock('backup');
    await w.clock.advance(60 * MIN);
    await writer.repo.assertLockHeld();
    await writer.repo.saveObject('snapshots', { any: 1 });
    assert.equal((await w.backend.list('snapshots')).length, 1);
  });

  void it('a holder frozen past the refresh deadline goes on only if its lock file is still there', async () => {
    const w = await world();
    const frozen = await w.process('host-a');
    await frozen.repo.lock('backup');
    frozen.freeze(); // stopped: no refresh
    await w.clock.advance(40 * MIN);
    await frozen.repo.assertLockHeld(); // nobody took it meanwhile: refreshed on the spot
    assert.equal((await w.locks())[0]!.time, new Date(w.clock.now()).toISOString());

    const other = await w.process('host-b');
    await other.repo.lock('backup');
    other.freeze();
    await w.clock.advance(40 * MIN);
    await (await (await w.process('host-c')).repo.lock('prune')).release(); // both locks stale: removed
    await assert.rejects(other.repo.assertLockHeld(), LockLostError);
  });
});

void describe('repository locks: --retry-lock', () => {
  void it('waits with growing pauses, then gets the lock once the holder is done', async () => {
    const w = await world();
    const holder = await w.process();
    const lock = await holder.repo.lock('backup');
    const waits: string[] = [];
    const waiter = await w.process('host-a', { retryForMs: 10 * MIN, onWait: (h) => waits.push(h.operation ?? '?') });
    let done = false;
    const taking = waiter.repo.lock('prune').then((l) => {
      done = true;
      return l;
    });
    await w.clock.advance(3 * MIN);
    assert.equal(done, false, 'still waiting while the backup runs');
    await lock.release();
    await w.clock.advance(1 * MIN);
    assert.equal(done, true);
    assert.deepEqual(waits, ['backup'], 'told once what it waits for');
    await (await taking).release();
  });

  void it('gives up with exit 10 when the wait is over', async () => {
    const w = await world();
    await (await w.process()).repo.lock('backup');
    const waiter = await w.process('host-a', { retryForMs: 5 * MIN });
    const taking = waiter.repo.lock('prune');
    const outcome = taking.then(
      () => 'locked',
      (e: unknown) => e,
    );
    await w.clock.advance(5 * MIN + 1);
    const error = await outcome;
    assert.ok(error instanceof LockedError, String(error));
    assert.equal(error.exitCode, 10);
    assert.match(error.message, /waited 5m/);
  });
});

void describe('repository locks and writers', () => {
  void it('a backup-like writer holding a shared lock writes index and snapshot while a check runs beside it', async () => {
    const w = await world();
    const writer = await w.process();
    const checker = await w.process('host-b');
    const a = await writer.repo.lock('backup');
    const b = await checker.repo.lock('check');
    await writeSnapshot(writer.repo, { f: prngBytes(3, 100_000) });
    assert.equal((await w.backend.list('snapshots')).length, 1);
    await a.release();
    await b.release();
  });
});
