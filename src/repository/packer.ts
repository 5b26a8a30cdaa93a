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
 * (uint32 LE). It is named by 32 random bytes: its blobs are authenticated one by one, so hashing
 * 16 MiB per pack would buy nothing. One pack write is pending at a time: the next pack fills
 * while the disk writes the last one, and memory stays bounded at about two packs per type.
 */
import { randomBytes } from 'node:crypto';
import type { Backend } from '../backend/backend.js';
import type { BlobType } from './blob-index.js';
import { seal } from './crypto.js';

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

/** The open pack of one blob type: sealed blobs in order, not yet written. */
class OpenPack {
  parts: Buffer[] = [];
  entries: PackHeaderEntry[] = [];
  size = 0;

  add(id: string, type: BlobType, sealed: Buffer, rawLength: number): void {
    this.entries.push({ id, type, offset: this.size, length: sealed.length, rawLength });
    this.parts.push(sealed);
    this.size += sealed.length;
  }

  get full(): boolean {
    return this.size >= PACK_TARGET || this.entries.length >= PACK_MAX_BLOBS;
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

  constructor(
    private readonly backend: Backend,
    private readonly key: Buffer,
    private readonly onDurable: (pack: WrittenPack) => void,
  ) {}

  /**
   * Appends a sealed blob to the open pack of its type and writes that pack when it is full.
   * Resolves once the blob is accepted: when a pack is written, only after the write before it
   * has finished (backpressure). May be called concurrently; blobs are appended in call order.
   * Rejects with the backend's error when a pack write failed; the blobs of that pack are then
   * not stored (they never reach `onDurable`), and the writer should be abandoned.
   */
  async add(id: string, type: BlobType, sealed: Buffer, rawLength: number): Promise<void> {
    let pack = this.open.get(type);
    if (!pack) {
      pack = new OpenPack();
      this.open.set(type, pack);
    }
    pack.add(id, type, sealed, rawLength);
    if (pack.full) await this.write(type);
  }

  /** Sealed bytes held in open packs (not yet written). */
  get buffered(): number {
    let total = 0;
    for (const pack of this.open.values()) total += pack.size;
    return total;
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
    const pending = this.inFlight;
    this.inFlight = [];
    await Promise.all(pending);
  }

  private async write(type: BlobType): Promise<void> {
    const pack = this.open.get(type);
    if (!pack || pack.entries.length === 0) return;
    this.open.delete(type);
    const header = seal(this.key, Buffer.from(JSON.stringify(pack.entries)), 'pack-header');
    const length = Buffer.alloc(4);
    length.writeUInt32LE(header.length);
    const id = randomBytes(32).toString('hex');
    const size = pack.size + header.length + 4;
    const saving = this.backend.save('data', id, [...pack.parts, header, length]).then(() => {
      this.written++;
      this.writtenBytes += size;
      this.onDurable({ id, blobs: pack.entries, size });
    });
    this.inFlight.push(saving);
    saving.catch(() => undefined); // awaited below or by flush; never unhandled
    while (this.inFlight.length > 1) await this.inFlight.shift();
  }
}
