/**
 * A streaming, byte-exact tar block processor.
 *
 * Why our own: the engine's archive endpoint produces a tar stream whose member names start with
 * the basename of the mount path (`data/…`); the guide's archives name members after the whole
 * mount path (`var/lib/postgresql/data/…`). We must prepend a prefix to every member name and hard
 * link target while keeping every other byte as the engine wrote it: names that are not UTF-8, PAX
 * records (xattrs, sub-second times, sizes over 8 GiB), GNU long names and sparse maps. The tar
 * libraries on npm decode names as UTF-8 strings and re-encode headers, which is lossy.
 *
 * Algorithm: the stream is a sequence of 512-byte header blocks, each followed by its data padded
 * to 512 bytes. Extension headers (PAX `x`/`g`, GNU `L`/`K`) are buffered until the real header
 * they describe arrives, because whether a `linkpath` is renamed depends on the type of that
 * header (hard link targets are member names; symlink targets are not). File data is passed
 * through without copying. Two zero blocks end the archive; anything after them is passed through.
 */
import { Transform, type TransformCallback } from 'node:stream';
import { CorruptArchiveError } from '../errors.js';
import { MAX_SPARSE_SEGMENTS, checkSparseMap } from './sparse.js';

const BLOCK = 512;
/** Extension headers larger than this are refused: no real archive has 1 MiB of PAX records. */
const MAX_EXTENSION = 1 << 20;
/** Extension data pending before one member (several PAX / long-name headers), and global PAX records kept. */
const MAX_PENDING_EXTENSIONS = 4 << 20;
/** Sizes and offsets beyond this cannot be held exactly in a JavaScript number: refused. */
export const MAX_TAR_NUMBER = Number.MAX_SAFE_INTEGER;
/** Owners are 32-bit on Linux. */
export const MAX_ID = 0xffffffff;
/** Modification times further than this from 1970 (about 34 000 years) are refused as absurd. */
export const MAX_MTIME = 2 ** 40;

export interface TarEntry {
  /** Full member name as bytes, after PAX `path` / GNU long name. */
  name: Buffer;
  /** Link target as bytes (hard or symbolic link), after PAX `linkpath` / GNU long link. */
  linkName: Buffer;
  /** Typeflag character: '0' file, '1' hard link, '2' symlink, '5' directory, … */
  type: string;
  /** Bytes of data that follow the header in the archive. */
  size: number;
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
  /** PAX records that applied to this member (global and local), raw values. */
  pax: Map<string, Buffer>;
  /**
   * A GNU sparse member (1.0, 0.0/0.1 or old GNU type 'S'): `name` is its real name, `size` the
   * bytes it takes in the archive, and the file is `realSize` long.
   */
  sparse?: SparseLayout;
}

export interface SparseSegment {
  offset: number;
  length: number;
}

export interface SparseLayout {
  /** The length of the file, holes included. */
  realSize: number;
  /**
   * Data segments in the file, from the headers (GNU sparse 0.0/0.1 and old GNU 'S'); undefined for
   * GNU sparse 1.0, whose map opens the member's data (see SparseReader).
   */
  map: SparseSegment[] | undefined;
}

export interface TarStats {
  entries: number;
  /** Regular files, hard links included. */
  files: number;
  /** Bytes of file data. */
  bytes: number;
}

export interface TarProcessorOptions {
  /** Bytes prepended to every member name and hard link target (e.g. `var/lib/postgresql/`). */
  renamePrefix?: Buffer;
  /** Called for every member, before its data passes. Throwing fails the stream. */
  onEntry?: (entry: TarEntry) => void;
  /** Called with each piece of a member's data. */
  onData?: (entry: TarEntry, chunk: Buffer) => void;
  /**
   * 'bytes' (default): the output is the archive. 'entries': the output is an object stream of
   * TarItem (each member, then its data in pieces), for extractors.
   */
  output?: 'bytes' | 'entries';
}

export type TarItem = { kind: 'entry'; entry: TarEntry } | { kind: 'data'; chunk: Buffer };

const REGULAR_TYPES = new Set(['0', '\0', '7', 'S']);

export function isRegularType(type: string): boolean {
  return REGULAR_TYPES.has(type);
}

