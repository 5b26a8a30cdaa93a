/**
 * A local cache for remote repositories (restic's internal/backend/cache is the model), and the
 * downtime's upload spool (spool.ts). Local repositories use neither.
 *
 * What is cached: index files, snapshots, and packs of tree blobs (the repository marks them with
 * `FileHints.metadata`, as restic's `Handle.IsMetadata`): what every backup and restore reads
 * before any file data. They are kept when saved and when first loaded (a tree pack is fetched
 * whole for its first blob), in `<cache root>/<hash of the location>/{index,snapshots,data/xx}/`,
 * folders 0700 and files 0600. Only what the repository stores is kept, so only ciphertext: no
 * password, no key in the clear (key files and the config are never served from here). Every name
 * cached is the SHA-256 of the file's content or 256 random bits, and the repository never
 * rewrites a file, so a cached copy is used without asking the remote. The remote stays the truth:
 * a listing always asks it, and a cached file it no longer lists, or lists with another size, is
 * dropped then; removing or finding a file missing (stat) drops its copy too. Besides, the cache
 * keeps the key file that opened the repository last (`keyHint`: its name and a copy, ciphertext
 * as stored), so the next open loads it without waiting for the keys listing and starts the
 * password's scrypt on the copy while the remote is asked; the result is used only when the
 * remote's key file is byte for byte the copy (keys.ts). A copy of the sealed config marks
 * which repository the cache belongs to: a repository created anew at the same location empties it.
 *
 * The cache is local input we do not fully trust (another process, a full disk, a careless hand):
 * it never breaks a command. A copy that cannot be read is dropped and the remote asked; the
 * repository authenticates every blob and object, and on a failure calls `forget` and loads once
 * more (from the remote). A cache that cannot be written is a warning, once.
 *
 * `deferUploads` (the downtime of a two-phase or freeze backup): from then on, every file written
 * except locks goes to the spool on this machine instead of the remote, and is read from there;
 * `upload` sends it later, once CVAT runs again (data before index, by the caller's order).
 * Listings, loads and stats see spooled files as stored. Locks always go to the remote: they are
 * how other processes see us.
 *
 * `keepReads` (a restore): a restore reads every blob twice, once to authenticate it before
 * anything is touched and once to write it; from a remote that is twice the download. While kept,
 * every ranged read of a data pack is appended (ciphertext as stored) to a file in a spool folder
 * of this cache, and a later read of any part of a kept range comes from there (the verification
 * reads a pack's blobs as one range, the writes each blob: repository/pack-reads.ts; `keptAt`
 * tells a worker thread where a kept range is, and `reserveKept` gives room to a worker thread that
 * downloads a range itself, with the remote's `signedLoad`). restic downloads once, but verifies nothing
 * before it writes. Bounded by the free space the caller leaves (what it is about to write): past
 * it, or on any error of the file, reads simply go to the remote again. The repository
 * authenticates the copy as any other; `forget` drops a pack's kept ranges. A reader that needs a
 * range once (the one-pass restore that writes as it verifies: repository/direct-writes.ts) says
 * so (`FileHints.once`) and no copy is written: at 2 GiB, writing one cost SFTP restores a fifth
 * of their time.
 */
