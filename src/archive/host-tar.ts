/**
 * The direct path: a volume folder readable on this host (local engine, root) is archived by
 * walking it ourselves instead of through the engine's archive endpoint. Faster (no HTTP hop), and
 * it keeps what the endpoint drops: holes of sparse files.
 *
 * Output is POSIX pax, readable by GNU tar, BusyBox tar (without sparse) and Go (the engine):
 * - ustar header; a name that does not fit ustar's 100+155 bytes goes into a PAX `path` record
 *   (with `hdrcharset=BINARY` when it is not UTF-8); likewise `linkpath`, and `uid`, `gid`, `size`
 *   when they overflow their octal fields;
 * - a sparse file (fewer blocks allocated than its size) is written in GNU sparse format 1.0: PAX
 *   records `GNU.sparse.major=1`, `minor=0`, `name`, `realsize`, and at the start of its data a map
 *   (decimal lines: count, then offset/length pairs, padded to 512 bytes) followed by the data
 *   segments. GNU tar restores the holes; holes are found by reading the file and keeping only
 *   4 KiB blocks that are not all zero, as GNU tar does without SEEK_HOLE;
 * - hard links become type 1 entries pointing at the first name of the inode.
 * Entries come in pre-order (a folder before its contents), names sorted bytewise.
 *
 * Reading: the volume is walked through folder handles (fs/beneath.ts): every entry is looked up
 * relative to its open folder without following a link (O_PATH, which opens nothing), and a
 * folder or file is opened through that handle, so it is exactly the inode that was listed; a
 * link swapped in is never followed, and a FIFO or device is never opened (its header is written
 * from the lookup). An entry that vanishes or changes between listing and opening is looked up
 * once more, then left out with a warning. A file that shrinks while read is padded with zeros to
 * the size in its header, with a warning (as GNU tar does); one that grows is cut at that size.
 */
import { read as readCallback } from 'node:fs';
import type { BigIntStats } from 'node:fs';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { DirHandle, closeFd, isChangedError } from '../fs/beneath.js';
import { computeChecksum, type TarStats } from './tar.js';
import { leaveOutOwnFolders } from './member-guard.js';

const readFd = promisify(readCallback);

const BLOCK = 512;
const HOLE_GRANULE = 4096;
const ZERO_GRANULE = Buffer.alloc(HOLE_GRANULE);
const MAX_OCTAL_7 = 0o7777777;
const MAX_OCTAL_11 = 0o77777777777;

export interface HostTarOptions {
  /** Member names start with this, e.g. `var/lib/postgresql/data`. */
  memberPrefix: string;
  signal?: AbortSignal;
  onProgress?: (stats: TarStats) => void;
  /**
   * An entry left out (it changed while it was read, and again when looked at a second time), or
   * a file that shrank while read. The message names the member.
   */
  onWarning?: (message: string) => void;
}

interface Segment {
  offset: number;
  length: number;
}

function octal(block: Buffer, offset: number, length: number, value: number): void {
  block.write(value.toString(8).padStart(length - 1, '0'), offset, 'latin1');
  block[offset + length - 1] = 0;
}

function isUtf8(bytes: Buffer): boolean {
  return Buffer.from(bytes.toString('utf8'), 'utf8').equals(bytes);
}

export function paxRecord(key: string, value: Buffer): Buffer {
  const body = Buffer.concat([Buffer.from(` ${key}=`, 'utf8'), value, Buffer.from('\n')]);
  let length = body.length + 1;
  while (String(length).length + body.length !== length) length = String(length).length + body.length;
  return Buffer.concat([Buffer.from(String(length), 'latin1'), body]);
}

export function pad(size: number): Buffer {
  const rest = size % BLOCK;
  return rest === 0 ? Buffer.alloc(0) : Buffer.alloc(BLOCK - rest);
}

/** Splits a name into ustar prefix/name fields; undefined if it cannot be. */
function splitUstar(name: Buffer): { prefix: Buffer; name: Buffer } | undefined {
  if (name.length <= 100) return { prefix: Buffer.alloc(0), name };
  for (let i = Math.min(name.length - 1, 155); i > 0; i--) {
    if (name[i] !== 0x2f) continue;
    const tail = name.subarray(i + 1);
    if (tail.length === 0 || tail.length > 100) return undefined;
    return { prefix: name.subarray(0, i), name: tail };
  }
  return undefined;
}