/**
 * Parses a numeric header field: octal text, or GNU base-256 when the high bit is set. Strict, so
 * that no two readers can see different values in one field: leading spaces, octal digits, then
 * only NULs or spaces. Negative base-256 values and values beyond 2^53 are refused.
 */
export function parseNumeric(block: Buffer, offset: number, length: number): number {
  const first = block[offset] ?? 0;
  if (first & 0x80) {
    if (first & 0x40) throw new CorruptArchiveError('negative number in a tar header');
    let value = first & 0x3f;
    for (let i = 1; i < length; i++) {
      value = value * 256 + (block[offset + i] ?? 0);
      if (value > MAX_TAR_NUMBER) throw new CorruptArchiveError('absurd number in a tar header (beyond 2^53)');
    }
    return value;
  }
  const end = offset + length;
  let i = offset;
  while (i < end && block[i] === 0x20) i++;
  let value = 0;
  for (; i < end; i++) {
    const c = block[i] ?? 0;
    if (c < 0x30 || c > 0x37) break;
    value = value * 8 + (c - 0x30);
  }
  for (let j = i; j < end; j++) {
    const c = block[j] ?? 0;
    if (c !== 0 && c !== 0x20) {
      throw new CorruptArchiveError(`bad numeric field in tar header: '${block.toString('latin1', offset, end).replace(/\0/g, '\\0')}'`);
    }
  }
  if (value > MAX_TAR_NUMBER) throw new CorruptArchiveError('absurd number in a tar header (beyond 2^53)');
  return value;
}

/** A PAX decimal integer (size, uid, gid, sparse numbers): digits only, at most `max`. */
export function paxInteger(value: Buffer, key: string, max = MAX_TAR_NUMBER): number {
  const text = value.toString('latin1');
  if (!/^[0-9]{1,16}$/.test(text)) throw new CorruptArchiveError(`bad PAX ${key} '${text.slice(0, 40)}'`);
  const n = Number(text);
  if (n > max) throw new CorruptArchiveError(`absurd PAX ${key} ${text}`);
  return n;
}

/** A PAX time (seconds, optionally with a fraction and a sign), whole seconds, within ±MAX_MTIME. */
export function paxTime(value: Buffer, key: string): number {
  const text = value.toString('latin1');
  if (!/^-?[0-9]{1,20}(\.[0-9]{0,30})?$/.test(text)) throw new CorruptArchiveError(`bad PAX ${key} '${text.slice(0, 40)}'`);
  const n = Math.floor(Number(text));
  if (!Number.isFinite(n) || Math.abs(n) > MAX_MTIME) throw new CorruptArchiveError(`absurd PAX ${key} ${text}`);
  return n;
}

function cString(block: Buffer, offset: number, length: number): Buffer {
  const field = block.subarray(offset, offset + length);
  const nul = field.indexOf(0);
  return nul === -1 ? Buffer.from(field) : Buffer.from(field.subarray(0, nul));
}

function isZeroBlock(block: Buffer): boolean {
  for (let i = 0; i < BLOCK; i++) if (block[i] !== 0) return false;
  return true;
}

export function computeChecksum(block: Buffer): number {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : (block[i] ?? 0);
  return sum;
}

function verifyChecksum(block: Buffer): void {
  const stored = parseNumeric(block, 148, 8);
  if (stored !== computeChecksum(block)) throw new CorruptArchiveError('tar header checksum mismatch');
}

function writeChecksum(block: Buffer): void {
  const text = computeChecksum(block).toString(8).padStart(6, '0');
  block.write(text, 148, 'latin1');
  block[154] = 0;
  block[155] = 32;
}

function writeOctal(block: Buffer, offset: number, length: number, value: number): void {
  block.write(value.toString(8).padStart(length - 1, '0'), offset, 'latin1');
  block[offset + length - 1] = 0;
}

function isUstar(block: Buffer): boolean {
  return block.toString('latin1', 257, 262) === 'ustar';
}

function headerName(block: Buffer): Buffer {
  const name = cString(block, 0, 100);
  // POSIX ustar has a 155-byte prefix field; GNU format uses those bytes for other things.
  if (isUstar(block) && block[262] === 0) {
    const prefix = cString(block, 345, 155);
    if (prefix.length > 0) return Buffer.concat([prefix, Buffer.from('/'), name]);
  }
  return name;
}

