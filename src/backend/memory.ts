/**
 * A repository held in memory: the backend for fast unit tests of the repository layer (locks,
 * prune, check, repair) and the reference the backend conformance suite holds the others to.
 * Saves are atomic and immediately visible to every Repository that shares the instance, as on a
 * strongly consistent store. Modification times come from an injected clock; a backend that
 * cannot tell them (`modificationTimes: false`) reports none, as some remote stores do.
 */
import { TargetNotEmptyError } from '../errors.js';
import type { Backend, FileInfo, FileKind, TemporaryFile } from './backend.js';

interface StoredFile {
  data: Buffer;
  modifiedMs: number;
}

export interface MemoryBackendOptions {
  location?: string;
  /** Milliseconds since the epoch; stamps every save. Default: the system clock. */
  now?: () => number;
  /** False: listings carry no modification times. Default true. */
  modificationTimes?: boolean;
}

export class MemoryBackend implements Backend {
  readonly location: string;
  private readonly files = new Map<FileKind, Map<string, StoredFile>>();
  private readonly temporaries = new Map<string, TemporaryFile>();
  private created = false;
  private readonly now: () => number;
  private readonly modificationTimes: boolean;

  constructor(options: MemoryBackendOptions = {}) {
    this.location = options.location ?? 'memory:';
    this.now = options.now ?? Date.now;
    this.modificationTimes = options.modificationTimes ?? true;
  }

  private folder(kind: FileKind): Map<string, StoredFile> {
    let folder = this.files.get(kind);
    if (!folder) {
      folder = new Map();
      this.files.set(kind, folder);
    }
    return folder;
  }

  exists(): Promise<boolean> {
    return Promise.resolve(this.folder('config').has('config'));
  }

  create(): Promise<void> {
    // As a folder: creating an empty location again (an interrupted create) is fine.
    if ([...this.files.values()].some((f) => f.size > 0)) {
      return Promise.reject(new TargetNotEmptyError(`${this.location} is not empty and holds no repository`));
    }
    this.created = true;
    return Promise.resolve();
  }

  save(kind: FileKind, name: string, data: Buffer | Buffer[]): Promise<void> {
    const bytes = Buffer.concat(Array.isArray(data) ? data : [data]);
    this.folder(kind).set(kind === 'config' ? 'config' : name, { data: bytes, modifiedMs: this.now() });
    return Promise.resolve();
  }

  load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const file = this.folder(kind).get(kind === 'config' ? 'config' : name);
    if (!file) return Promise.reject(Object.assign(new Error(`ENOENT: no such file: ${kind}/${name}`), { code: 'ENOENT' }));
    const part = range ? file.data.subarray(range.offset, range.offset + range.length) : file.data;
    return Promise.resolve(Buffer.from(part));
  }

  list(kind: FileKind): Promise<FileInfo[]> {
    return Promise.resolve(
      [...this.folder(kind)].map(([name, f]) => ({ name, size: f.data.length, modifiedMs: this.modificationTimes ? f.modifiedMs : undefined })),
    );
  }

  stat(kind: FileKind, name: string): Promise<number | undefined> {
    return Promise.resolve(this.folder(kind).get(kind === 'config' ? 'config' : name)?.data.length);
  }

  remove(kind: FileKind, name: string): Promise<void> {
    this.folder(kind).delete(kind === 'config' ? 'config' : name);
    return Promise.resolve();
  }

  listTemporary(): Promise<TemporaryFile[]> {
    return Promise.resolve([...this.temporaries.values()].map((t) => ({ ...t, modifiedMs: this.modificationTimes ? t.modifiedMs : undefined })));
  }

  removeTemporary(file: TemporaryFile): Promise<void> {
    this.temporaries.delete(`${file.kind}/${file.name}`);
    return Promise.resolve();
  }

  // ---- for tests: what a crash or a careless hand leaves behind ----

  /** Leaves a temporary file as a save killed half-way would (stamped now). */
  plantTemporary(kind: FileKind, name: string, size: number): void {
    this.temporaries.set(`${kind}/${name}`, { kind, name, size, modifiedMs: this.now() });
  }

  /** The stored bytes themselves (tests damage them in place). */
  raw(kind: FileKind, name: string): Buffer | undefined {
    return this.folder(kind).get(name)?.data;
  }

  /** An independent copy of everything stored (tests replay one state many ways). */
  clone(options: MemoryBackendOptions = {}): MemoryBackend {
    const copy = new MemoryBackend({ location: this.location, now: this.now, modificationTimes: this.modificationTimes, ...options });
    copy.created = this.created;
    for (const [kind, folder] of this.files) {
      for (const [name, f] of folder) copy.folder(kind).set(name, { data: Buffer.from(f.data), modifiedMs: f.modifiedMs });
    }
    for (const [key, t] of this.temporaries) copy.temporaries.set(key, { ...t });
    return copy;
  }

  /** Replaces a file's bytes, keeping its time (a flipped bit, a truncation). */
  replace(kind: FileKind, name: string, data: Buffer): void {
    const file = this.folder(kind).get(name);
    if (!file) throw new Error(`no file ${kind}/${name}`);
    file.data = data;
  }
}
