/**
 * Where repository files live. A backend stores immutable named files of a few kinds; the
 * repository above it never rewrites a file in place. Every backend (memory, local, sftp, s3,
 * rest/rclone) behaves as this contract says, and conformance.ts holds each of them to it.
 *
 * What every backend guarantees (remote ones included):
 * - **Names.** `config` has the one name `config`; every other kind stores files under 64 lower-case
 *   hex characters (SHA-256 names for keys, packs, index files, snapshots, state; random ones for
 *   locks). A backend may lay them out as it likes (the local folder splits `data/` by the first two
 *   characters) but lists them by the plain name and keeps kinds apart.
 * - **Atomic visibility.** A file is listed, stat-ed or loaded only whole: never while a save of it
 *   runs, never cut short by a save that failed or a process that was killed (an upload that did
 *   not finish is no file; a local temporary file is not listed, see `listTemporary`).
 * - **Durability.** When `save` or `remove` resolves, the storage has it: a crash (ours or the
 *   server's, as far as the storage promises) does not undo it.
 * - **Idempotence.** Saving the same content under the same name again succeeds and leaves one
 *   file; removing a missing file succeeds. So a caller (the retry wrapper, retry.ts) may repeat a
 *   call whose outcome it did not hear.
 * - **Errors.** A missing file is an error with `code: 'ENOENT'` from `load` (with or without a
 *   range), `undefined` from `stat`, nothing from `remove`. Every other failure is thrown as the
 *   storage reported it (`ENOSPC`, `EACCES`, `EIO`, `ECONNRESET`, an HTTP status on `statusCode`
 *   or `$metadata.httpStatusCode`): never taken for "missing", never swallowed. A backend does not
 *   retry on its own (beyond what its client library does within one request): retry.ts does,
 *   in one place, and needs the original error to tell transient from permanent; a failure the
 *   backend knows to be passing but that carries no such code (an SSH channel that closed, a
 *   helper process that died) is marked `transient: true`. Messages never carry credentials.
 * - **Times.** `FileInfo.modifiedMs` is when the storage wrote the file, by the storage's clock
 *   (the server's `mtime` or `Last-Modified`), never this host's clock at upload: locks judge
 *   staleness and prune judges ages against the storage's own clock (a lock file's time).
 * - **Consistency.** A file saved before a call starts is seen by it (list, stat, load); one saved
 *   or removed while a listing runs may or may not be in it.
 * - **Concurrency.** Any method may be called concurrently for different names, from this process
 *   and from others on other hosts.
 */
export type FileKind = 'config' | 'keys' | 'data' | 'index' | 'snapshots' | 'locks' | 'state';

/**
 * What the repository knows about a file that the storage cannot see (restic's
 * `Handle.IsMetadata`): a pack of tree blobs is metadata, read by every backup and restore, so a
 * cache (cache.ts) keeps a copy of it on this machine. A hint only; backends may ignore it.
 */
export interface FileHints {
  metadata?: boolean;
  /**
   * The reader needs these bytes once (a restore that writes its files as it verifies them):
   * a cache keeps no copy of them for a second read (backend/cache.ts, `keepReads`).
   */
  once?: boolean;
  /**
   * The SHA-256 (hex) of the whole content, where the writer computed it anyway (a pack is named
   * by it): a store may hand it to the server to check the upload against (S3's signed
   * x-amz-content-sha256) instead of hashing the bytes again. A server refuses a body that does
   * not match it, so it must be exact.
   */
  sha256?: string;
}

/**
 * An HTTP(S) request that loads a range of a file by itself, made by another thread (a restore's
 * blob workers download packs without the main thread: repository/pack-reads.ts). It carries a
 * signature (S3: SigV4 headers valid for minutes; a session token where the credentials have one):
 * treat it as a credential — never in argv, logs, error messages or messages that get logged.
 */
export interface SignedRequest {
  url: string;
  headers: Record<string, string>;
}

/** A file as a listing shows it. */
export interface FileInfo {
  name: string;
  /** Bytes. */
  size: number;
  /**
   * When the storage last wrote the file, in milliseconds since the epoch, by the storage's clock
   * (not ours); undefined where the backend cannot tell (prune then remembers when it first saw
   * the file and decides on a later run).
   */
  modifiedMs: number | undefined;
}

/** A leftover of an interrupted save (a local folder's `.tmp-*`), never visible through `list`. */
export interface TemporaryFile extends FileInfo {
  kind: FileKind;
}

/**
 * A file written piece by piece (a pack as its blobs arrive), so that its bytes need not be held
 * in memory until it is complete. Not visible until `commit`; a crash before leaves at most a
 * temporary file (see `Backend.listTemporary`).
 */
export interface StagedFile {
  /** Bytes appended so far. */
  readonly size: number;
  /** Appends the parts in order. Calls must not overlap: await each before the next. */
  append(parts: Buffer[]): Promise<void>;
  /** Stores what was appended as (kind, name), durably and atomically as `save` does. Once. */
  commit(name: string): Promise<void>;
  /** Deletes what was appended. Idempotent; after a failed append or commit, or instead of commit. */
  abort(): Promise<void>;
}