/** Writes `name` into the ustar name/prefix fields; false if it does not fit. */
function setHeaderName(block: Buffer, name: Buffer): boolean {
  const ustarPosix = isUstar(block) && block[262] === 0;
  if (name.length <= 100) {
    block.fill(0, 0, 100);
    name.copy(block, 0);
    if (ustarPosix) block.fill(0, 345, 500);
    return true;
  }
  if (!ustarPosix) return false;
  // Split at a '/' so that the tail fits 100 bytes and the head 155.
  for (let i = name.length - 1; i > 0; i--) {
    if (name[i] !== 0x2f) continue;
    const head = name.subarray(0, i);
    const tail = name.subarray(i + 1);
    if (tail.length > 100 || tail.length === 0) break;
    if (head.length > 155) continue;
    block.fill(0, 0, 100);
    tail.copy(block, 0);
    block.fill(0, 345, 500);
    head.copy(block, 345);
    return true;
  }
  return false;
}

/** Builds a GNU long-name (`L`) or long-link (`K`) extension: header + padded data. */
function gnuLongHeader(type: 'L' | 'K', value: Buffer): Buffer {
  const data = Buffer.concat([value, Buffer.alloc(1)]);
  const padded = Math.ceil(data.length / BLOCK) * BLOCK;
  const out = Buffer.alloc(BLOCK + padded);
  out.write('././@LongLink', 0, 'latin1');
  writeOctal(out, 100, 8, 0o644);
  writeOctal(out, 108, 8, 0);
  writeOctal(out, 116, 8, 0);
  writeOctal(out, 124, 12, data.length);
  writeOctal(out, 136, 12, 0);
  out.write(type, 156, 'latin1');
  out.write('ustar  \0', 257, 'latin1');
  writeChecksum(out);
  data.copy(out, BLOCK);
  return out;
}

interface PaxRecord {
  key: string;
  value: Buffer;
}

export function parsePax(data: Buffer): PaxRecord[] {
  const records: PaxRecord[] = [];
  let offset = 0;
  while (offset < data.length) {
    if (data[offset] === 0) {
      // Padding: only NULs may follow.
      if (data.subarray(offset).some((b) => b !== 0)) throw new CorruptArchiveError('bad PAX record');
      break;
    }
    const space = data.indexOf(0x20, offset);
    if (space === -1 || space - offset > 16) throw new CorruptArchiveError('bad PAX record');
    const lengthText = data.toString('latin1', offset, space);
    if (!/^[1-9][0-9]*$/.test(lengthText)) throw new CorruptArchiveError('bad PAX record length');
    const length = Number(lengthText);
    if (length <= space - offset + 1 || offset + length > data.length || data[offset + length - 1] !== 0x0a) {
      throw new CorruptArchiveError('bad PAX record length');
    }
    const record = data.subarray(space + 1, offset + length - 1);
    const eq = record.indexOf(0x3d);
    if (eq <= 0) throw new CorruptArchiveError('bad PAX record');
    records.push({ key: record.toString('utf8', 0, eq), value: Buffer.from(record.subarray(eq + 1)) });
    offset += length;
  }
  return records;
}

function encodePax(records: PaxRecord[]): Buffer {
  const parts: Buffer[] = [];
  for (const { key, value } of records) {
    const body = Buffer.concat([Buffer.from(` ${key}=`, 'utf8'), value, Buffer.from('\n')]);
    // The length prefix counts itself: find the fixed point.
    let length = body.length + 1;
    while (String(length).length + body.length !== length) length = String(length).length + body.length;
    parts.push(Buffer.from(String(length), 'latin1'), body);
  }
  return Buffer.concat(parts);
}

function paddedSize(size: number): number {
  return Math.ceil(size / BLOCK) * BLOCK;
}

interface PendingExtension {
  header: Buffer;
  data: Buffer;
  type: string;
}

type State = 'header' | 'extension' | 'sparse-extension' | 'data' | 'padding' | 'end';

const NO_DATA_TYPES = new Set(['1', '2', '3', '4', '5', '6']);

