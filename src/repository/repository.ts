/**
 * The content-addressed snapshot repository (format: docs/repository-format.md): keys, config,
 * the blob index and sealed objects. Pack assembly lives in packer.ts (one packer per blob type),
 * locks in locks.ts; check, prune and repair in their own modules.
 *
 * Blobs (file chunks and directory trees) are identified by the SHA-256 of their plaintext,
 * compressed (zstd, unless incompressible), sealed (AES-256-GCM under the master key) and packed
 * into pack files of about 16 MiB. Each pack ends with its own sealed header listing its blobs, so
 * the index can be rebuilt from the packs alone (`repair index`). Index files map blob ids to
 * (pack, offset, length); snapshots name the root trees of every volume.
 *
 * Crash-safe write order: a pack is saved (atomically, fsynced) before the index file that
 * names it, and every index file before the snapshot that needs it. A crash leaves at worst
 * unreferenced packs, which `prune` removes after its grace period; never a snapshot that points
 * at missing data. Every index file and snapshot is written only while the repository lock is
 * held (`assertLockHeld`): a writer whose lock was lost stops before it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { write } from 'node:fs';
import type { Backend, FileKind } from '../backend/backend.js';
import { localCopiesOf, type UploadOptions } from '../backend/cache.js';
import { CorruptArchiveError, RepositoryError } from '../errors.js';
import { DEFAULT_CHUNKER, type ChunkerParams } from './chunker.js';
import { open as openSealed, seal, sealParts, type KdfParams } from './crypto.js';
import { calibrateKdf, createKeyFile, openMasterKey } from './keys.js';
import { payloadParts, unpackPayload } from './compression.js';
import { ChunkPool } from './chunk-pool.js';
import type { BlobDestination } from './blob-worker.js';
import { blobAad } from './aad.js';
import { BlobIndex, type BlobLocation, type BlobType } from './blob-index.js';
import { inOrder } from './in-order.js';
import { acquireLock, type LockOperation, type LockOptions, type RepositoryLock } from './locks.js';
import { PackWriter, type PackHeaderEntry, type WrittenPack } from './packer.js';

export type { BlobLocation, BlobType } from './blob-index.js';
export { PACK_MAX_BLOBS, PACK_TARGET, type PackHeaderEntry } from './packer.js';

export interface RepositoryConfig {
  version: 1;
  id: string;
  chunker: ChunkerParams;
  created: string;
}

/** A pack as an index file names it. */
export interface IndexedPack {
  id: string;
  /** All of the pack's blobs, as its header lists them. */
  blobs: PackHeaderEntry[];
  /**
   * The pack's name is the SHA-256 of its bytes (packer.ts): `check --read-data` verifies it.
   * Written only by builds that name packs so; absent for packs of earlier builds (named at
   * random) and for packs `repair index` found without an index entry saying so. Absent never
   * raises an alarm, so a reader that drops it (an older build rewriting an index) only loses
   * that one check.
   */
  nameIsHash?: true;
}

/** An index file: packs and the blobs in each. */
export interface IndexFile {
  packs: IndexedPack[];
}

/**
 * Blobs named per index file written during a backup (and by prune and repair). Until then their
 * packs' entries are held as objects: 16 384 keep that to a few MiB in a backup of a million files.
 */
export const INDEX_EVERY = 16_384;

/**
 * Index files loaded at once (loadIndex): a remote store answers them in a round trip together,
 * and at most this many parsed files (a few MiB each at INDEX_EVERY blobs) are held at a time.
 */
const INDEX_LOADS = 8;

/** Sealed objects stored whole, each under the SHA-256 of its sealed bytes. */
export type ObjectKind = 'index' | 'snapshots' | 'state';

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export interface RepositoryOptions {
  now?: () => Date;
  /** scrypt parameters of a new repository's key (default: calibrated to about 0.5 s here). */
  kdf?: Omit<KdfParams, 'salt'>;
  /** Told of what does not stop the repository from opening (a damaged key file beside a good one). */
  onWarning?: (message: string) => void;
  /** Clock, host name, refresh interval and lock wait (--retry-lock) for this repository's locks. */
  locks?: LockOptions;
  /**
   * `init` only: the new repository's chunker parameters, seed included (`init --copy-chunker-params`
   * takes another repository's, so that the same files cut into the same chunks in both and
   * deduplicate across a copy). Default: the standard sizes and a fresh random seed.
   */
  chunker?: ChunkerParams;
}

