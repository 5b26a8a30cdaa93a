/**
 * The content-addressed snapshot repository (format: docs/repository-format.md).
 *
 * Blobs (file chunks and directory trees) are identified by the SHA-256 of their plaintext,
 * compressed (zstd, unless incompressible), sealed (AES-256-GCM under the master key) and packed
 * into pack files of about 16 MiB. Each pack ends with its own sealed header listing its blobs, so
 * the index can be rebuilt from the packs alone. Index files map blob ids to (pack, offset,
 * length); snapshots name the root trees of every volume.
 *
 * Crash-safe write order: a pack is saved (atomically, fsynced) before the index file that
 * names it, and every index file before the snapshot that needs it. A crash leaves at worst
 * unreferenced packs, which `prune` removes; never a snapshot that points at missing data.
 */
import { createHash, randomBytes } from 'node:crypto';
import { write } from 'node:fs';
import { hostname } from 'node:os';
import type { Backend } from '../backend/backend.js';
import { CorruptArchiveError, LockedError, RepositoryError } from '../errors.js';
import { processAlive } from '../host.js';
import { DEFAULT_CHUNKER, type ChunkerParams } from './chunker.js';
import { open as openSealed, seal, type KdfParams } from './crypto.js';
import { calibrateKdf, createKeyFile, openMasterKey } from './keys.js';
import { packPayload, unpackPayload } from './compression.js';
import { ChunkPool } from './chunk-pool.js';
import type { BlobDestination } from './blob-worker.js';
import { blobAad } from './aad.js';
import { BlobIndex, type BlobLocation, type BlobType } from './blob-index.js';

export type { BlobLocation, BlobType } from './blob-index.js';

export interface RepositoryConfig {
  version: 1;
  id: string;
  chunker: ChunkerParams;
  created: string;
}

interface PackHeaderEntry {
  id: string;
  type: BlobType;
  offset: number;
  length: number;
  rawLength: number;
}

interface IndexFile {
  packs: { id: string; blobs: Omit<PackHeaderEntry, never>[] }[];
}

export const PACK_TARGET = 16 * 1024 * 1024;
/**
 * A pack also closes at this many blobs: until it is written, each of its blobs is held as an
 * object (header entry, pending id, sealed buffer), so a pack of tiny files must not grow to
 * hundreds of thousands of them.
 */
export const PACK_MAX_BLOBS = 8192;
/** Blobs named per index file written during a backup. */
const INDEX_EVERY = 50_000;

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export interface RepositoryOptions {
  now?: () => Date;
  /** scrypt parameters of a new repository's key (default: calibrated to about 0.5 s here). */
  kdf?: Omit<KdfParams, 'salt'>;
  /** Told of what does not stop the repository from opening (a damaged key file beside a good one). */
  onWarning?: (message: string) => void;
}

export class Repository {
  private readonly index = new BlobIndex();
  private indexLoaded = false;
  /** Blobs sealed but not yet written in a pack. */
  private packParts: Buffer[] = [];
  private packEntries: PackHeaderEntry[] = [];
  private packSize = 0;
  /** Packs written since the last index file. */
  private unindexed: { id: string; blobs: PackHeaderEntry[] }[] = [];
  private readonly pendingIds = new Set<string>();

