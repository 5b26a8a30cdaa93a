/**
 * Content-defined chunking: FastCDC (Xia et al., USENIX ATC 2016) with normalized chunking.
 *
 * A gear hash rolls over the bytes: h = (h << 1) + GEAR[byte] (32 bits), so h depends on the
 * last 32 bytes only. A boundary is declared where the hash's top bits are zero. Below the
 * average size a stricter mask (more bits) is used, above it a looser one, which pulls chunk sizes
 * toward the average; bytes before the minimum size are not hashed at all (the speed-up of
 * FastCDC). Because boundaries depend only on nearby content, inserting bytes into a file moves
 * only the chunks around the insertion: the rest deduplicate.
 *
 * The gear table comes from a per-repository secret seed (SHA-256 in counter mode), so chunk
 * boundaries cannot be used to fingerprint files across repositories. Deterministic: the same
 * seed and bytes always give the same chunks, however the input is split into pieces.
 */
import { createHash } from 'node:crypto';

export interface ChunkerParams {
  minSize: number;
  avgSize: number;
  maxSize: number;
  /** Hex seed of the gear table. */
  seed: string;
}

export const DEFAULT_CHUNKER: Omit<ChunkerParams, 'seed'> = { minSize: 512 * 1024, avgSize: 1024 * 1024, maxSize: 8 * 1024 * 1024 };

/** Gear tables by seed: a pure function, memoised because a backup makes a chunker per file. */
const gearTables = new Map<string, Uint32Array>();

export function gearTable(seed: string): Uint32Array {
  const known = gearTables.get(seed);
  if (known) return known;
  const table = new Uint32Array(256);
  const bytes: Buffer[] = [];
  for (let i = 0; bytes.length * 32 < 1024; i++) {
    bytes.push(createHash('sha256').update(Buffer.from(seed, 'hex')).update(String(i)).digest());
  }
  const all = Buffer.concat(bytes);
  for (let i = 0; i < 256; i++) table[i] = all.readUInt32LE(i * 4);
  gearTables.set(seed, table);
  return table;
}

function topMask(bits: number): number {
  return (((1 << bits) - 1) << (32 - bits)) >>> 0;
}

/**
 * Streaming chunker: `push(data)` returns the chunks completed so far; `finish()` the rest.
 * Memory: at most one max-size chunk is held.
 */
export class Chunker {
  private readonly gear: Uint32Array;
  private readonly maskS: number;
  private readonly maskL: number;
  private pending: Buffer[] = [];
  private pendingLength = 0;
  /** Scan state for the current chunk. */
  private hash = 0;
  private scanned = 0;

  constructor(private readonly params: ChunkerParams) {
    this.gear = gearTable(params.seed);
    const bits = Math.round(Math.log2(params.avgSize));
    this.maskS = topMask(bits + 2);
    this.maskL = topMask(bits - 2);
  }

  push(data: Buffer): Buffer[] {
    this.pending.push(data);
    this.pendingLength += data.length;
    const out: Buffer[] = [];
    for (;;) {
      const cut = this.findBoundary();
      if (cut === undefined) break;
      out.push(this.take(cut));
    }
    return out;
  }

  finish(): Buffer[] {
    if (this.pendingLength === 0) return [];
    const last = this.take(this.pendingLength);
    return [last];
  }

  private take(length: number): Buffer {
    const all = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending, this.pendingLength);
    const chunk = all.subarray(0, length);
    const rest = all.subarray(length);
    this.pending = rest.length > 0 ? [rest] : [];
    this.pendingLength = rest.length;
    this.hash = 0;
    this.scanned = 0;
    return chunk;
  }

  /** Offset of the next boundary in the pending bytes, or undefined if more input is needed. */
  private findBoundary(): number | undefined {
    if (this.pendingLength <= this.params.minSize) return undefined;
    if (this.pending.length > 1) this.pending = [Buffer.concat(this.pending, this.pendingLength)];
    return this.cut(this.pending[0]!);
  }

  /**
   * The zero-copy form, for a caller that keeps the bytes itself: `buf` holds the current chunk
   * from its first byte on, as far as it has been read. Returns the chunk's length when its
   * boundary is in `buf` (the next call then starts a new chunk: `buf` must begin at the byte
   * after it), or undefined when more bytes are needed — call again with the same start and more
   * bytes (what was scanned is not scanned again). At the end of the input, what remains is the
   * last chunk. Gives exactly the boundaries of push/finish.
   */
  cut(buf: Buffer): number | undefined {
    const { minSize, avgSize, maxSize } = this.params;
    if (buf.length <= minSize) return undefined;
    // The hot loop: locals only, and int32 arithmetic (`| 0`) — the same low 32 bits as the
    // unsigned form, so the same boundaries, without a conversion per byte.
    const gear = this.gear;
    const maskS = this.maskS | 0;
    const maskL = this.maskL | 0;
    let hash = this.hash | 0;
    let i = Math.max(this.scanned, minSize);
    const normal = Math.min(avgSize, buf.length);
    for (; i < normal; i++) {
      hash = ((hash << 1) + gear[buf[i]!]!) | 0;
      if ((hash & maskS) === 0) return this.found(i + 1);
    }
    const end = Math.min(maxSize, buf.length);
    for (; i < end; i++) {
      hash = ((hash << 1) + gear[buf[i]!]!) | 0;
      if ((hash & maskL) === 0) return this.found(i + 1);
    }
    if (buf.length >= maxSize) return this.found(maxSize);
    this.hash = hash >>> 0;
    this.scanned = i;
    return undefined;
  }

  /** A boundary at `length`: the next chunk's scan starts afresh. */
  private found(length: number): number {
    this.hash = 0;
    this.scanned = 0;
    return length;
  }
}
