/**
 * The retry wrapper over the fault-injecting one: what is retried (resets, throttling, short
 * reads) and what never is (missing files, permissions, "not a repository", cancellation), the
 * backoff with its jitter and bounds, the messages it hands to the CLI — on an injected clock, so
 * no test waits. And the whole Backend contract through random faults and retries.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { RepositoryError, TargetNotEmptyError } from '../errors.js';
import type { Clock } from '../clock.js';
import type { Backend, FileKind } from './backend.js';
import { conformance } from './conformance.js';
import { FaultyBackend, type FaultRule } from './faulty.js';
import { LocalBackend } from './local.js';
import { MemoryBackend } from './memory.js';
import { RetryBackend, ShortReadError, transientReason, type RetryEvent, type RetryOptions } from './retry.js';

/** A clock whose sleeps return at once and move time forward by what they slept. */
class InstantClock implements Clock {
  time = Date.UTC(2026, 0, 1);
  slept: number[] = [];
  now(): number {
    return this.time;
  }
  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(signal.reason as Error);
    this.slept.push(ms);
    this.time += ms;
    return Promise.resolve();
  }
  schedule(): () => void {
    return () => undefined;
  }
}

const code = (c: string, message = c): Error => Object.assign(new Error(message), { code: c });
const name64 = 'ab'.repeat(32);

async function setup(rules: FaultRule[], options: RetryOptions = {}): Promise<{ memory: MemoryBackend; faulty: FaultyBackend; retry: RetryBackend; clock: InstantClock; events: RetryEvent[] }> {
  const memory = new MemoryBackend();
  await memory.create();
  const faulty = new FaultyBackend(memory, { rules });
  const clock = new InstantClock();
  const events: RetryEvent[] = [];
  const retry = new RetryBackend(faulty, { clock, random: () => 0.5, onRetry: (e) => events.push(e), ...options });
  return { memory, faulty, retry, clock, events };
}