/** The last record of `key` (local records come after global ones). */
function lastRecord(records: PaxRecord[], key: string): Buffer | undefined {
  for (let i = records.length - 1; i >= 0; i--) if (records[i]!.key === key) return records[i]!.value;
  return undefined;
}

/** Old GNU sparse entries (offset, numbytes; 24 bytes each) from `block` at `at`; stops at the first empty one. */
function oldSparseEntries(block: Buffer, at: number, count: number, into: SparseSegment[]): void {
  for (let i = 0; i < count; i++) {
    const offset = at + i * 24;
    if (block[offset] === 0) return;
    if (into.length >= MAX_SPARSE_SEGMENTS) throw new CorruptArchiveError('absurd sparse map (too many segments)');
    into.push({ offset: parseNumeric(block, offset, 12), length: parseNumeric(block, offset + 12, 12) });
  }
}

/** GNU sparse 0.0 (offset/numbytes records) or 0.1 (one `map` record): the map from PAX records. */
function paxSparseMap(records: PaxRecord[]): SparseSegment[] {
  const segments: SparseSegment[] = [];
  const map = lastRecord(records, 'GNU.sparse.map');
  if (map !== undefined) {
    const text = map.toString('latin1');
    const numbers = text === '' ? [] : text.split(',').map((n) => paxInteger(Buffer.from(n, 'latin1'), 'GNU.sparse.map'));
    if (numbers.length % 2 !== 0) throw new CorruptArchiveError('bad PAX GNU.sparse.map (odd count)');
    if (numbers.length / 2 > MAX_SPARSE_SEGMENTS) throw new CorruptArchiveError('absurd sparse map (too many segments)');
    for (let i = 0; i < numbers.length; i += 2) segments.push({ offset: numbers[i]!, length: numbers[i + 1]! });
  } else {
    let offset: number | undefined;
    for (const r of records) {
      if (r.key === 'GNU.sparse.offset') {
        if (offset !== undefined) throw new CorruptArchiveError('bad GNU sparse 0.0 map (offset without numbytes)');
        offset = paxInteger(r.value, r.key);
      } else if (r.key === 'GNU.sparse.numbytes') {
        if (offset === undefined) throw new CorruptArchiveError('bad GNU sparse 0.0 map (numbytes without offset)');
        if (segments.length >= MAX_SPARSE_SEGMENTS) throw new CorruptArchiveError('absurd sparse map (too many segments)');
        segments.push({ offset, length: paxInteger(r.value, r.key) });
        offset = undefined;
      }
    }
    if (offset !== undefined) throw new CorruptArchiveError('bad GNU sparse 0.0 map (offset without numbytes)');
  }
  const blocks = lastRecord(records, 'GNU.sparse.numblocks');
  if (blocks !== undefined && paxInteger(blocks, 'GNU.sparse.numblocks') !== segments.length) {
    throw new CorruptArchiveError('bad GNU sparse map (numblocks does not match)');
  }
  return segments;
}

/**
 * Which GNU sparse format the PAX records describe, as GNU tar and Go's archive/tar read them:
 * `major`/`minor` 1.0 (map in the data), 0.0/0.1 (map in the records, also without a version when
 * a map record is there); an unknown version is refused rather than guessed.
 */
function paxSparse(records: PaxRecord[]): SparseLayout | undefined {
  const major = lastRecord(records, 'GNU.sparse.major')?.toString('latin1');
  const minor = lastRecord(records, 'GNU.sparse.minor')?.toString('latin1');
  const hasMap = lastRecord(records, 'GNU.sparse.map') !== undefined || lastRecord(records, 'GNU.sparse.offset') !== undefined;
  if (major === undefined && minor === undefined && !hasMap) return undefined;
  const realSizeRecord = lastRecord(records, 'GNU.sparse.realsize') ?? lastRecord(records, 'GNU.sparse.size');
  if (realSizeRecord === undefined) throw new CorruptArchiveError('GNU sparse member without its real size');
  const realSize = paxInteger(realSizeRecord, 'GNU.sparse.realsize');
  if (major === '1' && minor === '0') return { realSize, map: undefined };
  if ((major === undefined && minor === undefined) || (major === '0' && (minor === '0' || minor === '1'))) {
    return { realSize, map: paxSparseMap(records) };
  }
  throw new CorruptArchiveError(`unknown GNU sparse format ${major ?? '?'}.${minor ?? '?'}`);
}

