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

const BLOCK = 512;
/** Extension headers larger than this are refused: no real archive has 1 MiB of PAX records. */
const MAX_EXTENSION = 1 << 20;

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

/** Parses a numeric header field: octal text, or GNU base-256 when the high bit is set. */
export function parseNumeric(block: Buffer, offset: number, length: number): number {
  const first = block[offset] ?? 0;
  if (first & 0x80) {
    let value = first & 0x7f;
    for (let i = 1; i < length; i++) value = value * 256 + (block[offset + i] ?? 0);
    return value;
  }
  let text = '';
  for (let i = 0; i < length; i++) {
    const c = block[offset + i] ?? 0;
    if (c === 0) break;
    text += String.fromCharCode(c);
  }
  text = text.trim();
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) throw new CorruptArchiveError(`bad numeric field in tar header: '${text}'`);
  return parseInt(text, 8);
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
    if (data[offset] === 0) break;
    const space = data.indexOf(0x20, offset);
    if (space === -1) throw new CorruptArchiveError('bad PAX record');
    const length = parseInt(data.toString('latin1', offset, space), 10);
    if (!Number.isFinite(length) || length <= 0 || offset + length > data.length) {
      throw new CorruptArchiveError('bad PAX record length');
    }
    const record = data.subarray(space + 1, offset + length - 1);
    const eq = record.indexOf(0x3d);
    if (eq === -1) throw new CorruptArchiveError('bad PAX record');
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

type State = 'header' | 'extension' | 'data' | 'padding' | 'end';

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
  private current: TarEntry | undefined;
  private zeroBlocks = 0;
  private globalPax: PaxRecord[] = [];

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
      this.extensionHeader = block;
      this.remaining = paddedSize(size);
      this.state = 'extension';
      return;
    }
    this.onMember(block, type, size);
  }

  private onMember(block: Buffer, type: string, headerSize: number): void {
    let name = headerName(block);
    let linkName = cString(block, 157, 100);
    let size = headerSize;
    let nameFromExtension = false;
    let linkFromExtension = false;
    const pax: PaxRecord[] = [...this.globalPax];
    for (const ext of this.extensions) {
      if (ext.type === 'L') {
        name = cString(ext.data, 0, ext.data.length);
        nameFromExtension = true;
      } else if (ext.type === 'K') {
        linkName = cString(ext.data, 0, ext.data.length);
        linkFromExtension = true;
      } else if (ext.type === 'x') {
        pax.push(...parsePax(ext.data));
      } else if (ext.type === 'g') {
        this.globalPax.push(...parsePax(ext.data));
        pax.push(...parsePax(ext.data));
      }
    }
    for (const record of pax) {
      if (record.key === 'path') {
        name = record.value;
        nameFromExtension = true;
      } else if (record.key === 'linkpath') {
        linkName = record.value;
        linkFromExtension = true;
      } else if (record.key === 'size') {
        size = parseInt(record.value.toString('latin1'), 10);
      }
    }
    // GNU sparse 1.0 (PAX): the real name and size are in GNU.sparse.* records.
    const sparseName = pax.find((r) => r.key === 'GNU.sparse.name')?.value;
    const sparseSize = pax.find((r) => r.key === 'GNU.sparse.realsize')?.value;
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
    const dataSize = type === '1' || type === '2' || type === '5' || type === '3' || type === '4' || type === '6' ? 0 : size;
    const entry: TarEntry = {
      name: sparseName && !prefix ? sparseName : sparseName && prefix ? Buffer.concat([prefix, sparseName]) : name,
      linkName,
      type,
      size: dataSize,
      mode: parseNumeric(block, 100, 8),
      uid: parseNumeric(block, 108, 8),
      gid: parseNumeric(block, 116, 8),
      mtime: parseNumeric(block, 136, 12),
      pax: new Map(pax.map((r) => [r.key, r.value])),
    };
    const paxNumber = (key: string): number | undefined => {
      const v = entry.pax.get(key);
      return v === undefined ? undefined : Number(v.toString('latin1'));
    };
    entry.uid = paxNumber('uid') ?? entry.uid;
    entry.gid = paxNumber('gid') ?? entry.gid;
    entry.mtime = Math.floor(paxNumber('mtime') ?? entry.mtime);
    this.stats.entries++;
    if (isRegularType(type) || isHardLink) this.stats.files++;
    this.stats.bytes += sparseSize ? Number(sparseSize.toString('latin1')) : dataSize;
    this.options.onEntry?.(entry);
    if (this.entriesMode) this.push({ kind: 'entry', entry } satisfies TarItem);
    this.current = entry;
    if (dataSize > 0) {
      this.remaining = dataSize;
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