import { readRange } from './file-range.js';
import { createHash, randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { chmod, lstat, mkdir, open, readdir, readFile, rename, rm, statfs, writeFile, type FileHandle } from 'node:fs/promises';
import { homedir, hostname } from 'node:os';
import { dirname, join } from 'node:path';
import { DiskFullError } from '../errors.js';
import type { Backend, FileHints, FileInfo, FileKind, SignedRequest, TemporaryFile } from './backend.js';
import { removeStaleSpools, UploadSpool, type SpooledFile } from './spool.js';
import { adoptOptional, type OptionalMethod } from './forwarding.js';

export type { SpooledFile } from './spool.js';

/** Where the cache lives and whether there is one. */
export interface CacheSettings {
  /** Root of the caches of all repositories (default: cacheRoot(env)). */
  dir?: string | undefined;
  /** No cache and no deferred uploads: every read and write goes to the remote. */
  disabled?: boolean | undefined;
  /** For the default root: CVAT_BACKUP_CACHE_DIR, XDG_CACHE_HOME, HOME. */
  env?: NodeJS.ProcessEnv | undefined;
  /** Told when the cache cannot be used or written (the command goes on without it). */
  onWarning?: ((message: string) => void) | undefined;
}

/** Bumped when the layout changes; a cache of another version is ignored. */
const VERSION = '1';
const CACHED_KINDS: ReadonlySet<FileKind> = new Set(['data', 'index', 'snapshots']);
/** Only names like ours are cached (a hostile listing's names never become paths). */
const NAME = /^[0-9a-f]{32,128}$/;
const TEMPORARY = '.tmp-';
/** A key file's name (the key hint). */
const KEY_NAME = /^[0-9a-f]{64}$/;
/** The key hint's file is read only up to this size (a key file is well under 1 KiB). */
const MAX_KEY_HINT = 16384;
/** Temporary files of a killed writer older than this are removed at a listing. */
const TEMPORARY_AGE_MS = 3600_000;

/** `$CVAT_BACKUP_CACHE_DIR`, else `$XDG_CACHE_HOME/cvat-backup`, else `~/.cache/cvat-backup`. */
export function cacheRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (env.CVAT_BACKUP_CACHE_DIR) return env.CVAT_BACKUP_CACHE_DIR;
  const xdg = env.XDG_CACHE_HOME;
  return join(xdg && xdg.startsWith('/') ? xdg : join(env.HOME ?? homedir(), '.cache'), 'cvat-backup');
}

/** The cache folder of a location: its hash, so the folder name says nothing of where it is. */
export function cacheFolderFor(root: string, location: string): string {
  return join(root, createHash('sha256').update(location).digest('hex').slice(0, 32));
}

/**
 * Wraps a remote backend in its cache (see above), or returns it as it is when the cache is
 * disabled or its folder cannot be used safely (a warning says why). Deletes the spools that
 * crashed processes left. The one way remote backends get a cache: open.ts calls it.
 */
export async function withCache(remote: Backend, settings: CacheSettings = {}): Promise<Backend> {
  if (settings.disabled) return remote;
  const dir = cacheFolderFor(settings.dir ?? cacheRoot(settings.env), remote.location);
  const warn = settings.onWarning ?? (() => undefined);
  try {
    await privateFolder(dirname(dir));
    await privateFolder(dir);
    const version = await readFile(join(dir, 'version'), 'utf8').catch(() => undefined);
    if (version === undefined) {
      await writeFile(join(dir, 'version'), `${VERSION}\n`, { mode: 0o600 });
      await writeFile(join(dir, 'CACHEDIR.TAG'), 'Signature: 8a477f597d28d172789f06886806bc55\n# a cache of cvat-backup: see https://bford.info/cachedir/\n', {
        mode: 0o600,
      });
    } else if (version.trim() !== VERSION) {
      warn(`cache ${dir} has layout version ${version.trim()}, this cvat-backup knows ${VERSION}: working without the cache`);
      return remote;
    }
    await removeStaleSpools(join(dir, 'spool'));
  } catch (error) {
    warn(`cache ${dir} cannot be used (${(error as Error).message}): working without the cache`);
    return remote;
  }
  return new CachedBackend(remote, dir, warn);
}

/** Creates `dir` (0700) or checks that the existing one is a folder of ours, closed to others. */
async function privateFolder(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const info = await lstat(dir);
  if (!info.isDirectory()) throw new Error(`${dir} is not a folder`);
  const uid = process.getuid?.();
  if (uid !== undefined && info.uid !== uid) throw new Error(`${dir} belongs to user ${info.uid}, not to us (${uid})`);
  if ((info.mode & 0o077) !== 0) await chmod(dir, 0o700);
}

/** The cache that wraps `backend`, if any (the repository asks it to forget or defer). */
export function localCopiesOf(backend: Backend): CachedBackend | undefined {
  return backend instanceof CachedBackend ? backend : undefined;
}

export interface UploadOptions {
  /** Uploads at once (default 3): each holds one spooled file in memory. */
  concurrency?: number;
  /** Tries per file (default 3), waiting 1 s, 2 s, 4 s … between them. */
  attempts?: number;
  /** Injected for tests. */
  sleep?: (ms: number) => Promise<void>;
  onUploaded?: (file: SpooledFile) => void;
  onRetry?: (file: SpooledFile, error: unknown, attempt: number) => void;
  signal?: AbortSignal;
}

