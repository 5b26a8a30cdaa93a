/**
 * Fault injection around a real backend, for tests: failures scripted per method (and kind), as
 * kopia's tests do — "fail the 3rd save of a data pack", "fail the first two lists, then
 * succeed", "die at the 5th remove" (every later call fails too, as if the process had been
 * killed there) — or loads cut short. The wrapped backend stays real: what did happen, happened.
 */
import type { Backend, FileInfo, FileKind, TemporaryFile } from './backend.js';

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

export interface FaultScript {
  rules?: FaultRule[];
  /** Shorthand kept for older tests: fail these save calls (1-based count of saves of that kind). */
  failSaves?: { kind: FileKind; nth: number[] };
  /** Cut every load of this kind to half its length. */
  truncateLoads?: FileKind;
}

/** Offers no `localPath`: every read goes through `load`, and so through the faults. */
export class FaultyBackend implements Backend {
  private readonly counts = new Map<FaultRule, number>();
  private readonly calls = new Map<string, number>();
  private readonly rules: FaultRule[];
  private dead = false;

  constructor(
    private readonly inner: Backend,
    private readonly script: FaultScript = {},
  ) {
    this.rules = [...(script.rules ?? [])];
    if (script.failSaves) this.rules.push({ method: 'save', kind: script.failSaves.kind, nth: script.failSaves.nth });
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
    return this.inner.exists();
  }

  async create(): Promise<void> {
    this.gate('create', undefined, 'create');
    return this.inner.create();
  }

  async save(kind: FileKind, name: string, data: Buffer | Buffer[]): Promise<void> {
    this.gate('save', kind, `save of ${kind}/${name.slice(0, 12)}`);
    await this.inner.save(kind, name, data);
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    this.gate('load', kind, `load of ${kind}/${name.slice(0, 12)}`);
    const data = await this.inner.load(kind, name, range);
    return this.script.truncateLoads === kind ? data.subarray(0, Math.floor(data.length / 2)) : data;
  }

  async list(kind: FileKind): Promise<FileInfo[]> {
    this.gate('list', kind, `list of ${kind}`);
    return this.inner.list(kind);
  }

  async stat(kind: FileKind, name: string): Promise<number | undefined> {
    this.gate('stat', kind, `stat of ${kind}/${name.slice(0, 12)}`);
    return this.inner.stat(kind, name);
  }

  async remove(kind: FileKind, name: string): Promise<void> {
    this.gate('remove', kind, `remove of ${kind}/${name.slice(0, 12)}`);
    await this.inner.remove(kind, name);
  }

  async listTemporary(): Promise<TemporaryFile[]> {
    this.gate('listTemporary', undefined, 'list of temporary files');
    return (await this.inner.listTemporary?.()) ?? [];
  }

  async removeTemporary(file: TemporaryFile): Promise<void> {
    this.gate('removeTemporary', file.kind, `remove of temporary ${file.name}`);
    await this.inner.removeTemporary?.(file);
  }
}
