/**
 * Time, injected: the system clock in production, a manual one in tests, so lock refresh, lock
 * waits and prune's grace period are tested without sleeping (kopia's way).
 */
export interface Clock {
  /** Milliseconds since the epoch. Any number of calls; may jump (NTP, another host's skew). */
  now(): number;
  /**
   * Resolves after `ms`; rejects with the signal's reason when it aborts. Keeps the process alive
   * meanwhile (a lock wait must not let Node exit).
   */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
  /**
   * Runs `task` once after `ms` unless the returned cancel function is called first. Does not
   * keep the process alive (a background lock refresh must never hold a finished command open).
   * A task's rejection is the task's own business: the clock ignores it.
   */
  schedule(ms: number, task: () => void | Promise<void>): () => void;
}

export const systemClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise<void>((resolve, reject) => {
      if (signal?.aborted) {
        reject(signal.reason as Error);
        return;
      }
      const onAbort = (): void => {
        clearTimeout(timer);
        reject(signal!.reason as Error);
      };
      const timer = setTimeout(() => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      }, ms);
      signal?.addEventListener('abort', onAbort, { once: true });
    }),
  schedule: (ms, task) => {
    const timer = setTimeout(() => void Promise.resolve().then(task).catch(() => undefined), ms);
    timer.unref();
    return () => clearTimeout(timer);
  },
};

interface Timer {
  due: number;
  seq: number;
  fire: () => void | Promise<void>;
}

/**
 * A clock that moves only when told (tests). `advance` fires every timer that falls due, in
 * order, and lets each one's continuation run before the next one fires.
 */
export class ManualClock implements Clock {
  private current: number;
  private timers: Timer[] = [];
  private seq = 0;

  constructor(start: number | string = '2026-01-01T00:00:00Z') {
    this.current = typeof start === 'number' ? start : Date.parse(start);
  }

  now(): number {
    return this.current;
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (signal?.aborted) {
        reject(signal.reason as Error);
        return;
      }
      const timer: Timer = { due: this.current + ms, seq: this.seq++, fire: resolve };
      this.timers.push(timer);
      signal?.addEventListener(
        'abort',
        () => {
          this.timers = this.timers.filter((t) => t !== timer);
          reject(signal.reason as Error);
        },
        { once: true },
      );
    });
  }

  schedule(ms: number, task: () => void | Promise<void>): () => void {
    const timer: Timer = { due: this.current + ms, seq: this.seq++, fire: task };
    this.timers.push(timer);
    return () => {
      this.timers = this.timers.filter((t) => t !== timer);
    };
  }

  /** Moves time forward by `ms`, firing what falls due (tasks are awaited; sleepers get to run). */
  async advance(ms: number): Promise<void> {
    const target = this.current + ms;
    for (;;) {
      await settle();
      const next = this.timers.filter((t) => t.due <= target).sort((a, b) => a.due - b.due || a.seq - b.seq)[0];
      if (!next) break;
      this.timers = this.timers.filter((t) => t !== next);
      this.current = Math.max(this.current, next.due);
      await Promise.resolve(next.fire()).catch(() => undefined);
    }
    this.current = target;
    await settle();
  }

  /** Number of timers waiting (tests: "a waiter is sleeping now"). */
  get pending(): number {
    return this.timers.length;
  }
}

/** Lets every promise chain that only waits for microtasks (the memory backend) run to its next wait. */
async function settle(): Promise<void> {
  for (let i = 0; i < 10; i++) await new Promise((resolve) => setImmediate(resolve));
}