/** Writes held on this machine while a downtime lasts (see `CachedBackend.deferUploads`). */
export interface DeferredUploads {
  /** What is spooled, oldest first. */
  pending(): SpooledFile[];
  /**
   * Uploads every spooled file of `kinds`, kind after kind in the order given (all of a kind
   * before any of the next); an uploaded file leaves the spool (a metadata file moves into the
   * cache). A failed upload is retried (`attempts`); a file that still fails makes the call reject
   * once the others of its kind settled, and stays spooled (still read from there): the call may
   * be repeated. Not concurrently with itself.
   */
  upload(kinds: FileKind[], options?: UploadOptions): Promise<void>;
  /** Ends the deferral: later writes go to the remote. Rejects (and goes on deferring) while files are spooled. */
  end(): Promise<void>;
  /** Ends the deferral and deletes what is still spooled (the operation failed and needs none of it). Idempotent. */
  discard(): Promise<void>;
}

/**
 * What the cache does with each optional method of the contract: `own` (implemented below),
 * `pass` (handed on to the remote, when it has it) or `withhold` (never offered). Keyed by every
 * optional method, so a method added to the contract does not compile here until someone decides:
 * a wrapper that silently dropped it would hide the feature from everything above it.
 */
const OPTIONAL: { [K in OptionalMethod]: 'own' | 'pass' | 'withhold' } = {
  listTemporary: 'own',
  removeTemporary: 'own',
  close: 'own',
  // A staged file would bypass the spool, and a local path the checks on cached copies; remote
  // backends offer neither.
  stage: 'withhold',
  localPath: 'withhold',
  // The server's clock (locks) and whether it allows deletes (append-only): the remote's answers.
  clockOffsetMs: 'pass',
  assertDeletes: 'pass',
  // Object Lock (S3): the remote's retention and versions; nothing of it is cached.
  retention: 'pass',
  retainedUntil: 'pass',
  extendRetention: 'pass',
  listHidden: 'pass',
  undelete: 'pass',
  // A file spooled here is not on the remote yet: the cache decides (see CachedBackend.signedLoad).
  signedLoad: 'own',
};

export class CachedBackend implements Backend {
  // Present exactly when the remote has them (set in the constructor, from OPTIONAL).
  declare readonly clockOffsetMs?: NonNullable<Backend['clockOffsetMs']>;
  declare readonly assertDeletes?: NonNullable<Backend['assertDeletes']>;
  declare readonly retention?: NonNullable<Backend['retention']>;
  declare readonly retainedUntil?: NonNullable<Backend['retainedUntil']>;
  declare readonly extendRetention?: NonNullable<Backend['extendRetention']>;
  declare readonly listHidden?: NonNullable<Backend['listHidden']>;
  declare readonly undelete?: NonNullable<Backend['undelete']>;
  private spool: UploadSpool | undefined;
  private kept: KeptReadsFile | undefined;
  /** Whole-file downloads under way (two readers of one tree pack fetch it once). */
  private readonly downloads = new Map<string, Promise<Buffer>>();
  private warned = false;

  constructor(
    readonly remote: Backend,
    /** This repository's cache folder. */
    readonly dir: string,
    private readonly onWarning: (message: string) => void = () => undefined,
  ) {
    adoptOptional(this, remote, Object.keys(OPTIONAL) as OptionalMethod[], (method, call) => (OPTIONAL[method] === 'pass' ? call : undefined));
  }

  get location(): string {
    return this.remote.location;
  }

  exists(): Promise<boolean> {
    return this.remote.exists();
  }

  create(): Promise<void> {
    return this.remote.create();
  }

  private cacheable(kind: FileKind, hints: FileHints | undefined): boolean {
    return kind === 'index' || kind === 'snapshots' || (kind === 'data' && hints?.metadata === true);
  }

  /** Where a file is cached; undefined for kinds and names never cached. */
  private cachePath(kind: FileKind, name: string): string | undefined {
    if (!CACHED_KINDS.has(kind) || !NAME.test(name)) return undefined;
    return kind === 'data' ? join(this.dir, 'data', name.slice(0, 2), name) : join(this.dir, kind, name);
  }

  private warnOnce(what: string, error: unknown): void {
    if (this.warned) return;
    this.warned = true;
    this.onWarning(`cache ${this.dir}: ${what} (${(error as Error).message}); going on without it where it fails`);
  }