/** A member whose header arrived, waiting for old GNU sparse extension blocks. */
interface PendingSparseMember {
  entry: TarEntry;
  map: SparseSegment[];
  stored: number;
}

/**
 * Transform stream over a tar archive. Without `renamePrefix` the bytes pass through unchanged, so
 * the same class validates, counts and inspects archives.
 */
export class TarProcessor extends Transform {
  readonly stats: TarStats = { entries: 0, files: 0, bytes: 0 };
  private state: State = 'header';
  private buffered: Buffer[] = [];
  private bufferedLength = 0;
  private remaining = 0;
  private extensionHeader: Buffer | undefined;
  private extensions: PendingExtension[] = [];
  private extensionBytes = 0;
  private current: TarEntry | undefined;
  private zeroBlocks = 0;
  private globalPax: PaxRecord[] = [];
  private pendingSparse: PendingSparseMember | undefined;

  private readonly entriesMode: boolean;

  constructor(private readonly options: TarProcessorOptions = {}) {
    const entriesMode = options.output === 'entries';
    super(entriesMode ? { readableObjectMode: true, writableHighWaterMark: 1 << 20, readableHighWaterMark: 64 } : { highWaterMark: 1 << 20 });
    this.entriesMode = entriesMode;
  }

  private emitBytes(buffer: Buffer): void {
    if (!this.entriesMode) this.push(buffer);
  }

  private takeBytes(length: number): Buffer | undefined {
    if (this.bufferedLength < length) return undefined;
    const all = this.buffered.length === 1 ? this.buffered[0]! : Buffer.concat(this.buffered);
    const out = all.subarray(0, length);
    const rest = all.subarray(length);
    this.buffered = rest.length > 0 ? [rest] : [];
    this.bufferedLength = rest.length;
    return out;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    try {
      this.buffered.push(chunk);
      this.bufferedLength += chunk.length;
      this.drain();
      callback();
    } catch (error) {
      callback(error as Error);
    }
  }

  override _flush(callback: TransformCallback): void {
    if (this.state !== 'end') {
      callback(new CorruptArchiveError('tar archive is truncated (no end-of-archive marker)'));
      return;
    }
    callback();
  }

  private drain(): void {
    for (;;) {
      switch (this.state) {
        case 'end': {
          const rest = this.takeBytes(this.bufferedLength);
          if (rest && rest.length > 0) this.emitBytes(rest);
          return;
        }
        case 'data': {
          if (this.bufferedLength === 0) return;
          const all = this.takeBytes(Math.min(this.remaining, this.bufferedLength))!;
          this.remaining -= all.length;
          if (this.current && this.options.onData) this.options.onData(this.current, all);
          if (this.entriesMode) this.push({ kind: 'data', chunk: all } satisfies TarItem);
          else this.push(all);
          if (this.remaining === 0) this.enterPadding(this.current?.size ?? 0);
          continue;
        }
        case 'padding': {
          const pad = this.takeBytes(Math.min(this.remaining, this.bufferedLength));
          if (!pad || pad.length === 0) return;
          this.remaining -= pad.length;
          this.emitBytes(pad);
          if (this.remaining === 0) this.state = 'header';
          continue;
        }
        case 'extension': {
          const data = this.takeBytes(this.remaining);
          if (!data) return;
          const header = this.extensionHeader!;
          const size = parseNumeric(header, 124, 12);
          const type = String.fromCharCode(header[156] ?? 0);
          this.extensions.push({ header, data: Buffer.from(data.subarray(0, size)), type });
          this.state = 'header';
          continue;
        }
        case 'sparse-extension': {
          const block = this.takeBytes(BLOCK);
          if (!block) return;
          this.emitBytes(block);
          const pending = this.pendingSparse!;
          oldSparseEntries(block, 0, 21, pending.map);
          if (block[504] === 0) {
            this.pendingSparse = undefined;
            pending.entry.sparse = { realSize: pending.entry.sparse!.realSize, map: checkSparseMap(pending.map, pending.entry.sparse!.realSize, pending.stored) };
            this.startMember(pending.entry);
          }
          continue;
        }
        case 'header': {
          const block = this.takeBytes(BLOCK);
          if (!block) return;
          this.onHeader(Buffer.from(block));
          continue;
        }
      }
    }
  }

