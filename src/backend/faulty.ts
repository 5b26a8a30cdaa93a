/**
 * Fault injection around a real backend, for tests: failures scripted per method (and kind), as
 * kopia's tests do — "fail the 3rd save of a data pack", "fail the first two lists, then
 * succeed", "die at the 5th remove" (every later call fails too, as if the process had been
 * killed there) — or loads cut short. The wrapped backend stays real: what did happen, happened.
 *
 * Random faults (`random`) make a flaky network out of it, reproducibly (a seeded generator):
 * each call of a method fails with that method's probability, in one of the ways a remote store
 * fails — throttled (HTTP 503 SlowDown, 429), the connection reset before the request, dropped
 * part-way through a transfer (an upload that never lands; a download cut off), a reply lost
 * after the storage did the work (a save or remove that happened, reported as failed), a ranged
 * load that returns fewer bytes than it should — and every call may wait a random latency.
 * Every such fault is transient: the retry wrapper (retry.ts) must get through them.
 */
import type { Backend, FileHints, FileInfo, FileKind, TemporaryFile } from './backend.js';

export type BackendMethod = 'exists' | 'create' | 'save' | 'load' | 'list' | 'stat' | 'remove' | 'listTemporary' | 'removeTemporary';

export interface FaultRule {
  method: BackendMethod;
  /** Only calls on this kind count (and fail). */
  kind?: FileKind;
  /** Fail these calls (1-based count of the calls this rule matches). */
  nth?: number[];
  /** Fail the first `times` matching calls, then succeed. */
  times?: number;
  /**
   * After this rule fires, every later call of any method fails: the process "died" at this
   * point, and nothing it would have done afterwards reaches the storage.
   */
  die?: boolean;
  /** What the failure looks like (default: an EIO error naming the call). */
  error?: (call: string) => Error;
}

/** How a random fault shows itself (see the module comment). */
export type RandomFaultKind = 'throttle' | 'reset' | 'drop' | 'lost-reply' | 'short-read';

export interface RandomFaults {
  /** Seeds the generator: the same seed and the same calls give the same faults. */
  seed: number;
  /** Chance (0..1) that a call of each method fails; methods not named never fail at random. */
  probability: Partial<Record<BackendMethod, number>>;
  /** The kinds of fault to draw from (default: all); each is used only where it fits the call. */
  kinds?: RandomFaultKind[];
  /** Every call first waits between 0 and this many milliseconds (default 0). */
  latencyMs?: number;
  /** How to wait (default setTimeout). */
  sleep?: (ms: number) => Promise<void>;
}

export interface FaultScript {
  rules?: FaultRule[];
  /** Shorthand kept for older tests: fail these save calls (1-based count of saves of that kind). */
  failSaves?: { kind: FileKind; nth: number[] };
  /** Cut every load of this kind to half its length. */
  truncateLoads?: FileKind;
  /** Faults at random (a flaky network), on top of the rules. */
  random?: RandomFaults;
}

/** mulberry32: small, fast, good enough to scatter faults; seeded so a failing run replays. */
function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const ALL_RANDOM_KINDS: RandomFaultKind[] = ['throttle', 'reset', 'drop', 'lost-reply', 'short-read'];

function throttled(what: string, status: 503 | 429): Error {
  return Object.assign(new Error(`injected fault: ${what}: ${status === 503 ? 'SlowDown: please reduce your request rate' : 'too many requests'}`), {
    name: status === 503 ? 'SlowDown' : 'TooManyRequests',
    $metadata: { httpStatusCode: status },
  });
}

function reset(what: string, how: string): Error {
  return Object.assign(new Error(`injected fault: ${what}: ${how}`), { code: 'ECONNRESET' });
}

/** Offers no `localPath`: every read goes through `load`, and so through the faults. */
export class FaultyBackend implements Backend {
  private readonly counts = new Map<FaultRule, number>();
  private readonly calls = new Map<string, number>();
  private readonly rules: FaultRule[];
  private dead = false;
  private readonly random: (() => number) | undefined;
  private readonly injected = new Map<string, number>();

  constructor(
    private readonly inner: Backend,
    private readonly script: FaultScript = {},
  ) {
    this.rules = [...(script.rules ?? [])];
    if (script.failSaves) this.rules.push({ method: 'save', kind: script.failSaves.kind, nth: script.failSaves.nth });
    this.random = script.random ? seededRandom(script.random.seed) : undefined;
  }

  /** Random faults injected so far, by kind of fault (tests check that the run was really flaky). */
  get randomFaults(): ReadonlyMap<string, number> {
    return this.injected;
  }

  /**
   * Waits the random latency, then decides whether this call fails at random and how: undefined
   * for no fault. `fits` are the fault kinds that make sense for the call.
   */
  private async chance(method: BackendMethod, fits: RandomFaultKind[]): Promise<RandomFaultKind | undefined> {
    const random = this.script.random;
    if (!random || !this.random) return undefined;
    if (random.latencyMs) {
      const ms = Math.floor(this.random() * random.latencyMs);
      await (random.sleep ?? ((n: number) => new Promise<void>((resolve) => setTimeout(resolve, n))))(ms);
    }
    const p = random.probability[method] ?? 0;
    if (p <= 0 || this.random() >= p) return undefined;
    const kinds = (random.kinds ?? ALL_RANDOM_KINDS).filter((k) => fits.includes(k));
    const kind = kinds[Math.floor(this.random() * kinds.length)];
    if (kind !== undefined) this.injected.set(kind, (this.injected.get(kind) ?? 0) + 1);
    return kind;
  }

