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
import type { Backend } from '../backend/backend.js';
import { CorruptArchiveError, RepositoryError } from '../errors.js';
import { DEFAULT_CHUNKER, type ChunkerParams } from './chunker.js';
import { open as openSealed, seal, sealParts, type KdfParams } from './crypto.js';
import { calibrateKdf, createKeyFile, openMasterKey } from './keys.js';
import { payloadParts, unpackPayload } from './compression.js';
import { ChunkPool } from './chunk-pool.js';
import type { BlobDestination } from './blob-worker.js';
import { blobAad } from './aad.js';
import { BlobIndex, type BlobLocation, type BlobType } from './blob-index.js';
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
}

export class Repository {
  private index = new BlobIndex();
  private indexLoaded = false;
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
      chunker: { ...DEFAULT_CHUNKER, seed: randomBytes(32).toString('hex') },
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

  static async open(backend: Backend, password: string, options: RepositoryOptions = {}): Promise<Repository> {
    if (!(await backend.exists())) {
      throw new RepositoryError(`no repository at ${backend.location}: create one with 'cvat-backup init'`);
    }
    const master = await openMasterKey(backend, password, (name, error) => options.onWarning?.(`${error.message}: skipped (remove ${name} from keys/ if it stays so)`));
    const config = JSON.parse(openSealed(master, await backend.load('config', 'config'), 'config', 'config').toString('utf8')) as RepositoryConfig;
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
    if (kind !== 'state') await this.assertLockHeld();
    await this.backend.save(kind, id, sealed);
    this.writtenObjects.set(`${kind}/${id}`, sealed.length);
    return id;
  }

  async loadObject<T>(kind: ObjectKind, id: string): Promise<T> {
    const sealed = await this.backend.load(kind, id);
    if (sha256(sealed) !== id) throw new CorruptArchiveError(`${kind}/${id}: content does not match its name`);
    let text: string;
    try {
      text = openSealed(this.key, sealed, kind, `${kind}/${id}`).toString('utf8');
    } catch (error) {
      throw error instanceof CorruptArchiveError ? error : new CorruptArchiveError(`${kind}/${id}: ${(error as Error).message}`, { cause: error });
    }
    try {
      return JSON.parse(text) as T;
    } catch (error) {
      throw new CorruptArchiveError(`${kind}/${id}: not valid JSON`, { cause: error });
    }
  }

  // ---- index ----

  /**
   * Loads every index file once (later calls return at once). A damaged index file throws
   * CorruptArchiveError (`repair index` rebuilds the index from the packs), unless `onDamaged`
   * is given: then it is reported there and skipped.
   */
  async loadIndex(options: { onDamaged?: (name: string, error: CorruptArchiveError) => void } = {}): Promise<void> {
    if (this.indexLoaded) return;
    for (const { name } of await this.backend.list('index')) {
      let file: IndexFile;
      try {
        file = await this.readIndexFile(name);
      } catch (error) {
        // check goes on past a damaged index file (and says so); everyone else stops.
        if (!(error instanceof CorruptArchiveError) || !options.onDamaged) throw error;
        options.onDamaged(name, error);
        continue;
      }
      for (const pack of file.packs) {
        for (const b of pack.blobs) this.index.set(b.id, { pack: pack.id, type: b.type, offset: b.offset, length: b.length, rawLength: b.rawLength });
      }
      this.indexFiles.add(name);
    }
    this.indexLoaded = true;
  }

  /** Reads one index file and checks its shape (CorruptArchiveError if it is not an index). */
  async readIndexFile(name: string): Promise<IndexFile> {
    const file = await this.loadObject<IndexFile>('index', name);
    if (!isIndexFile(file)) throw new CorruptArchiveError(`index/${name.slice(0, 12)}: not an index file`);
    return file;
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

  private async addToPack(id: string, type: BlobType, sealed: Buffer[], rawLength: number): Promise<void> {
    this.pendingIds.add(id);
    await this.packs.add(id, type, sealed, rawLength);
    // Index files are written along the way too, so memory and index file size stay bounded for
    // backups of millions of small files (only packs already durable are named).
    if (this.unindexedBlobs >= INDEX_EVERY) await this.writeIndexFile();
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
    const sealed = await this.backend.load('data', where.pack, { offset: where.offset, length: where.length });
    return this.openBlob(id, where, sealed, hash);
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

function isIndexFile(value: unknown): value is IndexFile {
  const f = value as Partial<IndexFile> | null;
  return typeof f === 'object' && f !== null && Array.isArray(f.packs) && f.packs.every((p) => typeof p?.id === 'string' && Array.isArray(p.blobs));
}