  private enterPadding(size: number): void {
    this.remaining = paddedSize(size) - size;
    this.state = this.remaining === 0 ? 'header' : 'padding';
  }

  private onHeader(block: Buffer): void {
    if (isZeroBlock(block)) {
      if (this.extensions.length > 0) throw new CorruptArchiveError('tar extension header without a member');
      this.zeroBlocks++;
      this.emitBytes(block);
      if (this.zeroBlocks === 2) this.state = 'end';
      return;
    }
    if (this.zeroBlocks > 0) throw new CorruptArchiveError('tar archive has a lone zero block');
    verifyChecksum(block);
    const type = String.fromCharCode(block[156] ?? 0);
    const size = parseNumeric(block, 124, 12);
    if (type === 'x' || type === 'g' || type === 'L' || type === 'K') {
      if (size > MAX_EXTENSION) throw new CorruptArchiveError(`tar extension header of ${size} bytes`);
      this.extensionBytes += size;
      if (this.extensionBytes > MAX_PENDING_EXTENSIONS) throw new CorruptArchiveError('absurd tar extension headers (over 4 MiB before one member)');
      this.extensionHeader = block;
      this.remaining = paddedSize(size);
      this.state = 'extension';
      return;
    }
    this.extensionBytes = 0;
    this.onMember(block, type, size);
  }

  /** Global PAX records apply to every later member; a later record of a key replaces the earlier one. */
  private addGlobal(records: PaxRecord[]): void {
    for (const record of records) {
      const at = this.globalPax.findIndex((r) => r.key === record.key);
      if (at === -1) this.globalPax.push(record);
      else this.globalPax[at] = record;
    }
    const size = this.globalPax.reduce((sum, r) => sum + r.key.length + r.value.length, 0);
    if (size > MAX_PENDING_EXTENSIONS) throw new CorruptArchiveError('absurd global PAX records (over 4 MiB)');
  }

