/**
 * GNU sparse members: which bytes of a file the archive holds, and where they go.
 *
 * A sparse member stores only the file's data segments; the map says where each one lies in the
 * file (`offset`, `length`) and how long the file is (`realSize`). Old GNU ('S') and PAX 0.0/0.1
 * members carry the map in their headers (parsed by TarProcessor); GNU sparse 1.0 puts it at the
 * start of the member's data as decimal lines (count, then offset/length pairs), padded to 512
 * bytes, which SparseReader parses from the stream.
 *
 * A hostile map must not make a reader write outside the file's real size, write a segment twice
 * or run for ever: segments must be in order and not overlap, lie within the real size and add up
 * to exactly the bytes the archive holds, and their number and the map's text are bounded.
 */
import { CorruptArchiveError } from '../errors.js';
import type { SparseLayout, SparseSegment } from './tar.js';

/** More segments than this is not a real file (a 1 TiB file with a hole every 4 KiB has 2^28; we keep 2^22). */
export const MAX_SPARSE_SEGMENTS = 1 << 22;
/** The text of a GNU sparse 1.0 map (count and pairs of decimal numbers, at most 17 digits each). */
const MAX_MAP_BYTES = 36 * MAX_SPARSE_SEGMENTS;

/**
 * Checks a map against the real size and the bytes stored; returns it. Throws CorruptArchiveError
 * for anything a GNU tar would not have written.
 */
export function checkSparseMap(map: SparseSegment[], realSize: number, stored: number): SparseSegment[] {
  if (!Number.isSafeInteger(realSize) || realSize < 0) throw new CorruptArchiveError(`absurd sparse file size ${realSize}`);
  if (map.length > MAX_SPARSE_SEGMENTS) throw new CorruptArchiveError(`absurd sparse map (${map.length} segments)`);
  let end = 0;
  let sum = 0;
  for (const { offset, length } of map) {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new CorruptArchiveError('absurd sparse map (bad number)');
    }
    if (offset < end) throw new CorruptArchiveError('bad sparse map (segments out of order or overlapping)');
    if (offset + length > realSize) throw new CorruptArchiveError(`bad sparse map (a segment ends past the file size ${realSize})`);
    end = offset + length;
    sum += length;
  }
  if (sum !== stored) throw new CorruptArchiveError(`bad sparse map (its segments hold ${sum} bytes, the archive ${stored})`);
  return map;
}

/** A piece of a sparse file's data and where it goes in the file. */
export interface SparsePiece {
  offset: number;
  data: Buffer;
}

/**
 * Turns the data of a sparse member (exactly `storedSize` bytes, in any pieces) into file data at
 * file offsets, checking the map on the way. For GNU sparse 1.0 the map is parsed from the data.
 */
export class SparseReader {
  private map: SparseSegment[] | undefined;
  /** 1.0 map parsing: numbers read so far, the digits of the current one, bytes consumed. */
  private readonly numbers: number[] = [];
  private digits = '';
  private mapBytes = 0;
  /** Padding after the map still to skip. */
  private skip = 0;
  private segment = 0;
  private inSegment = 0;
  private consumed = 0;

  constructor(
    private readonly layout: SparseLayout,
    private readonly storedSize: number,
  ) {
    this.map = layout.map;
  }

  get realSize(): number {
    return this.layout.realSize;
  }

  /** The data segments, once known (at once for header maps, after the map's text for 1.0). */
  get segments(): SparseSegment[] | undefined {
    return this.map;
  }

  push(chunk: Buffer): SparsePiece[] {
    this.consumed += chunk.length;
    if (this.consumed > this.storedSize) throw new CorruptArchiveError('sparse member longer than its size');
    let data = chunk;
    if (this.map === undefined) {
      data = this.parseMap(data);
      if (this.map === undefined) return [];
    }
    if (this.skip > 0) {
      const n = Math.min(this.skip, data.length);
      this.skip -= n;
      data = data.subarray(n);
    }
    const pieces: SparsePiece[] = [];
    const map = this.map;
    while (data.length > 0) {
      const segment = map[this.segment];
      if (segment === undefined) throw new CorruptArchiveError('sparse data longer than its map');
      const room = segment.length - this.inSegment;
      if (room === 0) {
        this.segment++;
        this.inSegment = 0;
        continue;
      }
      const piece = data.subarray(0, room);
      pieces.push({ offset: segment.offset + this.inSegment, data: piece });
      this.inSegment += piece.length;
      data = data.subarray(piece.length);
    }
    return pieces;
  }

  /** After the member's last byte: the map must have been read and every segment filled. */
  end(): void {
    if (this.map === undefined || this.consumed !== this.storedSize) throw new CorruptArchiveError('sparse member ended early');
  }

  /** Reads map text from `data`; returns what follows the map (and its padding) once complete. */
  private parseMap(data: Buffer): Buffer {
    for (let i = 0; i < data.length; i++) {
      const c = data[i]!;
      this.mapBytes++;
      if (c === 0x0a) {
        if (this.digits.length === 0) throw new CorruptArchiveError('bad sparse map (empty line)');
        this.numbers.push(Number(this.digits));
        this.digits = '';
        const count = this.numbers[0]!;
        if (count > MAX_SPARSE_SEGMENTS) throw new CorruptArchiveError(`absurd sparse map (${count} segments)`);
        if (this.numbers.length === 1 + 2 * count) {
          const map: SparseSegment[] = [];
          for (let k = 0; k < count; k++) map.push({ offset: this.numbers[1 + 2 * k]!, length: this.numbers[2 + 2 * k]! });
          const padded = Math.ceil(this.mapBytes / 512) * 512;
          if (padded > this.storedSize) throw new CorruptArchiveError('bad sparse map (longer than the member)');
          this.map = checkSparseMap(map, this.layout.realSize, this.storedSize - padded);
          this.skip = padded - this.mapBytes;
          this.numbers.length = 0;
          return data.subarray(i + 1);
        }
      } else if (c >= 0x30 && c <= 0x39 && this.digits.length < 16) {
        this.digits += String.fromCharCode(c);
      } else {
        throw new CorruptArchiveError('bad sparse map (not a decimal number)');
      }
      if (this.mapBytes > MAX_MAP_BYTES) throw new CorruptArchiveError('absurd sparse map (too long)');
    }
    return data.subarray(data.length);
  }
}