export interface Backend {
  /** Human-readable location, for messages. */
  readonly location: string;
  /** True if the location holds a config (a repository). Any number of calls. */
  exists(): Promise<boolean>;
  /**
   * Creates the folder layout (or nothing, where the storage needs none). Refuses
   * (TargetNotEmptyError) a location that holds anything but an empty folder (or the empty folders
   * an interrupted `create` left) — certainly one that holds a config: mixing repository files
   * into someone's folder risks their data and ours. Calling it again on what it left is fine.
   */
  create(): Promise<void>;
  /**
   * Stores `data` under (kind, name) durably and atomically: after it resolves the file survives a
   * crash; a crash or failure before leaves no visible file (at most a temporary one, see
   * `listTemporary`). Idempotent for the same content. `data` may come in parts (written in
   * order, without joining them in memory where the storage can stream them). The parts are not
   * changed or kept after it settles, so a retry may send them again. Any number of calls, also
   * concurrently for different names.
   */
  save(kind: FileKind, name: string, data: Buffer | Buffer[], hints?: FileHints): Promise<void>;
  /**
   * The whole file, or the bytes [offset, offset + length) of it: shorter where the file ends
   * first, empty for length 0 or an offset at or past the end (never an error for that). ENOENT if
   * the file is missing (also with a range). Returns exactly what the storage holds: a transfer
   * cut short is an error (or, where a client cannot tell, a short result that retry.ts detects
   * by the file's size), never silently fewer bytes.
   */
  load(kind: FileKind, name: string, range?: { offset: number; length: number }, hints?: FileHints): Promise<Buffer>;
  /**
   * Every file of a kind (unordered), with size and modification time. A file saved before the
   * call started is listed; one saved or removed during the call may or may not be. Temporary
   * files are never listed. An empty or missing folder lists nothing (no error).
   */
  list(kind: FileKind): Promise<FileInfo[]>;
  /** Size in bytes, or undefined if missing (a storage error is thrown, never taken for "missing"). */
  stat(kind: FileKind, name: string): Promise<number | undefined>;
  /**
   * Deletes a file; removing a missing file is no error (idempotent). Durable when it resolves:
   * a crash afterwards does not bring the file back (the local backend fsyncs the folder).
   */
  remove(kind: FileKind, name: string): Promise<void>;
  /**
   * Leftovers of saves that never finished (a killed process), with their ages, for prune to
   * delete once they are older than its grace period. Backends whose uploads are atomic have none
   * and may leave this out.
   */
  listTemporary?(): Promise<TemporaryFile[]>;
  /** Deletes one leftover `listTemporary` showed. Idempotent, durable like `remove`. */
  removeTemporary?(file: TemporaryFile): Promise<void>;
  /**
   * Starts a file of `kind` written piece by piece (see StagedFile). Optional: without it, a writer
   * holds the whole file and calls `save`. Any number of staged files may be open at once.
   */
  stage?(kind: FileKind): Promise<StagedFile>;
  /**
   * Ends the backend's connections and helper processes (SFTP session, rclone). Idempotent; the
   * backend is not used afterwards. Backends with nothing to end leave it out.
   */
  close?(): Promise<void>;
  /**
   * How far the storage's clock is ahead of this host's, in ms (a REST server's `Date` replies), or
   * undefined before the first reply. For backends whose listings carry no modification times:
   * locks then write and judge lock times on the storage's clock, so hosts with skewed clocks
   * agree. Cheap, any number of calls. Backends with modification times leave it out.
   */
  clockOffsetMs?(): number | undefined;
  /**
   * Throws a one-line error if the storage refuses to delete repository files other than locks
   * (an append-only server): forget and prune call it before they write or delete anything.
   * Deletes nothing. Backends that always delete leave it out.
   */
  assertDeletes?(): Promise<void>;
  /**
   * Object Lock (S3): when the storage keeps any version of the file until (ms since the epoch),
   * undefined when nothing does. Backends without retention leave this and the next three out.
   */
  retainedUntil?(kind: FileKind, name: string): Promise<number | undefined>;
  /** The repository's Object Lock retention, undefined when it has none. */
  retention?(): Promise<{ mode: 'governance' | 'compliance'; seconds: number } | undefined>;
  /** Extends the files' retention to the repository's period from now; returns how many. */
  extendRetention?(files: { kind: FileKind; name: string }[]): Promise<number>;
  /** Repository files someone deleted (a delete marker) or replaced whose first version is still stored. */
  listHidden?(): Promise<{ key: string; size: number; deletedMs: number | undefined }[]>;
  /** Brings back what `listHidden` shows (with the bucket owner's rights); returns how many. */
  undelete?(): Promise<number>;
  /**
   * For HTTP backends: a request another thread can make to GET bytes [offset, offset + length)
   * of the file (signed now, to be used within minutes), or undefined when this file cannot be
   * read that way. Only an answer with exactly those bytes counts (206, or 200 of a file that is
   * exactly the range); on anything else the caller loads the range with `load`, which reports
   * errors and is retried as this contract says. No request is made here.
   */
  signedLoad?(kind: FileKind, name: string, range: { offset: number; length: number }): Promise<SignedRequest | undefined>;
  /** For backends on this machine's filesystem: the file's path, so worker threads can read it. */
  localPath?(kind: FileKind, name: string): string;
}

/** The names of a listing (for callers that need no sizes or times). */
export async function listNames(backend: Backend, kind: FileKind): Promise<string[]> {
  return (await backend.list(kind)).map((f) => f.name);
}