  private onMember(block: Buffer, type: string, headerSize: number): void {
    let name = headerName(block);
    let linkName = cString(block, 157, 100);
    let size = headerSize;
    let nameFromExtension = false;
    let linkFromExtension = false;
    const local: PaxRecord[] = [];
    for (const ext of this.extensions) {
      if (ext.type === 'L') {
        name = cString(ext.data, 0, ext.data.length);
        nameFromExtension = true;
      } else if (ext.type === 'K') {
        linkName = cString(ext.data, 0, ext.data.length);
        linkFromExtension = true;
      } else if (ext.type === 'x') {
        local.push(...parsePax(ext.data));
      } else if (ext.type === 'g') {
        this.addGlobal(parsePax(ext.data));
      }
    }
    const pax: PaxRecord[] = [...this.globalPax, ...local];
    for (const record of pax) {
      if (record.key === 'path') {
        name = record.value;
        nameFromExtension = true;
      } else if (record.key === 'linkpath') {
        linkName = record.value;
        linkFromExtension = true;
      } else if (record.key === 'size') {
        size = paxInteger(record.value, 'size');
      }
    }
    // GNU sparse (PAX 0.0, 0.1, 1.0): the real name and size are in GNU.sparse.* records.
    let sparse = paxSparse(pax);
    const sparseName = sparse ? lastRecord(pax, 'GNU.sparse.name') : undefined;
    const isHardLink = type === '1';
    const prefix = this.options.renamePrefix;
    const out: Buffer[] = [];
    if (prefix) {
      for (const ext of this.extensions) {
        if (ext.type === 'x') {
          const records = parsePax(ext.data).map((r) =>
            r.key === 'path' || r.key === 'GNU.sparse.name' || (r.key === 'linkpath' && isHardLink)
              ? { key: r.key, value: Buffer.concat([prefix, r.value]) }
              : r,
          );
          const data = encodePax(records);
          const header = Buffer.from(ext.header);
          writeOctal(header, 124, 12, data.length);
          writeChecksum(header);
          out.push(header, data, Buffer.alloc(paddedSize(data.length) - data.length));
        } else if (ext.type === 'L' || (ext.type === 'K' && isHardLink)) {
          out.push(gnuLongHeader(ext.type, Buffer.concat([prefix, cString(ext.data, 0, ext.data.length)])));
        } else {
          out.push(ext.header, ext.data, Buffer.alloc(paddedSize(ext.data.length) - ext.data.length));
        }
      }
      name = Buffer.concat([prefix, name]);
      if (isHardLink) linkName = Buffer.concat([prefix, linkName]);
      if (!nameFromExtension && !setHeaderName(block, name)) out.push(gnuLongHeader('L', name));
      if (isHardLink && !linkFromExtension) {
        if (linkName.length <= 100) {
          block.fill(0, 157, 257);
          linkName.copy(block, 157);
        } else {
          out.push(gnuLongHeader('K', linkName));
        }
      }
      writeChecksum(block);
    } else {
      for (const ext of this.extensions) {
        out.push(ext.header, ext.data, Buffer.alloc(paddedSize(ext.data.length) - ext.data.length));
      }
    }
    this.extensions = [];
    out.push(block);
    for (const b of out) this.emitBytes(b);

    // Hard links, symlinks, directories and devices carry no data whatever the size field says.
    const dataSize = NO_DATA_TYPES.has(type) ? 0 : size;
    const uid = lastRecord(pax, 'uid');
    const gid = lastRecord(pax, 'gid');
    const mtime = lastRecord(pax, 'mtime');
    const entry: TarEntry = {
      name: sparseName === undefined ? name : prefix ? Buffer.concat([prefix, sparseName]) : sparseName,
      linkName,
      type,
      size: dataSize,
      mode: parseNumeric(block, 100, 8),
      uid: uid === undefined ? parseNumeric(block, 108, 8) : paxInteger(uid, 'uid', MAX_ID),
      gid: gid === undefined ? parseNumeric(block, 116, 8) : paxInteger(gid, 'gid', MAX_ID),
      mtime: mtime === undefined ? parseNumeric(block, 136, 12) : paxTime(mtime, 'mtime'),
      pax: new Map(pax.map((r) => [r.key, r.value])),
    };
    if (entry.uid > MAX_ID || entry.gid > MAX_ID) throw new CorruptArchiveError(`absurd owner ${entry.uid}:${entry.gid} in a tar header`);
    if (entry.mtime > MAX_MTIME) throw new CorruptArchiveError(`absurd modification time ${entry.mtime} in a tar header`);
    if (sparse && !isRegularType(type)) sparse = undefined;
    if (type === 'S') {
      // Old GNU sparse: the map is in the header, continued in extension blocks after it.
      const map: SparseSegment[] = [];
      oldSparseEntries(block, 386, 4, map);
      entry.sparse = { realSize: parseNumeric(block, 483, 12), map };
      if (block[482] !== 0) {
        this.pendingSparse = { entry, map, stored: dataSize };
        this.state = 'sparse-extension';
        return;
      }
      entry.sparse.map = checkSparseMap(map, entry.sparse.realSize, dataSize);
    } else if (sparse) {
      entry.sparse = sparse.map === undefined ? sparse : { realSize: sparse.realSize, map: checkSparseMap(sparse.map, sparse.realSize, dataSize) };
    }
    this.startMember(entry);
  }

  private startMember(entry: TarEntry): void {
    this.stats.entries++;
    if (isRegularType(entry.type) || entry.type === '1') this.stats.files++;
    this.stats.bytes += entry.sparse ? entry.sparse.realSize : entry.size;
    this.options.onEntry?.(entry);
    if (this.entriesMode) this.push({ kind: 'entry', entry } satisfies TarItem);
    this.current = entry;
    if (entry.size > 0) {
      this.remaining = entry.size;
      this.state = 'data';
    } else {
      this.state = 'header';
    }
  }
}

/** Normalises a member name for comparisons: no leading './' or '/', no trailing '/'. */
export function normaliseMemberName(name: Buffer): string {
  let text = name.toString('latin1');
  while (text.startsWith('./')) text = text.slice(2);
  text = text.replace(/^\/+/, '');
  return text.replace(/\/+$/, '');
}