interface HeaderSpec {
  name: Buffer;
  type: string;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  linkName?: Buffer;
  uname?: string;
  devMajor?: number;
  devMinor?: number;
  /** Extra PAX records to carry. */
  pax?: Buffer[];
}

/** Header block(s) for one member: an optional PAX `x` header, then the ustar header. */
export function encodeHeader(spec: HeaderSpec): Buffer {
  const records: Buffer[] = [...(spec.pax ?? [])];
  const block = Buffer.alloc(BLOCK);
  const split = splitUstar(spec.name);
  let binary = false;
  if (split) {
    split.name.copy(block, 0);
    split.prefix.copy(block, 345);
  } else {
    records.push(paxRecord('path', spec.name));
    binary ||= !isUtf8(spec.name);
    spec.name.subarray(spec.name.length - 99).copy(block, 0);
  }
  if (spec.linkName) {
    if (spec.linkName.length <= 100) spec.linkName.copy(block, 157);
    else {
      records.push(paxRecord('linkpath', spec.linkName));
      binary ||= !isUtf8(spec.linkName);
    }
  }
  const numeric = (key: string, offset: number, length: number, value: number, max: number): void => {
    if (value > max || value < 0) {
      records.push(paxRecord(key, Buffer.from(String(value))));
      octal(block, offset, length, 0);
    } else octal(block, offset, length, value);
  };
  octal(block, 100, 8, spec.mode & 0o7777);
  numeric('uid', 108, 8, spec.uid, MAX_OCTAL_7);
  numeric('gid', 116, 8, spec.gid, MAX_OCTAL_7);
  numeric('size', 124, 12, spec.size, MAX_OCTAL_11);
  numeric('mtime', 136, 12, spec.mtime, MAX_OCTAL_11);
  block.write(spec.type, 156, 'latin1');
  block.write('ustar\u000000', 257, 'latin1');
  if (spec.uname) block.write(spec.uname.slice(0, 31), 265, 'latin1');
  octal(block, 329, 8, spec.devMajor ?? 0);
  octal(block, 337, 8, spec.devMinor ?? 0);
  octal(block, 148, 8, 0);
  const sum = computeChecksum(block);
  block.write(sum.toString(8).padStart(6, '0'), 148, 'latin1');
  block[154] = 0;
  block[155] = 32;
  if (records.length === 0) return block;
  if (binary) records.unshift(paxRecord('hdrcharset', Buffer.from('BINARY')));
  const data = Buffer.concat(records);
  const paxName = Buffer.from('PaxHeaders/entry');
  const paxHeader = encodeHeader({ name: paxName, type: 'x', mode: 0o644, uid: 0, gid: 0, size: data.length, mtime: spec.mtime });
  return Buffer.concat([paxHeader, data, pad(data.length), block]);
}

/** Data segments of an open file, skipping all-zero 4 KiB granules (only called for sparse files). */
async function dataSegments(fd: number, size: number, signal?: AbortSignal): Promise<Segment[]> {
  const segments: Segment[] = [];
  const buffer = Buffer.alloc(1 << 20);
  let position = 0;
  while (position < size) {
    signal?.throwIfAborted();
    const { bytesRead } = await readFd(fd, buffer, 0, Math.min(buffer.length, size - position), position);
    if (bytesRead === 0) break;
    for (let off = 0; off < bytesRead; off += HOLE_GRANULE) {
      const end = Math.min(off + HOLE_GRANULE, bytesRead);
      if (buffer.subarray(off, end).equals(ZERO_GRANULE.subarray(0, end - off))) continue;
      const start = position + off;
      const last = segments[segments.length - 1];
      if (last && last.offset + last.length === start) last.length += end - off;
      else segments.push({ offset: start, length: end - off });
    }
    position += bytesRead;
  }
  // GNU tar ends the map at the real size, so a trailing hole is kept.
  const last = segments[segments.length - 1];
  if (!last || last.offset + last.length < size) segments.push({ offset: size, length: 0 });
  return segments;
}

function sparseMap(segments: Segment[]): Buffer {
  const lines = [String(segments.length), ...segments.flatMap((s) => [String(s.offset), String(s.length)])];
  const text = Buffer.from(`${lines.join('\n')}\n`, 'latin1');
  return Buffer.concat([text, pad(text.length)]);
}

/**
 * A GNU sparse 1.0 member: PAX header, ustar header and the padded map. The caller then writes
 * the segments' data, then `pad(size)` (the member's size is map + data).
 */
