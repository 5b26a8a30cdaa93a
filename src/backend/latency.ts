/**
 * A remote far away, for tests and benchmarks: every call waits `delayMs` before it reaches the
 * wrapped backend (a round trip), and a save or load also waits for its bytes at `bytesPerSecond`.
 * What the wrapped backend does is real; only the waiting is made up.
 */
import type { Backend, FileHints, FileInfo, FileKind, TemporaryFile } from './backend.js';

export interface LatencyOptions {
  /** Milliseconds every call waits (default 20). */
  delayMs?: number;
  /** Transfer rate of saves and loads (default: unlimited). */
  bytesPerSecond?: number;
}

export class LatencyBackend implements Backend {
  private readonly delayMs: number;
  private readonly rate: number | undefined;

  constructor(
    private readonly inner: Backend,
    options: LatencyOptions = {},
  ) {
    this.delayMs = options.delayMs ?? 20;
    this.rate = options.bytesPerSecond;
  }

  get location(): string {
    return this.inner.location;
  }

  private wait(bytes = 0): Promise<void> {
    const ms = this.delayMs + (this.rate ? (bytes / this.rate) * 1000 : 0);
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  async exists(): Promise<boolean> {
    await this.wait();
    return this.inner.exists();
  }

  async create(): Promise<void> {
    await this.wait();
    return this.inner.create();
  }

  async save(kind: FileKind, name: string, data: Buffer | Buffer[], hints?: FileHints): Promise<void> {
    await this.wait((Array.isArray(data) ? data : [data]).reduce((n, p) => n + p.length, 0));
    return this.inner.save(kind, name, data, hints);
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }, hints?: FileHints): Promise<Buffer> {
    const data = await this.inner.load(kind, name, range, hints);
    await this.wait(data.length);
    return data;
  }

  async list(kind: FileKind): Promise<FileInfo[]> {
    await this.wait();
    return this.inner.list(kind);
  }

  async stat(kind: FileKind, name: string): Promise<number | undefined> {
    await this.wait();
    return this.inner.stat(kind, name);
  }

  async remove(kind: FileKind, name: string): Promise<void> {
    await this.wait();
    return this.inner.remove(kind, name);
  }

  async listTemporary(): Promise<TemporaryFile[]> {
    await this.wait();
    return (await this.inner.listTemporary?.()) ?? [];
  }

  async removeTemporary(file: TemporaryFile): Promise<void> {
    await this.wait();
    await this.inner.removeTemporary?.(file);
  }

  async close(): Promise<void> {
    await this.inner.close?.();
  }
}