/**
 * A blob read from one repository to be stored in another (copy): authenticated with the source's
 * key, its plaintext hashed against its id, and kept in its stored framing (compression byte and
 * zstd frame), which does not depend on the key.
 */
export interface BlobForCopy {
  id: string;
  type: BlobType;
  rawLength: number;
  /** The framed payload (see compression.ts), to be sealed again with the target's key. */
  framed: Buffer;
  /** The plaintext (a view into `framed` for a stored blob); the caller drops it when done. */
  plaintext: Buffer;
}

export class Repository {
  private index = new BlobIndex();
  private indexLoaded = false;
  /** The load under way (loadIndex): a second caller waits for it instead of loading again. */
  private indexLoading: Promise<void> | undefined;
  /** The index files `loadIndex` read (prune and repair replace exactly these). */
  private indexFiles = new Set<string>();
  /** Blobs sealed but not yet in a durable pack. */
  private readonly pendingIds = new Set<string>();
  /** Packs written since the last index file. */
  private unindexed: WrittenPack[] = [];
  private unindexedBlobs = 0;
  private readonly packs: PackWriter;
  /** The lock this process holds on the repository, once taken: index and snapshot writes check it. */
  private held: RepositoryLock | undefined;
  /** Index files and snapshots this process wrote (name → bytes). */
  private readonly writtenObjects = new Map<string, number>();
  /** Writes go to the cache's spool (deferUploads): the lock is checked when they are uploaded. */
  private deferring = false;

  private constructor(
    readonly backend: Backend,
    readonly config: RepositoryConfig,
    private readonly key: Buffer,
    private readonly options: RepositoryOptions,
  ) {
    this.packs = new PackWriter(backend, key, (pack) => {
      for (const e of pack.blobs) {
        this.index.set(e.id, { pack: pack.id, type: e.type, offset: e.offset, length: e.length, rawLength: e.rawLength });
        this.pendingIds.delete(e.id);
      }
      this.unindexed.push(pack);
      this.unindexedBlobs += pack.blobs.length;
    });
  }

  static async init(backend: Backend, password: string, options: RepositoryOptions = {}): Promise<Repository> {
    if (await backend.exists()) throw new RepositoryError(`a repository already exists at ${backend.location}`);
    const now = options.now ?? (() => new Date());
    const master = randomBytes(32);
    const config: RepositoryConfig = {
      version: 1,
      id: randomBytes(16).toString('hex'),
      chunker: options.chunker ? { ...options.chunker } : { ...DEFAULT_CHUNKER, seed: randomBytes(32).toString('hex') },
      created: now().toISOString(),
    };
    const kdf = options.kdf ?? (await calibrateKdf());
    await backend.create();
    const keyFile = await createKeyFile(master, password, kdf, now());
    await backend.save('keys', sha256(keyFile), keyFile);
    // The config is written last: a repository exists once its config does.
    await backend.save('config', 'config', seal(master, Buffer.from(JSON.stringify(config)), 'config'));
    return new Repository(backend, config, master, options);
  }

