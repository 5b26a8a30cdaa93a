/**
 * Pack assembly (format: docs/repository-format.md, "Blobs and packs").
 *
 * Sealed blobs are appended to an open pack of their type — tree blobs and data blobs never share
 * a pack, as in restic's packer manager — and a pack is written when it reaches 16 MiB or 8192
 * blobs, or when the caller flushes. Keeping trees apart means prune can drop dead trees (which
 * change with every backup) without rewriting big data packs, and a reader that walks trees
 * touches only small tree packs.
 *
 * A pack is: the sealed blobs, its sealed header (a JSON array of entries), the header's length
 * (uint32 LE). It is named by the SHA-256 of those bytes, as restic names its packs: the hash is
 * computed as the blobs arrive (no second pass), and anyone holding the bytes can verify them
 * against the name without the key — a storage server on upload, `check --read-data` end to end.
 * (Builds before this named packs by 32 random bytes; readers take pack names as opaque, and the
 * index says which packs are named by their hash: see repository.ts, `IndexedPack.nameIsHash`.)
 *
 * Where the backend can stage a file (`Backend.stage`: the local folder), a pack is written as its
 * blobs arrive, in batches of about 1 MiB, and committed (fsync, rename) when it closes: memory
 * holds one batch per blob type, not whole packs — which is most of a first backup's footprint
 * otherwise. Elsewhere the pack is held whole and saved at once. Either way one pack commit is
 * pending at a time: the next pack fills while the disk syncs the last one.
 */
import { createHash, type Hash } from 'node:crypto';
import type { Backend, StagedFile } from '../backend/backend.js';
import type { BlobType } from './blob-index.js';
import { seal } from './crypto.js';
import { GarbageHint } from './gc-hint.js';

/** One blob as a pack's header (and the index) describes it. */
export interface PackHeaderEntry {
  id: string;
  type: BlobType;
  /** Offset and length of the sealed blob in the pack. */
  offset: number;
  length: number;
  /** Length of the plaintext. */
  rawLength: number;
}

/** A pack that is durable in the backend. */
export interface WrittenPack {
  id: string;
  blobs: PackHeaderEntry[];
  /** Bytes of the pack file. */
  size: number;
}

export const PACK_TARGET = 16 * 1024 * 1024;
/**
 * A pack also closes at this many blobs: until it is written, each of its blobs is held as an
 * object (header entry, pending id, sealed buffer), so a pack of tiny files must not grow to
 * hundreds of thousands of them.
 */
export const PACK_MAX_BLOBS = 8192;

/** Sealed bytes a streamed pack collects before it writes them (one write call per batch). */
const BATCH = 1 << 20;

/**
 * The open pack of one blob type: its entries, and its sealed blobs — collected whole, or (when
 * `staged`) written to the staged file batch by batch.
 */
class OpenPack {
  parts: Buffer[] = [];
  partsSize = 0;
  entries: PackHeaderEntry[] = [];
  size = 0;
  /** SHA-256 of the pack's bytes so far, in the order they are written: the pack's name. */
  readonly hash: Hash = createHash('sha256');
  /** The last batch write; each waits for the one before (a staged file's appends must not overlap). */
  private writing: Promise<void> = Promise.resolve();

  /**
   * `staged`: the file this pack streams into (created when the pack opened), or undefined to
   * collect. `garbage` hears of every batch written: its buffers are garbage at once (gc-hint.ts).
   */
  constructor(
    readonly staged: Promise<StagedFile> | undefined,
    private readonly garbage: GarbageHint,
  ) {
    staged?.catch(() => undefined); // awaited by the first batch write
  }

  /** Adds a blob; resolves when its batch may be dropped from memory (at once, unless a batch is written now). */
  async add(id: string, type: BlobType, sealed: Buffer[], rawLength: number): Promise<void> {
    const length = sealed.reduce((n, part) => n + part.length, 0);
    this.entries.push({ id, type, offset: this.size, length, rawLength });
    for (const part of sealed) this.hash.update(part);
    this.parts.push(...sealed);
    this.partsSize += length;
    this.size += length;
    if (this.staged && this.partsSize >= BATCH) await this.writeBatch();
  }

  /** Writes the collected parts to the staged file (backpressure: waits for the batch before). */
  async writeBatch(): Promise<void> {
    const staged = this.staged;
    if (!staged || this.parts.length === 0) return this.writing;
    const parts = this.parts;
    this.parts = [];
    this.partsSize = 0;
    this.writing = this.writing.then(async () => {
      await (await staged).append(parts);
      this.garbage.note(parts.reduce((n, part) => n + part.length, 0));
    });
    return this.writing;
  }

