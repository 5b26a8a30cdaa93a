/** Bounded concurrency with the first failure kept: nothing new is admitted after one. */
export class Slots {
  private readonly running = new Set<Promise<void>>();
  failure: Error | undefined;

  constructor(private readonly size: number) {}

  /** Waits for a free slot; throws the first failure instead once there is one. */
  async admit(): Promise<void> {
    while (this.running.size >= this.size) await Promise.race(this.running);
    if (this.failure !== undefined) throw this.failure;
  }

  /** Tracks admitted work; returns it as given. */
  track<T>(work: Promise<T>): Promise<T> {
    const tracked: Promise<void> = work.then(
      () => undefined,
      (error: unknown) => {
        this.failure ??= error instanceof Error ? error : new Error(String(error));
      },
    );
    const done = tracked.finally(() => this.running.delete(done));
    this.running.add(done);
    return work;
  }

  /** Waits for everything admitted; throws the first failure. */
  async drain(): Promise<void> {
    while (this.running.size > 0) await Promise.race(this.running);
    if (this.failure !== undefined) throw this.failure;
  }
}
