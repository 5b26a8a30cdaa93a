/**
 * Fault injection around a real backend, for tests: scripted per method and kind, e.g. "fail the
 * 3rd save of a data pack", or truncate what `load` returns. The wrapped backend stays real.
 */
import type { Backend, FileKind } from './backend.js';

export interface FaultScript {
  /** Fail these save calls (1-based count of saves of that kind). */
  failSaves?: { kind: FileKind; nth: number[] };
  /** Cut every load of this kind to half its length. */
  truncateLoads?: FileKind;
}

export class FaultyBackend implements Backend {
  private readonly saves = new Map<FileKind, number>();

  constructor(
    private readonly inner: Backend,
    private readonly script: FaultScript,
  ) {}

  get location(): string {
    return this.inner.location;
  }

  exists(): Promise<boolean> {
    return this.inner.exists();
  }

  create(): Promise<void> {
    return this.inner.create();
  }

  async save(kind: FileKind, name: string, data: Buffer | Buffer[]): Promise<void> {
    const n = (this.saves.get(kind) ?? 0) + 1;
    this.saves.set(kind, n);
    if (this.script.failSaves?.kind === kind && this.script.failSaves.nth.includes(n)) {
      throw Object.assign(new Error(`injected fault: save #${n} of ${kind} failed`), { code: 'EIO' });
    }
    await this.inner.save(kind, name, data);
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const data = await this.inner.load(kind, name, range);
    return this.script.truncateLoads === kind ? data.subarray(0, Math.floor(data.length / 2)) : data;
  }

  list(kind: FileKind): Promise<string[]> {
    return this.inner.list(kind);
  }

  stat(kind: FileKind, name: string): Promise<number | undefined> {
    return this.inner.stat(kind, name);
  }

  remove(kind: FileKind, name: string): Promise<void> {
    return this.inner.remove(kind, name);
  }
}