  /** Runs a call that only asks (list, stat, exists): it may be throttled or reset first. */
  private async ask<T>(method: BackendMethod, what: string, call: () => Promise<T>): Promise<T> {
    const fault = await this.chance(method, ['throttle', 'reset', 'drop']);
    if (fault === 'throttle') throw throttled(what, this.random!() < 0.5 ? 503 : 429);
    if (fault === 'reset' || fault === 'drop') throw reset(what, 'connection reset by peer');
    return call();
  }

  /** Runs a call that changes the storage (save, remove): it may also fail before or after doing it. */
  private async change(method: BackendMethod, what: string, call: () => Promise<void>): Promise<void> {
    const fault = await this.chance(method, ['throttle', 'reset', 'drop', 'lost-reply']);
    if (fault === 'throttle') throw throttled(what, 503);
    if (fault === 'reset') throw reset(what, 'connection reset by peer');
    // Dropped part-way: the storage got part of the request and stored nothing (uploads are atomic).
    if (fault === 'drop') throw reset(what, 'connection dropped part-way through the request');
    await call();
    if (fault === 'lost-reply') throw reset(what, 'connection reset before the reply (the storage did it)');
  }

  get location(): string {
    return this.inner.location;
  }

  /** How many calls of `method` (on `kind`) were made, failed ones included: to script "every k". */
  count(method: BackendMethod, kind?: FileKind): number {
    return this.calls.get(kind === undefined ? method : `${method}:${kind}`) ?? 0;
  }

  /** Whether a `die` rule fired. */
  get died(): boolean {
    return this.dead;
  }

  private gate(method: BackendMethod, kind: FileKind | undefined, what: string): void {
    this.calls.set(method, (this.calls.get(method) ?? 0) + 1);
    if (kind !== undefined) this.calls.set(`${method}:${kind}`, (this.calls.get(`${method}:${kind}`) ?? 0) + 1);
    if (this.dead) throw Object.assign(new Error(`injected fault: the process died before ${what}`), { code: 'EIO' });
    for (const rule of this.rules) {
      if (rule.method !== method || (rule.kind !== undefined && rule.kind !== kind)) continue;
      const n = (this.counts.get(rule) ?? 0) + 1;
      this.counts.set(rule, n);
      const fails = (rule.nth?.includes(n) ?? false) || (rule.times !== undefined && n <= rule.times);
      if (!fails) continue;
      if (rule.die) this.dead = true;
      const label = `${what} (#${n})`;
      throw rule.error?.(label) ?? Object.assign(new Error(`injected fault: ${label} failed`), { code: 'EIO' });
    }
  }

  async exists(): Promise<boolean> {
    this.gate('exists', undefined, 'exists');
    return this.ask('exists', 'exists', () => this.inner.exists());
  }

  async create(): Promise<void> {
    this.gate('create', undefined, 'create');
    return this.change('create', 'create', () => this.inner.create());
  }

  async save(kind: FileKind, name: string, data: Buffer | Buffer[], hints?: FileHints): Promise<void> {
    const what = `save of ${kind}/${name.slice(0, 12)}`;
    this.gate('save', kind, what);
    await this.change('save', what, () => this.inner.save(kind, name, data, hints));
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const what = `load of ${kind}/${name.slice(0, 12)}`;
    this.gate('load', kind, what);
    const fault = await this.chance('load', range ? ['throttle', 'reset', 'drop', 'short-read'] : ['throttle', 'reset', 'drop']);
    if (fault === 'throttle') throw throttled(what, 503);
    if (fault === 'reset') throw reset(what, 'connection reset by peer');
    const data = await this.inner.load(kind, name, range);
    // Cut off part-way: the error comes after some of the bytes did.
    if (fault === 'drop') throw reset(what, `connection dropped after ${Math.floor(data.length / 2)} of ${data.length} bytes`);
    // A short read is no error: fewer bytes than the file holds, as a careless client returns them.
    if (fault === 'short-read' && data.length > 0) return Buffer.from(data.subarray(0, Math.floor(this.random!() * data.length)));
    return this.script.truncateLoads === kind ? data.subarray(0, Math.floor(data.length / 2)) : data;
  }

  async list(kind: FileKind): Promise<FileInfo[]> {
    this.gate('list', kind, `list of ${kind}`);
    return this.ask('list', `list of ${kind}`, () => this.inner.list(kind));
  }

  async stat(kind: FileKind, name: string): Promise<number | undefined> {
    this.gate('stat', kind, `stat of ${kind}/${name.slice(0, 12)}`);
    return this.ask('stat', `stat of ${kind}/${name.slice(0, 12)}`, () => this.inner.stat(kind, name));
  }

  async remove(kind: FileKind, name: string): Promise<void> {
    const what = `remove of ${kind}/${name.slice(0, 12)}`;
    this.gate('remove', kind, what);
    await this.change('remove', what, () => this.inner.remove(kind, name));
  }

  async listTemporary(): Promise<TemporaryFile[]> {
    this.gate('listTemporary', undefined, 'list of temporary files');
    return this.ask('listTemporary', 'list of temporary files', async () => (await this.inner.listTemporary?.()) ?? []);
  }

  async removeTemporary(file: TemporaryFile): Promise<void> {
    this.gate('removeTemporary', file.kind, `remove of temporary ${file.name}`);
    await this.change('removeTemporary', `remove of temporary ${file.name}`, async () => this.inner.removeTemporary?.(file));
  }
}