void describe('RetryBackend', () => {
  void it('retries a save through resets and throttling, with growing pauses, and tells each retry', async () => {
    const throttle = (): Error => Object.assign(new Error('Please reduce your request rate.'), { name: 'SlowDown', $metadata: { httpStatusCode: 503 } });
    const { memory, faulty, retry, clock, events } = await setup([
      { method: 'save', nth: [1, 2, 3], error: (call) => (call.endsWith('(#3)') ? throttle() : code('ECONNRESET', 'read ECONNRESET')) },
    ]);
    await retry.save('data', name64, [Buffer.from('a '), Buffer.from('pack')]);
    assert.equal(memory.raw('data', name64)?.toString(), 'a pack');
    assert.equal(faulty.count('save'), 4);
    assert.deepEqual(clock.slept, [500, 1000, 2000], 'exponential backoff (jitter at its middle)');
    assert.deepEqual(
      events.map((e) => e.message),
      [
        'retrying save of data/abababab… (attempt 2/10): connection reset',
        'retrying save of data/abababab… (attempt 3/10): connection reset',
        'retrying save of data/abababab… (attempt 4/10): SlowDown (HTTP 503)',
      ],
    );
  });

  void it('never retries a missing file, a permission error, "not a repository" or a full disk', async () => {
    const { faulty, retry, events } = await setup([
      { method: 'remove', times: 5, error: () => code('EACCES', 'permission denied') },
      { method: 'list', times: 5, error: () => new RepositoryError('no repository at memory:') },
      { method: 'stat', times: 5, error: () => Object.assign(new Error('Forbidden'), { $metadata: { httpStatusCode: 403 } }) },
      { method: 'save', times: 5, error: () => code('ENOSPC', 'no space left on device') },
    ]);
    await assert.rejects(retry.load('index', 'nothing'), (e: unknown) => (e as NodeJS.ErrnoException).code === 'ENOENT');
    await assert.rejects(retry.remove('data', name64), /permission denied/);
    await assert.rejects(retry.list('data'), RepositoryError);
    await assert.rejects(retry.stat('data', name64), /Forbidden/);
    await assert.rejects(retry.save('data', name64, Buffer.from('x')), /no space/);
    for (const method of ['load', 'remove', 'list', 'stat', 'save'] as const) assert.equal(faulty.count(method), 1, `${method} tried once`);
    assert.deepEqual(events, []);
    const created = new RetryBackend(new MemoryBackend(), { clock: new InstantClock() });
    await created.save('config', 'config', Buffer.from('c'));
    await assert.rejects(created.create(), TargetNotEmptyError);
  });

  void it('gives up after the attempts, with the last error unchanged', async () => {
    const errors: Error[] = [];
    const { faulty, retry, events } = await setup([{ method: 'list', times: 100, error: () => errors[errors.push(code('ETIMEDOUT', `timeout ${errors.length + 1}`)) - 1]! }], { attempts: 4 });
    await assert.rejects(retry.list('snapshots'), (e: unknown) => e === errors[3]);
    assert.equal(faulty.count('list'), 4);
    assert.deepEqual(
      events.map((e) => [e.attempt, e.attempts, e.reason]),
      [
        [2, 4, 'timed out'],
        [3, 4, 'timed out'],
        [4, 4, 'timed out'],
      ],
    );
  });

  void it('gives up when the next pause would pass the total time, and caps each pause', async () => {
    const { faulty, retry, clock } = await setup([{ method: 'stat', times: 100, error: () => code('ECONNREFUSED') }], {
      attempts: 100,
      maxDelayMs: 5000,
      maxElapsedMs: 20_000,
    });
    await assert.rejects(retry.stat('data', name64), /ECONNREFUSED/);
    assert.deepEqual(clock.slept, [500, 1000, 2000, 4000, 5000, 5000], 'doubling, then capped; 17.5 s slept, the next 5 s would pass 20 s');
    assert.equal(faulty.count('stat'), 7);
  });

  void it('jitter spreads pauses between half and one and a half times the backoff', async () => {
    for (const [random, expected] of [
      [0, [250, 500, 1000]],
      [0.999, [750, 1499, 2998]],
    ] as const) {
      const { retry, clock } = await setup([{ method: 'exists', times: 3, error: () => code('ECONNRESET') }], { random: () => random });
      assert.equal(await retry.exists(), false);
      assert.deepEqual(clock.slept, expected);
    }
  });

  void it('retries a ranged load that came back short, but not one that ended with the file', async () => {
    const memory = new MemoryBackend();
    await memory.create();
    await memory.save('data', name64, Buffer.from('0123456789'));
    let shortened = 0;
    const cutting: Backend = {
      ...memory,
      location: 'cutting',
      exists: () => memory.exists(),
      create: () => memory.create(),
      save: (k: FileKind, n: string, d: Buffer | Buffer[]) => memory.save(k, n, d),
      list: (k: FileKind) => memory.list(k),
      stat: (k: FileKind, n: string) => memory.stat(k, n),
      remove: (k: FileKind, n: string) => memory.remove(k, n),
      load: async (k: FileKind, n: string, range?: { offset: number; length: number }) => {
        const data = await memory.load(k, n, range);
        return shortened++ < 2 ? data.subarray(0, 3) : data;
      },
    };
    const events: RetryEvent[] = [];
    const retry = new RetryBackend(cutting, { clock: new InstantClock(), onRetry: (e) => events.push(e) });
    assert.equal((await retry.load('data', name64, { offset: 2, length: 6 })).toString(), '234567');
    assert.equal(shortened, 3);
    assert.match(events[0]!.message, /^retrying load of data\/abababab… \(attempt 2\/10\): short read$/);
    assert.ok(events[0]!.error instanceof ShortReadError);
    events.length = 0;
    assert.equal((await retry.load('data', name64, { offset: 7, length: 100 })).toString(), '789', 'the file ends there: no retry');
    assert.equal((await retry.load('data', name64, { offset: 70, length: 4 })).toString(), '');
    assert.deepEqual(events, []);
  });

  void it('stops retrying when its signal aborts', async () => {
    const controller = new AbortController();
    const { faulty, retry } = await setup([{ method: 'list', times: 100, error: () => code('ECONNRESET') }], {
      signal: controller.signal,
      onRetry: (e) => {
        if (e.attempt === 3) controller.abort(new Error('interrupted'));
      },
    });
    await assert.rejects(retry.list('data'), /interrupted/);
    assert.equal(faulty.count('list'), 2);
  });

  void it('has the optional methods exactly when the wrapped backend does', () => {
    const overMemory = new RetryBackend(new MemoryBackend());
    assert.equal(overMemory.stage, undefined, 'no staging: the packer then saves whole packs');
    assert.equal(overMemory.localPath, undefined, 'no local path: reads go through load, and so through retries');
    assert.equal(typeof overMemory.listTemporary, 'function');
    assert.equal(overMemory.close, undefined, 'nothing to close');
    const overLocal = new RetryBackend(new LocalBackend('/nonexistent/repo'));
    assert.equal(typeof overLocal.stage, 'function');
    assert.equal(overLocal.localPath?.('data', name64), `/nonexistent/repo/data/ab/${name64}`);
  });

  void it('retries the optional methods that are idempotent, with their own messages', async () => {
    const { memory, faulty, retry, events } = await setup([{ method: 'removeTemporary', times: 2, error: () => code('ECONNRESET') }]);
    memory.plantTemporary('data', 'ab/.tmp-1', 10);
    const [leftover] = await retry.listTemporary!();
    await retry.removeTemporary!(leftover!);
    assert.deepEqual(await memory.listTemporary(), []);
    assert.equal(faulty.count('removeTemporary'), 3);
    assert.equal(events[0]?.message, 'retrying remove of temporary data/ab/.tmp-1 (attempt 2/10): connection reset');
  });

  void it('tells transient failures from permanent ones, also through causes', () => {
    const cases: [unknown, string | undefined][] = [
      [code('ECONNRESET'), 'connection reset'],
      [code('EPIPE'), 'connection closed while sending'],
      [Object.assign(new TypeError('fetch failed'), { cause: code('UND_ERR_SOCKET', 'other side closed') }), 'connection reset'],
      [Object.assign(new Error('x'), { statusCode: 429 }), 'HTTP 429'],
      [Object.assign(new Error('x'), { status: 502 }), 'HTTP 502'],
      [Object.assign(new Error('x'), { name: 'SlowDown', $metadata: { httpStatusCode: 503 } }), 'SlowDown (HTTP 503)'],
      [Object.assign(new Error('x'), { name: 'RequestTimeout', $metadata: { httpStatusCode: 400 } }), 'RequestTimeout (HTTP 400)'],
      [Object.assign(new Error('x'), { name: 'InvalidRange', $metadata: { httpStatusCode: 416 } }), undefined],
      [Object.assign(new Error('channel closed'), { transient: true }), 'channel closed'],
      [new ShortReadError('short'), 'short read'],
      [code('ENOENT'), undefined],
      [code('EACCES'), undefined],
      [code('EIO'), undefined],
      [Object.assign(new Error('x'), { $metadata: { httpStatusCode: 404 } }), undefined],
      [Object.assign(new Error('aborted'), { name: 'AbortError', cause: code('ECONNRESET') }), undefined],
      [Object.assign(new Error('permanent'), { code: 'EACCES', cause: code('ECONNRESET') }), undefined],
      [new RepositoryError('no repository at sftp:host:/x'), undefined],
      ['a string', undefined],
    ];
    for (const [error, reason] of cases) assert.equal(transientReason(error), reason, String((error as Error).message ?? error));
  });

  void it('gets a flaky store through thousands of calls (seeded): every fault kind met, every byte right', async () => {
    const run = async (seed: number): Promise<Map<string, number>> => {
      const memory = new MemoryBackend();
      const faulty = new FaultyBackend(memory, {
        random: { seed, probability: { save: 0.3, load: 0.3, list: 0.3, stat: 0.3, remove: 0.3, exists: 0.3, create: 0.3 } },
      });
      const retry = new RetryBackend(faulty, { clock: new InstantClock() });
      await retry.create();
      const files = Array.from({ length: 300 }, (_, i) => Buffer.from(`file ${i} `.repeat(1 + (i % 50))));
      const name = (i: number): string => i.toString(16).padStart(64, '0');
      await Promise.all(files.map((data, i) => retry.save('data', name(i), [data.subarray(0, 3), data.subarray(3)])));
      assert.equal((await retry.list('data')).length, files.length);
      for (const [i, data] of files.entries()) {
        assert.ok((await retry.load('data', name(i))).equals(data));
        assert.ok((await retry.load('data', name(i), { offset: 2, length: 20 })).equals(data.subarray(2, 22)), `range of file ${i}`);
      }
      await Promise.all(files.map((_, i) => (i % 2 === 0 ? retry.remove('data', name(i)) : Promise.resolve())));
      assert.equal((await memory.list('data')).length, 150);
      return new Map(faulty.randomFaults);
    };
    const faults = await run(42);
    for (const kind of ['throttle', 'reset', 'drop', 'lost-reply', 'short-read']) assert.ok((faults.get(kind) ?? 0) > 10, `${kind}: ${faults.get(kind)}`);
    assert.deepEqual(await run(42), faults, 'the same seed gives the same faults');
  });
});

// The whole contract holds through a flaky store and the retries (latency included).
conformance(
  'memory behind random faults and retries',
  () => {
    const faulty = new FaultyBackend(new MemoryBackend(), {
      random: { seed: 7, latencyMs: 2, probability: { save: 0.2, load: 0.2, list: 0.2, stat: 0.2, remove: 0.2, exists: 0.2, create: 0.2 } },
    });
    return { backend: new RetryBackend(faulty, { clock: new InstantClock() }), dispose: () => undefined };
  },
  { largeSize: 4 << 20 },
);