export function encodeSparseMember(
  spec: { name: Buffer; mode: number; uid: number; gid: number; mtime: number; realSize: number },
  segments: Segment[],
): { header: Buffer; size: number } {
  const map = sparseMap(segments);
  const size = map.length + segments.reduce((sum, s) => sum + s.length, 0);
  const slash = spec.name.lastIndexOf(0x2f);
  const headerName = Buffer.concat([spec.name.subarray(0, slash + 1), Buffer.from('GNUSparseFile.0/'), spec.name.subarray(slash + 1)]);
  const header = encodeHeader({
    mode: spec.mode,
    uid: spec.uid,
    gid: spec.gid,
    mtime: spec.mtime,
    name: headerName,
    type: '0',
    size,
    pax: [
      paxRecord('GNU.sparse.major', Buffer.from('1')),
      paxRecord('GNU.sparse.minor', Buffer.from('0')),
      paxRecord('GNU.sparse.name', spec.name),
      paxRecord('GNU.sparse.realsize', Buffer.from(String(spec.realSize))),
    ],
  });
  return { header: Buffer.concat([header, map]), size };
}

function typeOf(st: BigIntStats): string | undefined {
  if (st.isFile()) return '0';
  if (st.isDirectory()) return '5';
  if (st.isSymbolicLink()) return '2';
  if (st.isFIFO()) return '6';
  if (st.isCharacterDevice()) return '3';
  if (st.isBlockDevice()) return '4';
  return undefined; // sockets are not archived (as with tar)
}

/** Whole seconds since the epoch, rounded down (also before 1970). */
function seconds(ns: bigint): number {
  const s = ns / 1_000_000_000n;
  return Number(s * 1_000_000_000n > ns ? s - 1n : s);
}

/**
 * `length` bytes of the open file from `start`, in pieces of up to 1 MiB. Bytes the file no
 * longer has (it shrank) come as zeros, and `onShort` is told how many.
 */
async function* readRange(fd: number, start: number, length: number, signal: AbortSignal | undefined, onShort: (missing: number) => void): AsyncGenerator<Buffer> {
  let read = 0;
  while (read < length) {
    signal?.throwIfAborted();
    // A fresh buffer per piece: the consumer keeps it.
    const buffer = Buffer.allocUnsafe(Math.min(1 << 20, length - read));
    const { bytesRead } = await readFd(fd, buffer, 0, buffer.length, start + read);
    if (bytesRead === 0) break;
    read += bytesRead;
    yield buffer.subarray(0, bytesRead);
  }
  if (read === length) return;
  onShort(length - read);
  for (let left = length - read; left > 0; left -= 1 << 20) yield Buffer.alloc(Math.min(left, 1 << 20));
}

/** An entry looked up and, for a folder or file, opened: exactly the inode its header describes. */
type Opened =
  | { type: '5'; st: BigIntStats; dir: DirHandle }
  | { type: '0'; st: BigIntStats; fd: number }
  | { type: '1'; st: BigIntStats; linkName: Buffer }
  | { type: '2'; st: BigIntStats; target: Buffer }
  | { type: '3' | '4' | '6'; st: BigIntStats };