  async save(kind: FileKind, name: string, data: Buffer | Buffer[], hints?: FileHints): Promise<void> {
    const parts = Array.isArray(data) ? data : [data];
    if (this.spool && kind !== 'locks') {
      // No fallback to the remote here: an index file must never reach it before its packs.
      await this.spool.write(kind, name, parts, this.cacheable(kind, hints)).catch((error: unknown) => {
        const code = (error as NodeJS.ErrnoException).code;
        if (code !== 'ENOSPC' && code !== 'EDQUOT') throw error;
        throw new DiskFullError(`no space left for the downtime's uploads in ${this.dir}: free space there, choose another --cache-dir, or back up with --no-cache`, {
          cause: error,
        });
      });
      return;
    }
    await this.remote.save(kind, name, data, hints);
    if (kind === 'config') await this.claim(Buffer.concat(parts));
    else if (this.cacheable(kind, hints)) await this.keep(kind, name, parts);
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }, hints?: FileHints): Promise<Buffer> {
    if (this.spool?.has(kind, name)) return this.spool.read(kind, name, range);
    if (kind === 'config') {
      const config = await this.remote.load(kind, name, range, hints);
      if (!range) await this.claim(config);
      return config;
    }
    // Data packs come from the cache only for a reader that says it reads metadata (trees):
    // prune's repacking and check read what the remote holds; a restore's second read of a range
    // comes from its kept reads.
    const kept = this.kept;
    if (kept && kind === 'data' && range && hints?.metadata !== true) {
      const held = await kept.read(name, range);
      if (held) return held;
      const bytes = await this.remote.load(kind, name, range, hints);
      if (hints?.once !== true) await kept.keep(name, range, bytes);
      return bytes;
    }
    if (!this.cacheable(kind, hints) || this.cachePath(kind, name) === undefined) return this.remote.load(kind, name, range, hints);
    const cached = await this.readCached(kind, name, range);
    if (cached) return cached;
    const whole = await this.download(kind, name, hints);
    return range ? Buffer.from(whole.subarray(range.offset, range.offset + range.length)) : whole;
  }

  /** The remote's signed request, unless the bytes are on this machine (spooled, kept) or the remote signs none. */
  async signedLoad(kind: FileKind, name: string, range: { offset: number; length: number }): Promise<SignedRequest | undefined> {
    if (this.spool?.has(kind, name)) return undefined;
    if (kind === 'data' && this.kept?.locate(name, range) !== undefined) return undefined;
    return this.remote.signedLoad?.(kind, name, range);
  }

  async list(kind: FileKind): Promise<FileInfo[]> {
    const listed = await this.remote.list(kind);
    if (CACHED_KINDS.has(kind)) await this.reconcile(kind, listed).catch((error: unknown) => this.warnOnce(`cannot clean ${kind}/`, error));
    const spooled = this.spool?.list(kind) ?? [];
    if (spooled.length === 0) return listed;
    const names = new Set(listed.map((f) => f.name));
    return [...listed, ...spooled.filter((f) => !names.has(f.name)).map((f) => ({ name: f.name, size: f.size, modifiedMs: undefined }))];
  }

  async stat(kind: FileKind, name: string): Promise<number | undefined> {
    const spooled = this.spool?.get(kind, name);
    if (spooled) return spooled.size;
    const size = await this.remote.stat(kind, name);
    if (size === undefined) await this.forget(kind, name);
    return size;
  }

  async remove(kind: FileKind, name: string): Promise<void> {
    await this.spool?.remove(kind, name);
    await this.remote.remove(kind, name);
    await this.forget(kind, name);
  }

  async listTemporary(): Promise<TemporaryFile[]> {
    return (await this.remote.listTemporary?.()) ?? [];
  }

  async removeTemporary(file: TemporaryFile): Promise<void> {
    await this.remote.removeTemporary?.(file);
  }

  async close(): Promise<void> {
    await this.remote.close?.();
  }

  /**
   * Drops the cached copy of a file (it failed authentication, or is gone). True if there was one:
   * then a second load reaches the remote. Spooled files are not copies and stay.
   */
  async forget(kind: FileKind, name: string): Promise<boolean> {
    const dropped = kind === 'data' && this.kept !== undefined && this.kept.drop(name);
    const path = this.cachePath(kind, name);
    if (path === undefined) return dropped;
    const there = await lstat(path).then(
      () => true,
      () => false,
    );
    if (there) await rm(path, { recursive: true, force: true }).catch((error: unknown) => this.warnOnce(`cannot remove ${kind}/${name.slice(0, 12)}`, error));
    return there || dropped;
  }

  /**
   * Drops cached tree packs that `keep` rejects (the index no longer names them: a prune elsewhere
   * removed them) and that are older than an hour (younger ones may be another process's new,
   * still unindexed packs).
   */
  async dropPacksExcept(keep: (name: string) => boolean, now: number = Date.now()): Promise<number> {
    let dropped = 0;
    for (const sub of await readdir(join(this.dir, 'data')).catch(() => [])) {
      for (const name of await readdir(join(this.dir, 'data', sub)).catch(() => [])) {
        if (keep(name)) continue;
        const path = join(this.dir, 'data', sub, name);
        const info = await lstat(path).catch(() => undefined);
        if (!info || now - info.mtimeMs < TEMPORARY_AGE_MS) continue;
        await rm(path, { recursive: true, force: true }).catch(() => undefined);
        dropped++;
      }
    }
    return dropped;
  }

  /**
   * From now on, ranged reads of data packs are kept on this machine and read from there the next
   * time (see the file header), until `end`. `reserveBytes`: free space to leave on the cache's
   * file system (what the restore is about to write there), besides 1 GiB. Once at a time.
   */
  async keepReads(options: { reserveBytes?: number } = {}): Promise<{ end(): Promise<void> }> {
    if (this.kept) throw new Error('reads are already kept');
    const root = join(this.dir, 'spool');
    let budget = 0;
    try {
      const fs = await statfs(this.dir);
      budget = fs.bavail * fs.bsize - (options.reserveBytes ?? 0) - KEPT_RESERVE;
    } catch (error) {
      this.warnOnce('cannot see its free space', error);
    }
    const none = { end: () => Promise.resolve() };
    if (budget <= 0) return none;
    let file: KeptReadsFile;
    try {
      file = await KeptReadsFile.create(root, budget);
    } catch (error) {
      this.warnOnce('cannot keep a restore\'s reads', error);
      return none;
    }
    this.kept = file;
    return {
      end: async () => {
        if (this.kept === file) this.kept = undefined;
        await file.discard();
      },
    };
  }

  /**
   * Where the kept bytes of `range` of data pack `name` are on this machine (a file and a position
   * in it), for a reader on a worker thread; undefined when no kept range holds all of them. The
   * bytes are as the remote returned them: the reader authenticates them, and on a failure calls
   * `forget` and reads from the remote.
   */
  keptAt(name: string, range: { offset: number; length: number }): { path: string; position: number } | undefined {
    const kept = this.kept;
    const position = kept?.locate(name, range);
    return kept === undefined || position === undefined ? undefined : { path: kept.path, position };
  }

  /**
   * Room in the kept reads for `range` of data pack `name`, for a worker thread that downloads the
   * range itself (a `signedLoad`) and writes it there at `position`: the range counts as kept
   * (`keptAt`, `load`) once `arrived` is called, after the bytes are written. Undefined when reads
   * are not kept or there is no room. Room for a download that failed is simply not used.
   */
  reserveKept(name: string, range: { offset: number; length: number }): { path: string; position: number; arrived(): void } | undefined {
    const kept = this.kept;
    const position = kept?.reserve(range.length);
    if (kept === undefined || position === undefined) return undefined;
    return { path: kept.path, position, arrived: () => kept.record(name, range, position) };
  }

  /**
   * From now on, every write but a lock's goes to a spool on this machine (see the file header).
   * Once; `end` or `discard` the returned handle before deferring again.
   */
  async deferUploads(): Promise<DeferredUploads> {
    if (this.spool) throw new Error('uploads are already deferred');
    const spool = await UploadSpool.create(join(this.dir, 'spool'));
    this.spool = spool;
    return {
      pending: () => spool.list(),
      upload: (kinds, options) => this.uploadSpooled(spool, kinds, options),
      end: async () => {
        if (spool.list().length > 0) throw new Error(`${spool.list().length} spooled files are not uploaded yet`);
        if (this.spool === spool) this.spool = undefined;
        await spool.discard();
      },
      discard: async () => {
        if (this.spool === spool) this.spool = undefined;
        await spool.discard();
      },
    };
  }

  private async uploadSpooled(spool: UploadSpool, kinds: FileKind[], options: UploadOptions = {}): Promise<void> {
    const attempts = options.attempts ?? 3;
    const sleep = options.sleep ?? ((ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms)));
    const uploadOne = async (file: SpooledFile): Promise<void> => {
      const bytes = await spool.read(file.kind, file.name);
      for (let attempt = 1; ; attempt++) {
        options.signal?.throwIfAborted();
        try {
          await this.remote.save(file.kind, file.name, bytes, file.cacheable && file.kind === 'data' ? { metadata: true } : undefined);
          break;
        } catch (error) {
          if (attempt >= attempts) throw error;
          options.onRetry?.(file, error, attempt);
          await sleep(1000 * 2 ** (attempt - 1));
        }
      }
      // Uploaded: a metadata file moves into the cache; the rest leaves the spool.
      const target = file.cacheable ? this.cachePath(file.kind, file.name) : undefined;
      const moved =
        target !== undefined &&
        (await mkdir(dirname(target), { recursive: true, mode: 0o700 })
          .then(() => rename(spool.pathOf(file), target))
          .then(
            () => true,
            () => false,
          ));
      if (moved) spool.forget(file);
      else await spool.remove(file.kind, file.name);
      options.onUploaded?.(file);
    };
    for (const kind of kinds) {
      const queue = spool.list(kind);
      const failures: unknown[] = [];
      const worker = async (): Promise<void> => {
        for (let file = queue.shift(); file; file = queue.shift()) {
          await uploadOne(file).catch((error: unknown) => {
            failures.push(error);
          });
        }
      };
      await Promise.all(Array.from({ length: Math.max(1, options.concurrency ?? 3) }, worker));
      if (failures.length > 0) throw failures[0];
    }
  }

  /** A cached copy, whole or a range; undefined (and the copy dropped) if it cannot be read. */
  private async readCached(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer | undefined> {
    const path = this.cachePath(kind, name)!;
    let handle;
    try {
      handle = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') await this.forget(kind, name);
      return undefined;
    }
    try {
      const info = await handle.stat();
      if (!info.isFile()) throw new Error('not a file');
      if (!range) return await handle.readFile();
      return await readRange(handle, range.offset, Math.max(0, Math.min(range.length, info.size - range.offset)));
    } catch {
      await handle.close().catch(() => undefined);
      handle = undefined;
      await this.forget(kind, name);
      return undefined;
    } finally {
      await handle?.close().catch(() => undefined);
    }
  }

  /** Loads a whole file from the remote and keeps a copy; concurrent callers share one download. */
  private download(kind: FileKind, name: string, hints: FileHints | undefined): Promise<Buffer> {
    const key = `${kind}/${name}`;
    let pending = this.downloads.get(key);
    if (!pending) {
      pending = (async () => {
        const bytes = await this.remote.load(kind, name, undefined, hints);
        await this.keep(kind, name, [bytes]);
        return bytes;
      })().finally(() => this.downloads.delete(key));
      this.downloads.set(key, pending);
    }
    return pending;
  }

  /** Stores a copy (temporary file, renamed into place; no fsync: a damaged copy is only dropped). */
  private async keep(kind: FileKind, name: string, parts: Buffer[]): Promise<void> {
    const path = this.cachePath(kind, name);
    if (path === undefined) return;
    const temp = join(dirname(path), `${TEMPORARY}${randomBytes(6).toString('hex')}`);
    try {
      await mkdir(dirname(path), { recursive: true, mode: 0o700 });
      const handle = await open(temp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
      try {
        for (const part of parts) await handle.write(part);
      } finally {
        await handle.close();
      }
      await rename(temp, path);
    } catch (error) {
      await rm(temp, { force: true }).catch(() => undefined);
      this.warnOnce(`cannot store ${kind}/${name.slice(0, 12)}`, error);
    }
  }

  /**
   * Marks the cache as this repository's (by its sealed config); a cache that held another
   * repository's files (one created anew at this location) is emptied first.
   */
  private async claim(config: Buffer): Promise<void> {
    const marker = join(this.dir, 'config');
    try {
      const known = await readFile(marker).catch(() => undefined);
      if (known?.equals(config)) return;
      if (known !== undefined) {
        for (const kind of CACHED_KINDS) await rm(join(this.dir, kind), { recursive: true, force: true });
        await rm(join(this.dir, 'key'), { force: true });
      }
      await writeFile(`${marker}.tmp`, config, { mode: 0o600 });
      await rename(`${marker}.tmp`, marker);
    } catch (error) {
      this.warnOnce('cannot mark the cache', error);
    }
  }

  /**
   * The key file that opened this repository last time, if known: its name (the SHA-256 of a key
   * file) and, when kept, a copy of its bytes. Repository.open loads it while it lists the keys
   * and needs no second round trip when it opens; the copy lets the password's scrypt start before
   * the remote answers. Hostile input like the cache's other files: a name that is not a key
   * name is never used as a path, and the copy is only ever compared with the remote's file.
   */
  async keyHint(): Promise<{ name: string; file?: Buffer } | undefined> {
    const text = await readFile(join(this.dir, 'key'), 'utf8').catch(() => undefined);
    if (text === undefined || text.length > MAX_KEY_HINT) return undefined;
    const [line, copy] = text.split('\n');
    const name = line?.trim();
    if (name === undefined || !KEY_NAME.test(name)) return undefined;
    const file = copy !== undefined && /^[A-Za-z0-9+/]+={0,2}$/.test(copy.trim()) ? Buffer.from(copy.trim(), 'base64') : undefined;
    return file ? { name, file } : { name };
  }

  /** Remembers the key file that opened the repository (see `keyHint`). */
  async rememberKey(name: string, file?: Buffer): Promise<void> {
    if (!KEY_NAME.test(name)) return;
    const known = await this.keyHint();
    if (known?.name === name && (file === undefined || known.file?.equals(file))) return;
    const text = `${name}\n${file !== undefined && file.length * 2 < MAX_KEY_HINT ? `${file.toString('base64')}\n` : ''}`;
    const temp = join(this.dir, `key${TEMPORARY}${randomBytes(6).toString('hex')}`);
    try {
      await writeFile(temp, text, { mode: 0o600, flag: 'wx' });
      await rename(temp, join(this.dir, 'key'));
    } catch (error) {
      await rm(temp, { force: true }).catch(() => undefined);
      this.warnOnce('cannot remember the key file', error);
    }
  }

  /** Drops cached files of `kind` that the remote does not list, or lists with another size. */
  private async reconcile(kind: FileKind, listed: FileInfo[]): Promise<void> {
    const sizes = new Map(listed.map((f) => [f.name, f.size]));
    const folders = kind === 'data' ? (await readdir(join(this.dir, 'data')).catch(() => [])).map((sub) => join(this.dir, 'data', sub)) : [join(this.dir, kind)];
    for (const folder of folders) {
      for (const name of await readdir(folder).catch(() => [])) {
        const path = join(folder, name);
        const info = await lstat(path).catch(() => undefined);
        if (!info) continue;
        const stale = name.startsWith(TEMPORARY) ? Date.now() - info.mtimeMs > TEMPORARY_AGE_MS : !info.isFile() || sizes.get(name) !== info.size;
        if (stale) await rm(path, { recursive: true, force: true });
      }
    }
  }
}

/** Free space `keepReads` always leaves. */
const KEPT_RESERVE = 1024 ** 3;
/** Ranges kept at most (each costs about 150 bytes of memory). */
const KEPT_MAX_RANGES = 500_000;

/** A kept range of a pack: its bytes [offset, offset + length) are at `at` in the file. */
interface KeptRange {
  offset: number;
  length: number;
  at: number;
}

/**
 * One file of kept ranged reads (`CachedBackend.keepReads`) in a spool folder of its own, so a
 * crashed process's file is deleted by the next command (removeStaleSpools, by the owner file).
 * A read is served from here when a kept range of its pack holds all of it (a restore reads a
 * pack's blobs as one range, then each blob on its own). Never throws to a reader: a range it
 * cannot keep or read is simply read from the remote.
 */
class KeptReadsFile {
  /** Pack name → its kept ranges. */
  private readonly ranges = new Map<string, KeptRange[]>();
  private count = 0;
  private size = 0;
  private broken = false;

  private constructor(
    private readonly dir: string,
    private readonly handle: FileHandle,
    private readonly budget: number,
  ) {}

  static async create(root: string, budget: number): Promise<KeptReadsFile> {
    await mkdir(root, { recursive: true, mode: 0o700 });
    const dir = join(root, `${process.pid}-${randomBytes(6).toString('hex')}`);
    await mkdir(dir, { mode: 0o700 });
    try {
      await writeFile(join(dir, 'owner'), JSON.stringify({ hostname: hostname(), pid: process.pid }), { mode: 0o600 });
      const handle = await open(join(dir, 'reads'), constants.O_RDWR | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
      return new KeptReadsFile(dir, handle, budget);
    } catch (error) {
      await rm(dir, { recursive: true, force: true }).catch(() => undefined);
      throw error;
    }
  }

  /** The file that holds the kept bytes (worker threads read it by path). */
  get path(): string {
    return join(this.dir, 'reads');
  }

  /** Where in the file the bytes of `range` of pack `name` are, if a kept range holds all of them. */
  locate(name: string, range: { offset: number; length: number }): number | undefined {
    const list = this.broken ? undefined : this.ranges.get(name);
    if (!list) return undefined;
    const end = range.offset + range.length;
    // Sorted by offset: look back from the last range that starts at or before this one.
    for (let i = lastAtOrBefore(list, range.offset); i >= 0; i--) {
      const r = list[i]!;
      if (end <= r.offset + r.length) return r.at + (range.offset - r.offset);
    }
    return undefined;
  }

  async read(name: string, range: { offset: number; length: number }): Promise<Buffer | undefined> {
    const at = this.locate(name, range);
    if (at === undefined) return undefined;
    try {
      const buffer = Buffer.allocUnsafe(range.length);
      let read = 0;
      while (read < buffer.length) {
        const { bytesRead } = await this.handle.read(buffer, read, buffer.length - read, at + read);
        if (bytesRead === 0) return undefined;
        read += bytesRead;
      }
      return buffer;
    } catch {
      return undefined;
    }
  }

  /** Keeps what a ranged read of pack `name` returned (fewer bytes than asked where the pack ends). */
  async keep(name: string, range: { offset: number; length: number }, bytes: Buffer): Promise<void> {
    if (bytes.length === 0 || bytes.length > range.length) return;
    if (this.locate(name, { offset: range.offset, length: bytes.length }) !== undefined) return;
    const at = this.reserve(bytes.length);
    if (at === undefined) return;
    try {
      let written = 0;
      while (written < bytes.length) written += (await this.handle.write(bytes, written, bytes.length - written, at + written)).bytesWritten;
      this.record(name, { offset: range.offset, length: bytes.length }, at);
    } catch {
      this.broken = true; // a full disk: the rest is read from the remote
    }
  }

  /** Room for `length` bytes at the end of the file (its position), or undefined: none left, or broken. */
  reserve(length: number): number | undefined {
    if (this.broken || length <= 0 || this.size + length > this.budget || this.count >= KEPT_MAX_RANGES) return undefined;
    const at = this.size;
    this.size += length;
    return at;
  }

  /** Bytes [offset, offset + length) of pack `name` are now at `at` in the file. */
  record(name: string, range: { offset: number; length: number }, at: number): void {
    if (this.broken) return;
    const list = this.ranges.get(name);
    const kept = { offset: range.offset, length: range.length, at };
    if (list) list.splice(lastAtOrBefore(list, kept.offset) + 1, 0, kept);
    else this.ranges.set(name, [kept]);
    this.count++;
  }

  /** Forgets every kept range of a pack; true if there was one. */
  drop(name: string): boolean {
    const list = this.ranges.get(name);
    if (!list) return false;
    this.count -= list.length;
    this.ranges.delete(name);
    return true;
  }

  async discard(): Promise<void> {
    this.broken = true;
    this.ranges.clear();
    this.count = 0;
    await this.handle.close().catch(() => undefined);
    await rm(this.dir, { recursive: true, force: true }).catch(() => undefined);
  }
}

/** Index of the last range of `list` (sorted by offset) that starts at or before `offset`; -1 if none. */
function lastAtOrBefore(list: KeptRange[], offset: number): number {
  let low = 0;
  let high = list.length;
  while (low < high) {
    const mid = (low + high) >>> 1;
    if (list[mid]!.offset <= offset) low = mid + 1;
    else high = mid;
  }
  return low - 1;
}

/** Bytes of the files a downtime spooled (for progress messages). */
export function spooledBytes(files: SpooledFile[]): number {
  return files.reduce((n, f) => n + f.size, 0);
}