  /**
   * Opens the repository with `password`. The config is loaded while the keys are listed and
   * loaded (a remote store answers both in one round trip; with the cache's key hint the key file
   * too, and the password's scrypt runs on the cache's copy of it meanwhile), and a missing config
   * is the answer to "is there a repository" (no request asks it first).
   */
  static async open(backend: Backend, password: string, options: RepositoryOptions = {}): Promise<Repository> {
    const sealedConfig = backend.load('config', 'config').then(
      (bytes) => ({ bytes }),
      (error: unknown) => ({ error }),
    );
    const cache = localCopiesOf(backend);
    const hint = await cache?.keyHint();
    const opening = openMasterKey(backend, password, (name, error) => options.onWarning?.(`${error.message}: skipped (remove ${name} from keys/ if it stays so)`), hint);
    opening.catch(() => undefined); // the config's failure is the one reported
    const loaded = await sealedConfig;
    if ('error' in loaded) {
      const code = (loaded.error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') throw new RepositoryError(`no repository at ${backend.location}: create one with 'cvat-backup init'`, { cause: loaded.error });
      throw loaded.error;
    }
    const { master, name, file } = await opening;
    const config = JSON.parse(openSealed(master, loaded.bytes, 'config', 'config').toString('utf8')) as RepositoryConfig;
    if (name !== hint?.name || !hint.file?.equals(file)) await cache?.rememberKey(name, file);
    return new Repository(backend, config, master, options);
  }

  // ---- locks ----

  /**
   * Takes the repository lock for `operation` (shared or exclusive by the operation, see
   * locks.ts), waiting as the repository's lock options say (--retry-lock). From then on every
   * index file and snapshot this repository writes first checks that the lock is still held.
   * Once per operation; throws LockedError (exit 10) when it cannot be had.
   */
  async lock(operation: LockOperation, options: { signal?: AbortSignal } = {}): Promise<RepositoryLock> {
    const lock = await acquireLock(this.backend, operation, { ...this.options.locks, ...(options.signal ? { signal: options.signal } : {}) });
    this.held = lock;
    return lock;
  }

  /**
   * Now on the storage's clock, as the held lock estimates it (locks.ts); undefined without a lock
   * or where the storage tells no times. Ages of stored files are measured with it.
   */
  storageNow(): number | undefined {
    return this.held?.storageNow();
  }

  /**
   * Throws LockLostError if this repository's lock was lost (its file vanished, or it could not
   * be refreshed in time) or released; resolves when no lock was ever taken (library use, tests).
   * Called right before every index file and snapshot write.
   */
  async assertLockHeld(): Promise<void> {
    await this.held?.assertHeld();
  }

  // ---- objects sealed whole (index, snapshots, prune's state) ----

  /**
   * Seals and stores an object under the SHA-256 of its sealed bytes. Index files and snapshots are
   * written only while the lock is held (LockLostError otherwise).
   */
  async saveObject(kind: ObjectKind, value: unknown): Promise<string> {
    const sealed = seal(this.key, Buffer.from(JSON.stringify(value)), kind);
    const id = sha256(sealed);
    if (kind !== 'state' && !this.deferring) await this.assertLockHeld();
    await this.backend.save(kind, id, sealed);
    this.writtenObjects.set(`${kind}/${id}`, sealed.length);
    return id;
  }

  async loadObject<T>(kind: ObjectKind, id: string): Promise<T> {
    const text = await this.fromStorage(kind, id, async () => this.openObject(kind, id, await this.backend.load(kind, id)));
    return parseObject<T>(kind, id, text);
  }

  /** An object's plaintext from its sealed bytes; CorruptArchiveError when they are not that object. */
  private openObject(kind: ObjectKind, id: string, sealed: Buffer): string {
    if (sha256(sealed) !== id) throw new CorruptArchiveError(`${kind}/${id}: content does not match its name`);
    try {
      return openSealed(this.key, sealed, kind, `${kind}/${id}`).toString('utf8');
    } catch (error) {
      throw error instanceof CorruptArchiveError ? error : new CorruptArchiveError(`${kind}/${id}: ${(error as Error).message}`, { cause: error });
    }
  }

  // ---- index ----

  /**
   * Loads every index file once (later calls return at once), INDEX_LOADS at a time (merged in
   * the listing's order). A damaged index file throws CorruptArchiveError (`repair index`
   * rebuilds the index from the packs), unless `onDamaged` is given: then it is reported there
   * and skipped. Calls at the same time share one load.
   */
  async loadIndex(options: { onDamaged?: (name: string, error: CorruptArchiveError) => void } = {}): Promise<void> {
    while (this.indexLoading) await this.indexLoading.catch(() => undefined);
    if (this.indexLoaded) return;
    const loading = this.readIndex(options);
    this.indexLoading = loading;
    try {
      await loading;
    } finally {
      this.indexLoading = undefined;
    }
  }

  private async readIndex(options: { onDamaged?: (name: string, error: CorruptArchiveError) => void }): Promise<void> {
    const packs = new Set<string>();
    let damaged = false;
    await inOrder(
      await this.backend.list('index'),
      INDEX_LOADS,
      // The sealed bytes (outside the JS heap) are what is held ahead; each file is opened and
      // parsed in its turn, so no more than one parsed index file is held at a time, as before.
      ({ name }) => this.backend.load('index', name),
      async (loaded, { name }) => {
        let file: IndexFile;
        try {
          file = await loaded.then((sealed) => {
            try {
              return indexFileOf(name, parseObject('index', name, this.openObject('index', name, sealed)));
            } catch (error) {
              // A damaged cached copy: read again as loadObject does (the copy dropped, the remote read).
              if (error instanceof CorruptArchiveError && localCopiesOf(this.backend)) return this.readIndexFile(name);
              throw error;
            }
          });
        } catch (error) {
          // check goes on past a damaged index file (and says so); everyone else stops.
          if (!(error instanceof CorruptArchiveError) || !options.onDamaged) throw error;
          options.onDamaged(name, error);
          damaged = true;
          return;
        }
        for (const pack of file.packs) {
          packs.add(pack.id);
          for (const b of pack.blobs) this.index.set(b.id, { pack: pack.id, type: b.type, offset: b.offset, length: b.length, rawLength: b.rawLength });
        }
        this.indexFiles.add(name);
      },
    );
    this.indexLoaded = true;
    // Cached tree packs that no index names any more (a prune on another machine removed them).
    if (!damaged) await localCopiesOf(this.backend)?.dropPacksExcept((name) => packs.has(name));
  }

  /** Reads one index file and checks its shape (CorruptArchiveError if it is not an index). */
  async readIndexFile(name: string): Promise<IndexFile> {
    return indexFileOf(name, await this.loadObject<unknown>('index', name));
  }

  /** The index files the last `loadIndex` read. */
  loadedIndexFiles(): ReadonlySet<string> {
    return this.indexFiles;
  }

  /** Forgets the loaded index (after prune or repair replaced the index files). */
  resetIndex(): void {
    this.index = new BlobIndex();
    this.indexFiles = new Set();
    this.indexLoaded = false;
  }

  /**
   * Writes index files naming `packs` (split so that no file names more than INDEX_EVERY
   * blobs); checks the lock first. Returns the names written.
   */
  async saveIndexFiles(packs: IndexedPack[]): Promise<string[]> {
    const names: string[] = [];
    let batch: IndexedPack[] = [];
    let blobs = 0;
    const write = async (): Promise<void> => {
      if (batch.length === 0) return;
      names.push(await this.saveObject('index', { packs: batch } satisfies IndexFile));
      batch = [];
      blobs = 0;
    };
    for (const pack of packs) {
      if (blobs > 0 && blobs + pack.blobs.length > INDEX_EVERY) await write();
      batch.push(pack);
      blobs += pack.blobs.length;
    }
    await write();
    return names;
  }

  has(id: string): boolean {
    return this.index.has(id) || this.pendingIds.has(id);
  }

  location(id: string): BlobLocation | undefined {
    return this.index.get(id);
  }

  blobIds(): IterableIterator<[string, BlobLocation]> {
    return this.index.entries();
  }

  /** Names of the index files this process wrote. */
  writtenIndexFiles(): string[] {
    return [...this.writtenObjects.keys()].filter((k) => k.startsWith('index/')).map((k) => k.slice('index/'.length));
  }

  /** Bytes of packs and of index files and snapshots this process wrote so far. */
  get bytesWritten(): { packs: number; objects: number } {
    let objects = 0;
    for (const n of this.writtenObjects.values()) objects += n;
    return { packs: this.packs.stats.bytes, objects };
  }

  // ---- blobs ----

  /** Stores a blob unless the repository has it; returns its id and whether bytes were added. */
  async saveBlob(type: BlobType, plaintext: Buffer): Promise<{ id: string; added: number }> {
    const id = sha256(plaintext);
    if (this.has(id)) return { id, added: 0 };
    const sealed = sealParts(this.key, await payloadParts(plaintext), blobAad(type, id));
    if (this.has(id)) return { id, added: 0 }; // stored meanwhile (compression yields)
    await this.addToPack(id, type, sealed, plaintext.length);
    return { id, added: sealed.reduce((n, part) => n + part.length, 0) };
  }

  /**
   * Stores a blob that a worker already sealed (see chunk-pool.ts) unless the repository has it.
   * Returns the sealed bytes added (0 for a duplicate).
   */
  async saveSealedBlob(id: string, type: BlobType, sealed: Buffer | Buffer[], rawLength: number): Promise<number> {
    if (this.has(id)) return 0;
    const parts = Array.isArray(sealed) ? sealed : [sealed];
    await this.addToPack(id, type, parts, rawLength);
    return parts.reduce((n, p) => n + p.length, 0);
  }

  /**
   * Prune: copies a blob, still sealed, into the pack of its type being written (no decryption
   * needed), whether or not the index already names it elsewhere. Once that pack is durable the
   * in-memory index points at the copy.
   */
  async repackBlob(id: string, type: BlobType, sealed: Buffer, rawLength: number): Promise<void> {
    await this.addToPack(id, type, [sealed], rawLength);
  }

  /**
   * After a failed write (a backup or copy that stops before its snapshot): the open packs are
   * dropped, the files they stream into closed and deleted, and the blobs that were not stored are
   * forgotten, so that a later save stores them. Never throws.
   */
  async abandonWrites(): Promise<void> {
    await this.packs.abandon();
    // Every pack write is over: what was stored is in the index now, the rest never will be.
    this.pendingIds.clear();
  }

  private async addToPack(id: string, type: BlobType, sealed: Buffer[], rawLength: number): Promise<void> {
    this.pendingIds.add(id);
    await this.packs.add(id, type, sealed, rawLength);
    // Index files are written along the way too, so memory and index file size stay bounded for
    // backups of millions of small files (only packs already durable are named).
    if (this.unindexedBlobs >= INDEX_EVERY) await this.writeIndexFile();
  }

  /**
   * Copy, source side: reads blob `id` as the index places it, authenticates it with this
   * repository's key, decompresses it and checks that its plaintext hashes to `id` and has the
   * indexed length (CorruptArchiveError otherwise).
   */
  async readBlobForCopy(id: string): Promise<BlobForCopy> {
    const where = this.index.get(id);
    if (!where) throw new CorruptArchiveError(`blob ${id.slice(0, 12)} is missing from the index`);
    const what = `pack ${where.pack.slice(0, 12)} blob ${id.slice(0, 12)}`;
    const sealed = await this.backend.load('data', where.pack, { offset: where.offset, length: where.length });
    const framed = openSealed(this.key, sealed, blobAad(where.type, id), what);
    let plaintext: Buffer;
    try {
      plaintext = await unpackPayload(framed, where.rawLength);
    } catch (error) {
      throw new CorruptArchiveError(`${what}: does not decompress (${(error as Error).message})`, { cause: error });
    }
    if (plaintext.length !== where.rawLength) throw new CorruptArchiveError(`${what}: wrong length`);
    if (sha256(plaintext) !== id) throw new CorruptArchiveError(`${what}: content does not match its id`);
    return { id, type: where.type, rawLength: where.rawLength, framed, plaintext };
  }

  /**
   * Copy, target side: seals a blob another repository gave (readBlobForCopy) with this
   * repository's key and adds it to the pack of its type, unless this repository has it. Its
   * compressed framing is reused, not compressed again. Returns the sealed bytes added (0 for a
   * blob already here).
   */
  async saveCopiedBlob(blob: BlobForCopy): Promise<number> {
    if (this.has(blob.id)) return 0;
    const sealed = sealParts(this.key, [blob.framed], blobAad(blob.type, blob.id));
    await this.addToPack(blob.id, blob.type, sealed, blob.rawLength);
    return sealed.reduce((n, part) => n + part.length, 0);
  }

  /**
   * Checks that `sealed` is blob `id` of `type` (authentication only, no decompression): prune
   * copies only blobs that are what the index says. CorruptArchiveError otherwise.
   */
  authenticateSealed(id: string, type: BlobType, sealed: Buffer, where: string): void {
    openSealed(this.key, sealed, blobAad(type, id), where);
  }

  /**
   * Worker threads that chunk, hash, compress and seal files (backups), or read, authenticate and
   * write blobs (restores), with this repository's key. `size` defaults to one per core; a backup
   * asks for one fewer (`backupPoolSize`): its main thread reads small files and packs, a core's
   * worth of work, and every worker costs its own heap and buffers.
   */
  createChunkPool(size?: number): ChunkPool {
    return new ChunkPool(this.key, this.config.chunker, size);
  }

  /**
   * Reads, authenticates and checks a blob; on a worker of `pool` when the backend is local.
   * `at` reads a given copy (check reads every pack's copies) instead of the one the index knows.
   */
  async loadBlob(id: string, pool?: ChunkPool, options: { hash?: boolean; at?: BlobLocation } = {}): Promise<Buffer> {
    return (await this.readBlob(id, pool, options.hash ?? false, { kind: 'reply' }, options.at))!;
  }

  /** Reads and authenticates a blob, keeping nothing (verification before a restore). */
  async checkBlob(id: string, pool?: ChunkPool): Promise<void> {
    await this.readBlob(id, pool, false, { kind: 'discard' });
  }

  /**
   * Reads and authenticates a blob and writes it into the open file `fd` at `position`: on a
   * worker when there is one, so the plaintext never crosses threads.
   */
  async writeBlobTo(id: string, pool: ChunkPool | undefined, fd: number, position: number): Promise<void> {
    const data = await this.readBlob(id, pool, false, { kind: 'file', fd, position });
    if (data === undefined) return;
    let written = 0;
    while (written < data.length) {
      const { bytesWritten } = await new Promise<{ bytesWritten: number }>((resolve, reject) =>
        write(fd, data, written, data.length - written, position + written, (error, bytesWritten) => (error ? reject(error) : resolve({ bytesWritten }))),
      );
      written += bytesWritten;
    }
  }

  /** Returns the plaintext, or undefined when a worker disposed of it as `to` says. */
  private async readBlob(id: string, pool: ChunkPool | undefined, hash: boolean, to: BlobDestination, at?: BlobLocation): Promise<Buffer | undefined> {
    const where = at ?? this.index.get(id);
    if (!where) throw new CorruptArchiveError(`blob ${id.slice(0, 12)} is missing from the index`);
    const local = pool ? this.backend.localPath?.('data', where.pack) : undefined;
    if (pool && local !== undefined) return pool.loadBlob(local, id, where, hash, to);
    return this.fromStorage('data', where.pack, async () => {
      // Tree packs are metadata: a remote repository's cache serves them (backend/cache.ts).
      const sealed = await this.backend.load('data', where.pack, { offset: where.offset, length: where.length }, where.type === 'tree' ? { metadata: true } : undefined);
      return this.openBlob(id, where, sealed, hash);
    });
  }

  /**
   * Runs `read` of a stored file; when it finds the file damaged (CorruptArchiveError) and what it
   * read was a cached copy, drops that copy and reads once more, from the remote: a damaged cache
   * never breaks a command, and never hides what the repository itself holds.
   */
  private async fromStorage<T>(kind: FileKind, name: string, read: () => Promise<T>): Promise<T> {
    try {
      return await read();
    } catch (error) {
      if (!(error instanceof CorruptArchiveError)) throw error;
      const cache = localCopiesOf(this.backend);
      if (!cache || !(await cache.forget(kind, name))) throw error;
      this.options.onWarning?.(`the cached copy of ${kind}/${name.slice(0, 12)} was damaged (${error.message}): dropped, read from the repository instead`);
      return read();
    }
  }

  /**
   * Authenticates, unpacks and checks blob `id` from its sealed bytes, read by the caller from
   * `where` (check reads whole packs at once). CorruptArchiveError when they are not that blob.
   */
  async openBlob(id: string, where: BlobLocation, sealed: Buffer, hash: boolean): Promise<Buffer> {
    const framed = openSealed(this.key, sealed, blobAad(where.type, id), `pack ${where.pack.slice(0, 12)} blob ${id.slice(0, 12)}`);
    const plaintext = await unpackPayload(framed, where.rawLength);
    // The id is authenticated with the blob (AAD), so a hash check only guards against our own bugs:
    // done where every byte is checked on purpose (check --read-data), skipped on the hot path.
    if (hash && sha256(plaintext) !== id) {
      throw new CorruptArchiveError(`blob ${id.slice(0, 12)} in pack ${where.pack.slice(0, 12)}: content does not match its id`);
    }
    if (plaintext.length !== where.rawLength) throw new CorruptArchiveError(`blob ${id.slice(0, 12)} in pack ${where.pack.slice(0, 12)}: wrong length`);
    return plaintext;
  }

  private async writeIndexFile(): Promise<void> {
    if (this.unindexed.length === 0) return;
    const packs = this.unindexed;
    this.unindexed = [];
    this.unindexedBlobs = 0;
    try {
      await this.saveObject('index', { packs: packs.map((p) => ({ id: p.id, blobs: p.blobs, nameIsHash: true as const })) } satisfies IndexFile);
    } catch (error) {
      // Not written: the packs stay unindexed, for a later attempt (or prune's grace period).
      this.unindexed = [...packs, ...this.unindexed];
      this.unindexedBlobs += packs.reduce((n, p) => n + p.blobs.length, 0);
      throw error;
    }
  }

  /**
   * Holds every write of this repository (packs, index files) on this machine until `drain`, so
   * that a backup's downtime never waits on the network (backend/cache.ts). A repository without
   * a local cache (a local folder, or --no-cache) writes directly, and its deferral does nothing.
   * One deferral at a time.
   */
  async deferUploads(): Promise<UploadDeferral> {
    const spool = await localCopiesOf(this.backend)?.deferUploads();
    if (!spool) return { active: false, drain: () => Promise.resolve({ packs: 0, files: 0, bytes: 0 }), abandon: () => Promise.resolve() };
    this.deferring = true;
    const end = (): void => {
      this.deferring = false;
    };
    return {
      active: true,
      drain: async (options = {}) => {
        // Everything still open becomes a file in the spool first; then packs go before the
        // index files that name them, and those only while the lock is held.
        await this.flush();
        const files = spool.pending();
        const summary = { packs: files.filter((f) => f.kind === 'data').length, files: files.length, bytes: files.reduce((n, f) => n + f.size, 0) };
        options.onStart?.(summary);
        await spool.upload(['data'], options);
        await this.assertLockHeld();
        await spool.upload(['index'], options);
        await spool.upload([...new Set(spool.pending().map((f) => f.kind))], options);
        await spool.end();
        end();
        return summary;
      },
      abandon: async () => {
        if (!this.deferring) return;
        // No pack write may still be on its way into the spool when it goes; the packs still open
        // are dropped, not written into the spool only to be deleted with it.
        await this.packs.abandon();
        end();
        await spool.discard();
        // What only the spool held is gone: the in-memory index must not claim it.
        this.resetIndex();
        this.unindexed = [];
        this.unindexedBlobs = 0;
        this.pendingIds.clear();
      },
    };
  }

  /** Writes the open packs and an index file for every pack not yet indexed. Call before a snapshot. */
  async flush(): Promise<void> {
    await this.packs.flush();
    await this.writeIndexFile();
  }

  /**
   * Writes the open packs without writing an index for them: their blobs become readable (a pass
   * of a two-phase backup reads the trees of the pass before), and prune gets its copies on disk.
   */
  async flushPacksOnly(): Promise<void> {
    await this.packs.flush();
  }

  /**
   * Reads a pack's own header (check compares it with the index; repair index rebuilds the index
   * from it). `size` saves a stat when a listing already gave it. CorruptArchiveError when the
   * pack is missing, truncated or its header does not open.
   */
  async readPackHeader(packId: string, size?: number): Promise<PackHeaderEntry[]> {
    const length = size ?? (await this.backend.stat('data', packId));
    const short = packId.slice(0, 12);
    if (length === undefined || length < 4) throw new CorruptArchiveError(`pack ${short} is missing or truncated`);
    const tail = await this.backend.load('data', packId, { offset: length - 4, length: 4 });
    if (tail.length < 4) throw new CorruptArchiveError(`pack ${short} is truncated`);
    const headerLength = tail.readUInt32LE(0);
    if (headerLength + 4 > length) throw new CorruptArchiveError(`pack ${short}: bad header length`);
    const header = await this.backend.load('data', packId, { offset: length - 4 - headerLength, length: headerLength });
    let entries: unknown;
    try {
      entries = JSON.parse(openSealed(this.key, header, 'pack-header', `pack ${short} header`).toString('utf8'));
    } catch (error) {
      throw error instanceof CorruptArchiveError ? error : new CorruptArchiveError(`pack ${short}: header is not valid JSON`, { cause: error });
    }
    if (!Array.isArray(entries) || !entries.every((e) => isHeaderEntry(e, length - 4 - headerLength))) throw new CorruptArchiveError(`pack ${short}: header entries are not valid`);
    return entries;
  }
}

/** Writes held on this machine during a downtime (Repository.deferUploads). */
export interface UploadDeferral {
  /** False where writes go directly to the storage (a local repository, no cache). */
  readonly active: boolean;
  /**
   * Writes the open packs and the index into the spool, then uploads it: packs, then (the lock
   * checked) index files; then writes go directly again. Retries as `options` say; rejects if a
   * file cannot be uploaded (the deferral stays: `abandon` it). Returns what was uploaded.
   */
  drain(options?: UploadOptions & { onStart?: (pending: UploadSummary) => void }): Promise<UploadSummary>;
  /** Ends the deferral and deletes what was not uploaded (the operation failed). Idempotent. */
  abandon(): Promise<void>;
}

export interface UploadSummary {
  packs: number;
  files: number;
  bytes: number;
}

function isHeaderEntry(value: unknown, dataLength: number): value is PackHeaderEntry {
  const e = value as Partial<PackHeaderEntry> | null;
  return (
    typeof e === 'object' &&
    e !== null &&
    typeof e.id === 'string' &&
    /^[0-9a-f]{64}$/.test(e.id) &&
    (e.type === 'data' || e.type === 'tree') &&
    Number.isSafeInteger(e.offset) &&
    Number.isSafeInteger(e.length) &&
    Number.isSafeInteger(e.rawLength) &&
    e.offset! >= 0 &&
    e.length! > 0 &&
    e.rawLength! >= 0 &&
    e.offset! + e.length! <= dataLength
  );
}

/** An object's JSON; CorruptArchiveError when it is none. */
function parseObject<T>(kind: ObjectKind, id: string, text: string): T {
  try {
    return JSON.parse(text) as T;
  } catch (error) {
    throw new CorruptArchiveError(`${kind}/${id}: not valid JSON`, { cause: error });
  }
}

/** The value as an index file (CorruptArchiveError if it is not one). */
function indexFileOf(name: string, value: unknown): IndexFile {
  if (!isIndexFile(value)) throw new CorruptArchiveError(`index/${name.slice(0, 12)}: not an index file`);
  return value;
}

function isIndexFile(value: unknown): value is IndexFile {
  const f = value as Partial<IndexFile> | null;
  return typeof f === 'object' && f !== null && Array.isArray(f.packs) && f.packs.every((p) => typeof p?.id === 'string' && Array.isArray(p.blobs));
}