async function* generate(root: string, options: HostTarOptions, stats: TarStats): AsyncGenerator<Buffer> {
  const prefix = Buffer.from(options.memberPrefix, 'utf8');
  const seenInodes = new Map<string, Buffer>();
  const report = (): void => options.onProgress?.({ ...stats });
  const warn = (memberName: Buffer, what: string): void => options.onWarning?.(`'${memberName.toString('utf8')}' ${what}`);
  const baseOf = (st: BigIntStats): { mode: number; uid: number; gid: number; mtime: number } => ({
    mode: Number(st.mode),
    uid: Number(st.uid),
    gid: Number(st.gid),
    mtime: seconds(st.mtimeNs),
  });

  /** Looks `name` up in `dir` and opens what must be read; undefined for a socket. Throws a changed error if it is gone. */
  async function open(dir: DirHandle, name: Buffer, memberName: Buffer): Promise<Opened | undefined> {
    const listed = await dir.lookup(name);
    try {
      const st = listed.stat;
      const type = typeOf(st);
      if (type === undefined) return undefined;
      if (type === '5') return { type, st, dir: await listed.openDir() };
      if (type === '2') return { type, st, target: await dir.readListedLink(name) };
      if (type === '0') {
        const first = st.nlink > 1n ? seenInodes.get(`${st.dev}:${st.ino}`) : undefined;
        if (first) return { type: '1', st, linkName: first };
        const fd = await listed.openFile();
        if (st.nlink > 1n) seenInodes.set(`${st.dev}:${st.ino}`, memberName);
        return { type, st, fd };
      }
      return { type: type as '3' | '4' | '6', st };
    } finally {
      await listed.close();
    }
  }

  /** Everything below the open folder `dir`, whose own member is `memberName`. */
  async function* children(dir: DirHandle, memberName: Buffer, atRoot = false): AsyncGenerator<Buffer> {
    const names = leaveOutOwnFolders(await dir.readdir(), atRoot, options.onWarning).sort((a, b) => Buffer.compare(a, b));
    for (const name of names) {
      const childName = Buffer.concat([memberName, Buffer.from('/'), name]);
      let opened: Opened | undefined;
      try {
        options.signal?.throwIfAborted();
        opened = await open(dir, name, childName).catch(async (error: unknown) => {
          if (!isChangedError(error)) throw error;
          return open(dir, name, childName); // once more: it changed between listing and opening
        });
      } catch (error) {
        if (!isChangedError(error)) throw error;
        warn(childName, 'changed while it was read, and again when looked at a second time: left out of the archive');
        continue;
      }
      if (opened) yield* member(opened, childName);
    }
  }

  /** The member(s) of an opened entry; closes what `opened` holds open. */
  async function* member(opened: Opened, memberName: Buffer): AsyncGenerator<Buffer> {
    const base = baseOf(opened.st);
    stats.entries++;
    switch (opened.type) {
      case '5':
        try {
          yield encodeHeader({ ...base, name: Buffer.concat([memberName, Buffer.from('/')]), type: '5', size: 0 });
          yield* children(opened.dir, memberName);
        } finally {
          await opened.dir.close();
        }
        return;
      case '2':
        yield encodeHeader({ ...base, name: memberName, type: '2', size: 0, linkName: opened.target });
        return;
      case '1':
        stats.files++;
        yield encodeHeader({ ...base, name: memberName, type: '1', size: 0, linkName: opened.linkName });
        return;
      case '0':
        stats.files++;
        try {
          yield* fileMember(opened.fd, opened.st, base, memberName);
        } finally {
          await closeFd(opened.fd);
        }
        return;
      default: {
        const rdev = Number(opened.st.rdev);
        yield encodeHeader({ ...base, name: memberName, type: opened.type, size: 0, devMajor: Math.floor(rdev / 256), devMinor: rdev % 256 });
      }
    }
  }

  async function* fileMember(fd: number, st: BigIntStats, base: ReturnType<typeof baseOf>, memberName: Buffer): AsyncGenerator<Buffer> {
    const size = Number(st.size);
    let warned = false;
    const onShort = (missing: number): void => {
      if (!warned) warn(memberName, `shrank while it was read: ${missing} bytes at its end are stored as zeros`);
      warned = true;
    };
    const sparse = size > 0 && st.blocks * 512n < st.size;
    if (!sparse) {
      yield encodeHeader({ ...base, name: memberName, type: '0', size });
      for await (const chunk of readRange(fd, 0, size, options.signal, onShort)) {
        stats.bytes += chunk.length;
        yield chunk;
        report();
      }
      yield pad(size);
      return;
    }
    const segments = await dataSegments(fd, size, options.signal);
    const sparseMember = encodeSparseMember({ ...base, name: memberName, realSize: size }, segments);
    yield sparseMember.header;
    for (const s of segments) {
      for await (const chunk of readRange(fd, s.offset, s.length, options.signal, onShort)) yield chunk;
    }
    // Bytes count the file's logical size, holes included, as readers of the archive see it.
    stats.bytes += size;
    report();
    yield pad(sparseMember.size);
  }

  const rootDir = await DirHandle.openRoot(root);
  try {
    const st = await rootDir.stat();
    stats.entries++;
    yield encodeHeader({ ...baseOf(st), name: Buffer.concat([prefix, Buffer.from('/')]), type: '5', size: 0 });
    yield* children(rootDir, prefix, true);
  } finally {
    await rootDir.close();
  }
  yield Buffer.alloc(BLOCK * 2);
}

/** A tar stream of the folder `root` with member names under `memberPrefix`. */
export function hostTarStream(root: string, options: HostTarOptions): { stream: Readable; stats: TarStats } {
  const stats: TarStats = { entries: 0, files: 0, bytes: 0 };
  return { stream: Readable.from(generate(root, options, stats), { objectMode: false, highWaterMark: 1 << 20 }), stats };
}