  get full(): boolean {
    return this.size >= PACK_TARGET || this.entries.length >= PACK_MAX_BLOBS;
  }

  /** Drops the pack: once its batch writes are over, closes and deletes the file it streams into. Never throws. */
  async discard(): Promise<void> {
    this.parts = [];
    this.partsSize = 0;
    if (!this.staged) return;
    await this.writing.catch(() => undefined);
    const staged = await this.staged.catch(() => undefined);
    await staged?.abort().catch(() => undefined);
  }
}

/**
 * The packers of a repository writer: one open pack per blob type, written to the backend.
 * `onDurable` hears of each pack once it is saved (fsynced, renamed): only then may an index name
 * its blobs.
 */
export class PackWriter {
  private readonly open = new Map<BlobType, OpenPack>();
  /** Pack saves under way, oldest first; at most one is left pending while a caller goes on. */
  private inFlight: Promise<void>[] = [];
  private written = 0;
  private writtenBytes = 0;
  private readonly garbage = new GarbageHint();

  constructor(
    private readonly backend: Backend,
    private readonly key: Buffer,
    private readonly onDurable: (pack: WrittenPack) => void,
  ) {}

  /**
   * Appends a sealed blob (in parts, written in order: see sealParts) to the open pack of its
   * type and writes that pack when it is full.
   * Resolves once the blob is accepted: when a pack is written, only after the write before it
   * has finished (backpressure). May be called concurrently; blobs are appended in call order.
   * Rejects with the backend's error when a pack write failed; the blobs of that pack are then
   * not stored (they never reach `onDurable`), and the writer should be abandoned.
   */
  async add(id: string, type: BlobType, sealed: Buffer[], rawLength: number): Promise<void> {
    let pack = this.open.get(type);
    if (!pack) {
      pack = new OpenPack(this.backend.stage?.('data'), this.garbage);
      this.open.set(type, pack);
    }
    await pack.add(id, type, sealed, rawLength);
    if (pack.full && this.open.get(type) === pack) await this.write(type);
  }

  /**
   * After a failure (a backup that stops before its snapshot): waits for the pack writes under
   * way, drops the open packs and closes and deletes the files they stream into. Their blobs are
   * never stored; the writer may be used again. Never throws.
   */
  async abandon(): Promise<void> {
    const open = [...this.open.values()];
    this.open.clear();
    await Promise.allSettled(this.inFlight.splice(0));
    for (const pack of open) await pack.discard();
  }

  /** Packs and bytes written by this writer so far. */
  get stats(): { packs: number; bytes: number } {
    return { packs: this.written, bytes: this.writtenBytes };
  }

  /**
   * Writes every open pack, however small, and waits for every pack write. Idempotent; rejects
   * with the first failed write's error.
   */
  async flush(): Promise<void> {
    for (const type of [...this.open.keys()]) await this.write(type);
    await this.settle(this.inFlight.length);
  }

  /**
   * Waits for the `count` oldest pack writes. If one failed, waits for every other write too
   * before rethrowing, so that no write is still going on when the caller hears of the failure.
   */
  private async settle(count: number): Promise<void> {
    const waiting = this.inFlight.splice(0, count);
    const results = await Promise.allSettled(waiting);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed === undefined) return;
    const rest = this.inFlight;
    this.inFlight = [];
    await Promise.allSettled(rest);
    throw failed.reason;
  }

  private async write(type: BlobType): Promise<void> {
    const pack = this.open.get(type);
    if (!pack || pack.entries.length === 0) return;
    this.open.delete(type);
    const header = seal(this.key, Buffer.from(JSON.stringify(pack.entries)), 'pack-header');
    const length = Buffer.alloc(4);
    length.writeUInt32LE(header.length);
    const id = pack.hash.update(header).update(length).digest('hex');
    const size = pack.size + header.length + 4;
    const store = async (): Promise<void> => {
      // Tree packs are metadata: a remote repository's cache keeps them (backend/cache.ts). The
      // name is the content's SHA-256: a store may have the server check the upload against it.
      if (!pack.staged) return this.backend.save('data', id, [...pack.parts, header, length], type === 'tree' ? { metadata: true, sha256: id } : { sha256: id });
      const staged = await pack.staged;
      try {
        pack.parts.push(header, length);
        await pack.writeBatch();
        await staged.commit(id);
      } catch (error) {
        await staged.abort();
        throw error;
      }
    };
    const saving = store().then(() => {
      this.written++;
      this.writtenBytes += size;
      this.onDurable({ id, blobs: pack.entries, size });
    });
    this.inFlight.push(saving);
    saving.catch(() => undefined); // awaited below or by flush; never unhandled
    await this.settle(this.inFlight.length - 1);
  }
}
