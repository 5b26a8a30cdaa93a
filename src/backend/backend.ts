/**
 * Where repository files live. A backend stores immutable named files of a few kinds; the
 * repository above it never rewrites a file in place.
 */
export type FileKind = 'config' | 'keys' | 'data' | 'index' | 'snapshots' | 'locks';

export interface Backend {
  /** Human-readable location, for messages. */
  readonly location: string;
  /** True if the repository folder exists and has a config. Any number of calls. */
  exists(): Promise<boolean>;
  /** Creates the folder layout. Fails if a repository is already there. Once per repository. */
  create(): Promise<void>;
  /**
   * Stores `data` under (kind, name) durably and atomically: after it resolves the file survives a
   * crash; a crash before leaves no visible file. Idempotent for the same content. `data` may come
   * in parts (written in order, without joining them in memory).
   */
  save(kind: FileKind, name: string, data: Buffer | Buffer[]): Promise<void>;
  /** The whole file; throws if missing. `range` reads part of it. */
  load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer>;
  /** Names of the files of a kind (unordered). */
  list(kind: FileKind): Promise<string[]>;
  /** Size in bytes, or undefined if missing. */
  stat(kind: FileKind, name: string): Promise<number | undefined>;
  /** Idempotent. */
  remove(kind: FileKind, name: string): Promise<void>;
  /** For backends on this machine's filesystem: the file's path, so worker threads can read it. */
  localPath?(kind: FileKind, name: string): string;
}