  private constructor(
    readonly backend: Backend,
    readonly config: RepositoryConfig,
    private readonly key: Buffer,
    private readonly now: () => Date,
  ) {}

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
    return new Repository(backend, config, master, now);
  }

  static async open(backend: Backend, password: string, options: RepositoryOptions = {}): Promise<Repository> {
    if (!(await backend.exists())) {
      throw new RepositoryError(`no repository at ${backend.location}: create one with 'cvat-backup init'`);
    }
    const master = await openMasterKey(backend, password, (name, error) => options.onWarning?.(`${error.message}: skipped (remove ${name} from keys/ if it stays so)`));
    const config = JSON.parse(openSealed(master, await backend.load('config', 'config'), 'config', 'config').toString('utf8')) as RepositoryConfig;
    return new Repository(backend, config, master, options.now ?? (() => new Date()));
  }

  // ---- objects sealed whole (index, snapshots) ----

  async saveObject(kind: 'index' | 'snapshots', value: unknown): Promise<string> {
    const sealed = seal(this.key, Buffer.from(JSON.stringify(value)), kind);
    const id = sha256(sealed);
    await this.backend.save(kind, id, sealed);
    return id;
  }

  async loadObject<T>(kind: 'index' | 'snapshots', id: string): Promise<T> {
    const sealed = await this.backend.load(kind, id);
    if (sha256(sealed) !== id) throw new CorruptArchiveError(`${kind}/${id}: content does not match its name`);
    return JSON.parse(openSealed(this.key, sealed, kind, `${kind}/${id}`).toString('utf8')) as T;
  }

  // ---- index ----

  async loadIndex(): Promise<void> {
    if (this.indexLoaded) return;
    for (const name of await this.backend.list('index')) {
      const file = await this.loadObject<IndexFile>('index', name);
      for (const pack of file.packs) {
        for (const b of pack.blobs) this.index.set(b.id, { pack: pack.id, type: b.type, offset: b.offset, length: b.length, rawLength: b.rawLength });
      }
    }
    this.indexLoaded = true;
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

  // ---- blobs ----

  /** Stores a blob unless the repository has it; returns its id and whether bytes were added. */
  async saveBlob(type: BlobType, plaintext: Buffer): Promise<{ id: string; added: number }> {
    const id = sha256(plaintext);
    if (this.has(id)) return { id, added: 0 };
    const sealed = seal(this.key, await packPayload(plaintext), blobAad(type, id));
    this.packEntries.push({ id, type, offset: this.packSize, length: sealed.length, rawLength: plaintext.length });
    this.packParts.push(sealed);
    this.packSize += sealed.length;
    this.pendingIds.add(id);
    if (this.packSize >= PACK_TARGET || this.packEntries.length >= PACK_MAX_BLOBS) await this.writePack();
    return { id, added: sealed.length };
  }

  /**
   * Stores a blob that a worker already sealed (see chunk-pool.ts) unless the repository has it.
   * Returns the sealed bytes added (0 for a duplicate).
   */
  async saveSealedBlob(id: string, type: BlobType, sealed: Buffer, rawLength: number): Promise<number> {
    if (this.has(id)) return 0;
    this.packEntries.push({ id, type, offset: this.packSize, length: sealed.length, rawLength });
    this.packParts.push(sealed);
    this.packSize += sealed.length;
    this.pendingIds.add(id);
    if (this.packSize >= PACK_TARGET || this.packEntries.length >= PACK_MAX_BLOBS) await this.writePack();
    return sealed.length;
  }

  /** Worker threads that chunk, hash, compress and seal files with this repository's key. */
  createChunkPool(size?: number): ChunkPool {
    return new ChunkPool(this.key, this.config.chunker, size);
  }

  /** Reads, authenticates and checks a blob; on a worker of `pool` when the backend is local. */
  async loadBlob(id: string, pool?: ChunkPool, options: { hash?: boolean } = {}): Promise<Buffer> {
    return (await this.readBlob(id, pool, options.hash ?? false, { kind: 'reply' }))!;
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
  private async readBlob(id: string, pool: ChunkPool | undefined, hash: boolean, to: BlobDestination): Promise<Buffer | undefined> {
    const where = this.index.get(id);
    if (!where) throw new CorruptArchiveError(`blob ${id.slice(0, 12)} is missing from the index`);
    const local = pool ? this.backend.localPath?.('data', where.pack) : undefined;
    if (pool && local !== undefined) return pool.loadBlob(local, id, where, hash, to);
    const sealed = await this.backend.load('data', where.pack, { offset: where.offset, length: where.length });
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

  /** Pack saves under way: the next pack fills while the disk writes the last one (one write pending at a time). */
  private inFlight: Promise<void>[] = [];

  private async writePack(): Promise<void> {
    if (this.packEntries.length === 0) return;
    const entries = this.packEntries;
    const header = seal(this.key, Buffer.from(JSON.stringify(entries)), 'pack-header');
    const length = Buffer.alloc(4);
    length.writeUInt32LE(header.length);
    // A pack is named by a random id: its blobs are authenticated one by one (AES-GCM with the
    // blob id as associated data), so hashing 16 MiB per pack on this thread would buy nothing.
    const pack = [...this.packParts, header, length];
    const id = randomBytes(32).toString('hex');
    this.packParts = [];
    this.packEntries = [];
    this.packSize = 0;
    // A blob enters the index only once its pack is durable; until then it is "pending".
    const saving = this.backend.save('data', id, pack).then(() => {
      for (const e of entries) {
        this.index.set(e.id, { pack: id, type: e.type, offset: e.offset, length: e.length, rawLength: e.rawLength });
        this.pendingIds.delete(e.id);
      }
      this.unindexed.push({ id, blobs: entries });
    });
    this.inFlight.push(saving);
    saving.catch(() => undefined); // awaited below or by flush; never unhandled
    while (this.inFlight.length > 1) await this.inFlight.shift();
    // Index files are written along the way too, so memory and index file size stay bounded for
    // backups of millions of small files (only packs already durable are named).
    if (this.unindexed.reduce((n, p) => n + p.blobs.length, 0) >= INDEX_EVERY) await this.writeIndexFile();
  }

  private async writeIndexFile(): Promise<void> {
    if (this.unindexed.length === 0) return;
    const packs = this.unindexed;
    this.unindexed = [];
    await this.saveObject('index', { packs } satisfies IndexFile);
  }

  private async waitForPacks(): Promise<void> {
    const pending = this.inFlight;
    this.inFlight = [];
    await Promise.all(pending);
  }

  /** Writes the open pack and an index file for every pack not yet indexed. Call before a snapshot. */
  async flush(): Promise<void> {
    await this.writePack();
    await this.waitForPacks();
    await this.writeIndexFile();
  }

  /** Prune: moves a blob, still sealed, into the pack being written (no decryption needed). */
  async copyBlobToNewPack(id: string): Promise<void> {
    const where = this.index.get(id);
    if (!where) throw new CorruptArchiveError(`blob ${id.slice(0, 12)} is missing from the index`);
    const sealed = await this.backend.load('data', where.pack, { offset: where.offset, length: where.length });
    this.packEntries.push({ id, type: where.type, offset: this.packSize, length: sealed.length, rawLength: where.rawLength });
    this.packParts.push(sealed);
    this.packSize += sealed.length;
    this.pendingIds.add(id);
    if (this.packSize >= PACK_TARGET || this.packEntries.length >= PACK_MAX_BLOBS) await this.writePack();
  }

  /**
   * Writes the open pack without writing an index for it: its blobs become readable (a pass of a
   * two-phase backup reads the trees of the pass before), and prune gets its copies on disk.
   */
  async flushPacksOnly(): Promise<void> {
    await this.writePack();
    await this.waitForPacks();
  }

  /** Prune: writes one index file naming exactly `keep` at their current places. */
  async rewriteIndex(keep: Set<string>): Promise<void> {
    const packs = new Map<string, PackHeaderEntry[]>();
    for (const id of keep) {
      const where = this.index.get(id);
      if (!where) continue;
      packs.set(where.pack, [...(packs.get(where.pack) ?? []), { id, type: where.type, offset: where.offset, length: where.length, rawLength: where.rawLength }]);
    }
    await this.saveObject('index', { packs: [...packs].map(([id, blobs]) => ({ id, blobs })) } satisfies IndexFile);
    for (const id of [...this.index.keys()]) if (!keep.has(id)) this.index.delete(id);
    this.unindexed = [];
  }

  /** Reads a pack's own header (used by check and prune to rebuild knowledge from the packs). */
  async readPackHeader(packId: string): Promise<PackHeaderEntry[]> {
    const size = await this.backend.stat('data', packId);
    if (size === undefined || size < 4) throw new CorruptArchiveError(`pack ${packId.slice(0, 12)} is missing or truncated`);
    const tail = await this.backend.load('data', packId, { offset: size - 4, length: 4 });
    const headerLength = tail.readUInt32LE(0);
    if (headerLength + 4 > size) throw new CorruptArchiveError(`pack ${packId.slice(0, 12)}: bad header length`);
    const header = await this.backend.load('data', packId, { offset: size - 4 - headerLength, length: headerLength });
    return JSON.parse(openSealed(this.key, header, 'pack-header', `pack ${packId.slice(0, 12)} header`).toString('utf8')) as PackHeaderEntry[];
  }

  // ---- locks ----

  /**
   * Takes the repository lock: exclusive for writers (backup, forget, prune), shared for readers.
   * A lock of a dead process on this host, or older than `staleMs` without refresh, is stale.
   */
  async lock(exclusive: boolean, operation: string, staleMs = 30 * 60 * 1000): Promise<{ release: () => Promise<void> }> {
    const now = this.now();
    for (const name of await this.backend.list('locks')) {
      let holder: { exclusive: boolean; pid: number; hostname: string; time: string; operation: string };
      try {
        holder = JSON.parse((await this.backend.load('locks', name)).toString('utf8')) as typeof holder;
      } catch {
        continue; // removed meanwhile, or half-written by a crashed process
      }
      const dead = holder.hostname === hostname() && !processAlive(holder.pid);
      const old = now.getTime() - new Date(holder.time).getTime() > staleMs;
      if (dead || old) {
        await this.backend.remove('locks', name);
        continue;
      }
      if (exclusive || holder.exclusive) {
        throw new LockedError(
          `repository ${this.backend.location} is locked by ${holder.operation} (pid ${holder.pid} on ${holder.hostname} since ${holder.time}); wait for it, or if it is gone remove ${this.backend.location}/locks/${name}`,
        );
      }
    }
    const name = randomBytes(16).toString('hex');
    await this.backend.save('locks', name, Buffer.from(JSON.stringify({ exclusive, pid: process.pid, hostname: hostname(), time: now.toISOString(), operation })));
    // Two processes may have listed at the same time: look again now that ours is visible, and
    // back off if a conflicting lock appeared. Both may back off; never both go on.
    for (const other of await this.backend.list('locks')) {
      if (other === name) continue;
      const holder = await this.backend.load('locks', other).then((b) => JSON.parse(b.toString('utf8')) as { exclusive: boolean }).catch(() => undefined);
      if (holder && (exclusive || holder.exclusive)) {
        await this.backend.remove('locks', name);
        throw new LockedError(`repository ${this.backend.location} is locked by another cvat-backup: try again`);
      }
    }
    return { release: () => this.backend.remove('locks', name) };
  }
}
