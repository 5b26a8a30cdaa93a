/**
 * A small SFTP client: protocol version 3 (draft-ietf-secsh-filexfer-02, the version OpenSSH and
 * most servers speak) plus OpenSSH's extensions `posix-rename@openssh.com`, `fsync@openssh.com` and
 * `limits@openssh.com`, over any pair of byte streams. In practice the streams are the stdout and
 * stdin of `ssh HOST -s sftp` (sftp.ts says why the system's ssh); the tests also run it over
 * OpenSSH's `sftp-server` directly.
 *
 * Every packet is `uint32 length, byte type, payload`; a request carries a `uint32 id` and its
 * reply the same id, so requests are pipelined: each call sends its packet at once and resolves
 * when its reply arrives, in any order. A caller that issues several calls before awaiting them has
 * several in flight (`readRange` and `writeParts` do this for one file).
 *
 * Memory is bounded whatever the server does: at most `maxInFlight` requests await replies (later
 * calls wait before sending), writes wait for the stream to drain, and a reply longer than
 * MAX_PACKET, or one that does not parse, ends the session with an error instead of being buffered
 * or guessed at. Once the session ends (the stream closed, a bad reply, `terminate`), every pending
 * and later call rejects with the same error.
 */
import type { Readable, Writable } from 'node:stream';

const FXP = {
  INIT: 1,
  VERSION: 2,
  OPEN: 3,
  CLOSE: 4,
  READ: 5,
  WRITE: 6,
  LSTAT: 7,
  FSTAT: 8,
  OPENDIR: 11,
  READDIR: 12,
  REMOVE: 13,
  MKDIR: 14,
  RMDIR: 15,
  STAT: 17,
  RENAME: 18,
  STATUS: 101,
  HANDLE: 102,
  DATA: 103,
  NAME: 104,
  ATTRS: 105,
  EXTENDED: 200,
  EXTENDED_REPLY: 201,
} as const;

/** `pflags` of OPEN. */
export const OPEN_FLAGS = { read: 0x01, write: 0x02, append: 0x04, create: 0x08, truncate: 0x10, exclusive: 0x20 } as const;

/** Status codes of protocol version 3. */
export const STATUS = {
  ok: 0,
  eof: 1,
  noSuchFile: 2,
  permissionDenied: 3,
  failure: 4,
  badMessage: 5,
  noConnection: 6,
  connectionLost: 7,
  unsupported: 8,
} as const;

const ATTR = { size: 0x1, uidgid: 0x2, permissions: 0x4, acmodtime: 0x8, extended: 0x80000000 } as const;

/** The longest reply accepted: OpenSSH sends at most 256 KiB; anything far larger is not SFTP. */
export const MAX_PACKET = 1024 * 1024;
/** Read and write size when the server does not tell its limits (OpenSSH's own client's default). */
export const DEFAULT_CHUNK = 32 * 1024;
/** The largest read or write asked for even when a server allows more (OpenSSH allows 255 KiB). */
export const MAX_CHUNK = 255 * 1024;

export interface FileAttributes {
  size?: number;
  uid?: number;
  gid?: number;
  /** Type and permission bits, as st_mode. */
  permissions?: number;
  /** Seconds since the epoch (version 3 has no finer times). */
  atime?: number;
  mtime?: number;
}

export interface DirectoryEntry {
  name: string;
  attrs: FileAttributes;
}

export function isDirectory(attrs: FileAttributes): boolean {
  return attrs.permissions !== undefined && (attrs.permissions & 0o170000) === 0o040000;
}

export function isRegularFile(attrs: FileAttributes): boolean {
  return attrs.permissions !== undefined && (attrs.permissions & 0o170000) === 0o100000;
}

/**
 * A failed request (`status` is the server's code) or a session that ended (`status` undefined).
 * `code` is the errno a local file system would have given, so callers treat both backends alike:
 * ENOENT (no such file), EACCES, ENOTSUP, EIO (the server's generic failure), EBADMSG (the
 * server broke the protocol), ECONNRESET (the session ended).
 */
export class SftpError extends Error {
  /** A session that ended (the connection, not the request, failed): worth another try (retry.ts). */
  readonly transient: boolean;

  constructor(
    message: string,
    readonly code: string,
    readonly status: number | undefined,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'SftpError';
    this.transient = code === 'ECONNRESET';
  }
}

function errnoOf(status: number): string {
  switch (status) {
    case STATUS.noSuchFile:
      return 'ENOENT';
    case STATUS.permissionDenied:
      return 'EACCES';
    case STATUS.unsupported:
      return 'ENOTSUP';
    case STATUS.badMessage:
      return 'EBADMSG';
    case STATUS.noConnection:
    case STATUS.connectionLost:
      return 'ECONNRESET';
    default:
      return 'EIO';
  }
}

const badMessage = (what: string): SftpError => new SftpError(`the SFTP server sent a malformed reply (${what})`, 'EBADMSG', undefined);

/** Reads the fields of one packet; any read past its end is a malformed reply. */
class PacketReader {
  private at = 0;
  constructor(private readonly packet: Buffer) {}

  get remaining(): number {
    return this.packet.length - this.at;
  }

  private need(n: number): void {
    if (this.at + n > this.packet.length) throw badMessage('truncated field');
  }

  u8(): number {
    this.need(1);
    return this.packet[this.at++]!;
  }

  u32(): number {
    this.need(4);
    const value = this.packet.readUInt32BE(this.at);
    this.at += 4;
    return value;
  }

  u64(): number {
    this.need(8);
    const value = this.packet.readBigUInt64BE(this.at);
    this.at += 8;
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw badMessage('a 64-bit number out of range');
    return Number(value);
  }

  bytes(): Buffer {
    const length = this.u32();
    this.need(length);
    const value = this.packet.subarray(this.at, this.at + length);
    this.at += length;
    return value;
  }

  string(): string {
    return this.bytes().toString('utf8');
  }

  attrs(): FileAttributes {
    const flags = this.u32();
    const attrs: FileAttributes = {};
    if (flags & ATTR.size) attrs.size = this.u64();
    if (flags & ATTR.uidgid) {
      attrs.uid = this.u32();
      attrs.gid = this.u32();
    }
    if (flags & ATTR.permissions) attrs.permissions = this.u32();
    if (flags & ATTR.acmodtime) {
      attrs.atime = this.u32();
      attrs.mtime = this.u32();
    }
    if (flags & ATTR.extended) {
      const count = this.u32();
      for (let i = 0; i < count; i++) {
        this.bytes();
        this.bytes();
      }
    }
    return attrs;
  }
}

const u32 = (value: number): Buffer => {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(value >>> 0);
  return b;
};
const u64 = (value: number): Buffer => {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(value));
  return b;
};
const str = (value: string | Buffer): Buffer[] => {
  const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
  return [u32(bytes.length), bytes];
};
const attrsWithMode = (mode: number | undefined): Buffer[] => (mode === undefined ? [u32(0)] : [u32(ATTR.permissions), u32(mode)]);

interface Reply {
  type: number;
  reader: PacketReader;
  /** For a read with a sink: the DATA reply's bytes went straight into it, this many. */
  sunk?: number;
}

interface Pending {
  resolve: (reply: Reply) => void;
  reject: (error: Error) => void;
  /** A read's destination: the data of its DATA reply is copied here as it arrives (see onData). */
  sink?: Buffer;
}

/** A DATA reply's header: length, type, id, the data's length. */
const DATA_HEADER = 13;

/** Reading in place: the least of a reply's data left for a read straight into its sink (less goes through the scratch buffer, with what follows it). */
const IN_PLACE_MIN = 16 << 10;

/** What the server said it can do (`limits@openssh.com`), or our defaults. */
export interface SftpLimits {
  readLength: number;
  writeLength: number;
}

export interface SftpSessionOptions {
  /** Requests awaiting replies at once, across all callers (default 64). */
  maxInFlight?: number;
  /**
   * The input is read in place (a socket made with `onread`, whose callbacks call `readBuffer`
   * and `received`): the session does not listen for its 'data'.
   */
  readsInPlace?: boolean;
  /**
   * Hears when the session starts waiting for replies (true) and when it no longer waits for any
   * (false; also when it ends): the owner keeps the process alive only while replies are due.
   */
  onBusy?: (busy: boolean) => void;
}

export class SftpSession {
  /** Extensions the server announced in VERSION (name → data). */
  readonly extensions = new Map<string, string>();
  /** Set once the session ended; every call rejects with it. */
  failure: SftpError | undefined;

  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly maxInFlight: number;
  private readonly slotWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private inFlight = 0;
  private drained: Promise<void> | undefined;
  private chunks: Buffer[] = [];
  private chunkBytes = 0;
  /** The DATA reply whose bytes are being copied into its read's sink. */
  private sinking: { id: number; sink: Buffer; at: number; remaining: number } | undefined;
  private version: { resolve: (v: number) => void; reject: (e: Error) => void } | undefined;
  private limitsCache: Promise<SftpLimits> | undefined;
  private readonly onBusy: (busy: boolean) => void;
  /** Where a read in place goes when no reply's data is due (its bytes are parsed, then copied if kept). */
  private readonly scratch = Buffer.allocUnsafe(64 << 10);

  private constructor(
    private readonly input: Readable,
    private readonly output: Writable,
    options: SftpSessionOptions,
  ) {
    this.maxInFlight = options.maxInFlight ?? 64;
    this.onBusy = options.onBusy ?? (() => undefined);
    if (!options.readsInPlace) input.on('data', (chunk: Buffer) => this.onData(chunk, false));
    input.on('end', () => this.terminate(new SftpError('the SFTP session ended', 'ECONNRESET', undefined)));
    input.on('error', (error) => this.terminate(new SftpError(`the SFTP session failed: ${error.message}`, 'ECONNRESET', undefined, { cause: error })));
    output.on('error', (error) => this.terminate(new SftpError(`the SFTP session failed: ${error.message}`, 'ECONNRESET', undefined, { cause: error })));
  }

  /** Sends INIT and resolves once the server's VERSION (3) arrived with its extensions. */
  static start(input: Readable, output: Writable, options: SftpSessionOptions = {}): Promise<SftpSession> {
    return SftpSession.begin(input, output, options).ready;
  }

  /** `start`, with the session at once (for `readsInPlace`: its reads need it before it is ready). */
  static begin(input: Readable, output: Writable, options: SftpSessionOptions = {}): { session: SftpSession; ready: Promise<SftpSession> } {
    const session = new SftpSession(input, output, options);
    const version = new Promise<number>((resolve, reject) => (session.version = { resolve, reject }));
    session.output.write(Buffer.concat([u32(5), Buffer.from([FXP.INIT]), u32(3)]));
    const ready = version.then((spoken) => {
      if (spoken === 3) return session;
      const error = new SftpError(`the SFTP server speaks protocol version ${spoken}, not 3`, 'ENOTSUP', undefined);
      session.terminate(error);
      throw error;
    });
    return { session, ready };
  }

  /** Ends the session: pending and later calls reject with `error`. Idempotent (the first error stays). */
  terminate(error: SftpError): void {
    if (this.failure) return;
    this.failure = error;
    this.version?.reject(error);
    for (const p of this.pending.values()) p.reject(error);
    this.pending.clear();
    this.onBusy(false);
    for (const w of this.slotWaiters.splice(0)) w.reject(error);
    this.chunks = [];
    this.chunkBytes = 0;
    this.sinking = undefined;
  }

  // ---- framing ----

  /**
   * Reading in place (`readsInPlace`): the memory the next read of the input goes into. While the
   * data of a DATA reply to a read with a sink is due, that is the rest of the sink, so the
   * kernel copies the data straight to where the read wants it: no buffer per chunk, no copy here.
   * Otherwise a scratch buffer, whose bytes `received` parses.
   */
  readBuffer(): Buffer {
    const s = this.sinking;
    if (s && s.remaining >= IN_PLACE_MIN) return s.sink.subarray(s.at, s.at + s.remaining);
    return this.scratch;
  }

  /** Reading in place: `n` bytes were read into `buffer`, the memory `readBuffer` returned last. */
  received(n: number, buffer: Uint8Array): void {
    if (this.failure || n <= 0) return;
    const s = this.sinking;
    if (s && buffer.buffer === s.sink.buffer && buffer.byteOffset === s.sink.byteOffset + s.at) {
      if (n > s.remaining) {
        this.terminate(badMessage(`${n} bytes read into the ${s.remaining} left of a reply`));
        return;
      }
      s.at += n;
      s.remaining -= n;
      if (s.remaining === 0) this.endSink();
      return;
    }
    this.onData(Buffer.from(buffer.buffer, buffer.byteOffset, n), true);
  }

  /**
   * Splits the stream into packets. The data of a DATA reply to a read that gave a sink is copied
   * from the pipe's chunks straight into it, as it arrives: a large reply spans many chunks, and
   * joining them first, then copying the data out, moved every byte twice. `transient`: the
   * chunk's memory is read into again later (the scratch of `received`), so what is kept of it is
   * copied.
   */
  private onData(chunk: Buffer, transient: boolean): void {
    if (this.failure) return;
    try {
      const rest = this.feedSink(chunk);
      if (rest.length === 0) return;
      this.chunks.push(rest);
      this.chunkBytes += rest.length;
      while (this.chunkBytes >= 4) {
        const length = this.peek(4).readUInt32BE(0);
        if (length < 1 || length > MAX_PACKET) throw badMessage(`a packet of ${length} bytes`);
        if (this.startSink(length)) {
          // What is buffered after the header goes into the sink; bytes past the reply stay.
          const buffered = this.chunks;
          this.chunks = [];
          this.chunkBytes = 0;
          for (const piece of buffered) {
            const left = this.feedSink(piece);
            if (left.length > 0) {
              this.chunks.push(left);
              this.chunkBytes += left.length;
            }
          }
          if (this.sinking || this.failure) return;
          continue;
        }
        if (this.chunkBytes < 4 + length) return;
        const packet = this.take(4 + length).subarray(4);
        // A reply's parts may be kept (a handle): never memory that is read into again.
        this.dispatch(transient && packet.buffer === chunk.buffer ? Buffer.from(packet) : packet);
        if (this.failure) return;
      }
    } catch (error) {
      this.terminate(error instanceof SftpError ? error : badMessage((error as Error).message));
    } finally {
      // What stays buffered of a transient chunk is copied out of it before it is read into again.
      if (transient) this.chunks = this.chunks.map((c) => (c.buffer === chunk.buffer ? Buffer.from(c) : c));
    }
  }

  /**
   * If the buffered packet (of `length` bytes) is a DATA reply to a read with a sink large enough,
   * takes its header and starts copying its data into the sink; false otherwise (a STATUS, an
   * unexpected length: parsed as any packet, and the read reports it).
   */
  private startSink(length: number): boolean {
    if (this.chunkBytes < DATA_HEADER) return false;
    const head = this.peek(DATA_HEADER);
    if (head[4] !== FXP.DATA) return false;
    const id = head.readUInt32BE(5);
    const size = head.readUInt32BE(9);
    const sink = this.pending.get(id)?.sink;
    if (!sink || length !== DATA_HEADER - 4 + size || size > sink.length) return false;
    this.take(DATA_HEADER);
    this.sinking = { id, sink, at: 0, remaining: size };
    if (size === 0) this.endSink();
    return true;
  }

  /** Copies what `chunk` holds of the reply being sunk; returns the rest of it (all of it when none is). */
  private feedSink(chunk: Buffer): Buffer {
    const s = this.sinking;
    if (!s) return chunk;
    const n = Math.min(s.remaining, chunk.length);
    chunk.copy(s.sink, s.at, 0, n);
    s.at += n;
    s.remaining -= n;
    if (s.remaining === 0) this.endSink();
    return chunk.subarray(n);
  }

  private endSink(): void {
    const s = this.sinking!;
    this.sinking = undefined;
    const pending = this.pending.get(s.id);
    if (!pending) return;
    this.pending.delete(s.id);
    if (this.pending.size === 0) this.onBusy(false);
    this.releaseSlot();
    pending.resolve({ type: FXP.DATA, reader: new PacketReader(Buffer.alloc(0)), sunk: s.at });
  }

  private peek(n: number): Buffer {
    if (this.chunks[0]!.length < n) this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0]!.subarray(0, n);
  }

  private take(n: number): Buffer {
    let first = this.chunks[0]!;
    if (first.length < n) {
      // Join only what this packet needs (a large reply arrives in many pipe reads).
      const parts: Buffer[] = [];
      let have = 0;
      while (have < n) {
        const next = this.chunks.shift()!;
        parts.push(next);
        have += next.length;
      }
      first = Buffer.concat(parts, have);
      this.chunks.unshift(first);
    }
    this.chunkBytes -= n;
    if (first.length === n) {
      this.chunks.shift();
      return first;
    }
    this.chunks[0] = first.subarray(n);
    return first.subarray(0, n);
  }

  private dispatch(packet: Buffer): void {
    const reader = new PacketReader(packet);
    const type = reader.u8();
    if (type === FXP.VERSION) {
      if (!this.version) throw badMessage('an unexpected VERSION');
      const version = reader.u32();
      while (reader.remaining > 0) this.extensions.set(reader.string(), reader.string());
      const waiter = this.version;
      this.version = undefined;
      waiter.resolve(version);
      return;
    }
    const id = reader.u32();
    const pending = this.pending.get(id);
    if (!pending) throw badMessage(`a reply to no request (id ${id})`);
    this.pending.delete(id);
    if (this.pending.size === 0) this.onBusy(false);
    this.releaseSlot();
    pending.resolve({ type, reader });
  }

  // ---- requests ----

  /** Takes one of the `maxInFlight` slots (held until the reply arrives), waiting if none is free. */
  private async acquireSlot(): Promise<void> {
    if (this.failure) throw this.failure;
    if (this.inFlight < this.maxInFlight) {
      this.inFlight++;
      return;
    }
    // A released slot passes straight to the first waiter (inFlight stays as it is).
    await new Promise<void>((resolve, reject) => this.slotWaiters.push({ resolve, reject }));
  }

  private releaseSlot(): void {
    const next = this.slotWaiters.shift();
    if (next) next.resolve();
    else this.inFlight--;
  }

  private async request(type: number, parts: Buffer[], sink?: Buffer): Promise<Reply> {
    await this.acquireSlot();
    if (this.drained) await this.drained;
    if (this.failure) {
      this.releaseSlot();
      throw this.failure;
    }
    const id = this.nextId;
    this.nextId = (this.nextId + 1) >>> 0 || 1;
    const length = 5 + parts.reduce((n, p) => n + p.length, 0);
    const reply = new Promise<Reply>((resolve, reject) => this.pending.set(id, sink ? { resolve, reject, sink } : { resolve, reject }));
    if (this.pending.size === 1) this.onBusy(true);
    const header = Buffer.allocUnsafe(9);
    header.writeUInt32BE(length, 0);
    header[4] = type;
    header.writeUInt32BE(id, 5);
    this.output.cork();
    let ok = this.output.write(header);
    for (const part of parts) ok = this.output.write(part) && ok;
    this.output.uncork();
    if (!ok && !this.drained) {
      this.drained = new Promise<void>((resolve) => {
        const done = (): void => {
          this.output.off('drain', done);
          this.output.off('close', done);
          this.drained = undefined;
          resolve();
        };
        this.output.on('drain', done);
        this.output.on('close', done);
      });
    }
    return reply;
  }

  /** A STATUS reply: OK resolves, anything else rejects with its errno code. */
  private static status(reply: Reply, what: string): void {
    if (reply.type !== FXP.STATUS) throw badMessage(`${what}: reply type ${reply.type}`);
    const code = reply.reader.u32();
    if (code === STATUS.ok) return;
    throw SftpSession.statusError(code, reply.reader, what);
  }

  private static statusError(code: number, reader: PacketReader, what: string): SftpError {
    let message = '';
    try {
      message = reader.string();
    } catch {
      // Version 3 servers may leave the message out.
    }
    return new SftpError(`${what}: ${message || `SFTP status ${code}`}`, errnoOf(code), code);
  }

  private static expect(reply: Reply, type: number, what: string): PacketReader {
    if (reply.type === type) return reply.reader;
    if (reply.type === FXP.STATUS) {
      const code = reply.reader.u32();
      throw SftpSession.statusError(code, reply.reader, what);
    }
    throw badMessage(`${what}: reply type ${reply.type}`);
  }

  /** Opens a file; `mode` applies when it is created. Resolves to the server's handle. */
  async open(path: string, flags: number, mode?: number): Promise<Buffer> {
    const reply = await this.request(FXP.OPEN, [...str(path), u32(flags), ...attrsWithMode(mode)]);
    return Buffer.from(SftpSession.expect(reply, FXP.HANDLE, `open ${path}`).bytes());
  }

  async close(handle: Buffer): Promise<void> {
    SftpSession.status(await this.request(FXP.CLOSE, str(handle)), 'close');
  }

  /**
   * Up to `length` bytes at `offset` (a server may return fewer); undefined at the end of the file.
   * With `into` (at least `length` long), the bytes are received straight into it and the result is
   * the part of it they filled.
   */
  async read(handle: Buffer, offset: number, length: number, into?: Buffer): Promise<Buffer | undefined> {
    const reply = await this.request(FXP.READ, [...str(handle), u64(offset), u32(length)], into && into.length >= length ? into.subarray(0, length) : undefined);
    if (reply.sunk !== undefined) return into!.subarray(0, reply.sunk);
    if (reply.type === FXP.STATUS) {
      const code = reply.reader.u32();
      if (code === STATUS.eof) return undefined;
      throw SftpSession.statusError(code, reply.reader, 'read');
    }
    const data = SftpSession.expect(reply, FXP.DATA, 'read').bytes();
    if (data.length > length) throw badMessage(`read: ${data.length} bytes for ${length} asked`);
    return data;
  }

  async write(handle: Buffer, offset: number, data: Buffer): Promise<void> {
    SftpSession.status(await this.request(FXP.WRITE, [...str(handle), u64(offset), u32(data.length), data]), 'write');
  }

  async stat(path: string): Promise<FileAttributes> {
    return SftpSession.expect(await this.request(FXP.STAT, str(path)), FXP.ATTRS, `stat ${path}`).attrs();
  }

  async lstat(path: string): Promise<FileAttributes> {
    return SftpSession.expect(await this.request(FXP.LSTAT, str(path)), FXP.ATTRS, `lstat ${path}`).attrs();
  }

  async fstat(handle: Buffer): Promise<FileAttributes> {
    return SftpSession.expect(await this.request(FXP.FSTAT, str(handle)), FXP.ATTRS, 'fstat').attrs();
  }

  async opendir(path: string): Promise<Buffer> {
    return Buffer.from(SftpSession.expect(await this.request(FXP.OPENDIR, str(path)), FXP.HANDLE, `opendir ${path}`).bytes());
  }

  /** The next entries of an open folder; undefined once all were read. */
  async readdir(handle: Buffer): Promise<DirectoryEntry[] | undefined> {
    const reply = await this.request(FXP.READDIR, str(handle));
    if (reply.type === FXP.STATUS) {
      const code = reply.reader.u32();
      if (code === STATUS.eof) return undefined;
      throw SftpSession.statusError(code, reply.reader, 'readdir');
    }
    const reader = SftpSession.expect(reply, FXP.NAME, 'readdir');
    const count = reader.u32();
    const entries: DirectoryEntry[] = [];
    for (let i = 0; i < count; i++) {
      const name = reader.string();
      reader.bytes(); // the `ls -l` line
      entries.push({ name, attrs: reader.attrs() });
    }
    return entries;
  }

  async mkdir(path: string, mode?: number): Promise<void> {
    SftpSession.status(await this.request(FXP.MKDIR, [...str(path), ...attrsWithMode(mode)]), `mkdir ${path}`);
  }

  async remove(path: string): Promise<void> {
    SftpSession.status(await this.request(FXP.REMOVE, str(path)), `remove ${path}`);
  }

  async rmdir(path: string): Promise<void> {
    SftpSession.status(await this.request(FXP.RMDIR, str(path)), `rmdir ${path}`);
  }

  /** Version 3's rename: fails when `to` exists (OpenSSH links and unlinks). */
  async rename(from: string, to: string): Promise<void> {
    SftpSession.status(await this.request(FXP.RENAME, [...str(from), ...str(to)]), `rename ${from}`);
  }

  /** rename(2): replaces `to` atomically. ENOTSUP when the server lacks the extension. */
  async posixRename(from: string, to: string): Promise<void> {
    this.requireExtension('posix-rename@openssh.com');
    SftpSession.status(await this.request(FXP.EXTENDED, [...str('posix-rename@openssh.com'), ...str(from), ...str(to)]), `rename ${from}`);
  }

  /** fsync(2) of an open file (or folder). ENOTSUP when the server lacks the extension. */
  async fsync(handle: Buffer): Promise<void> {
    this.requireExtension('fsync@openssh.com');
    SftpSession.status(await this.request(FXP.EXTENDED, [...str('fsync@openssh.com'), ...str(handle)]), 'fsync');
  }

  /** Read and write sizes to use: the server's limits (capped at MAX_CHUNK), else DEFAULT_CHUNK. */
  limits(): Promise<SftpLimits> {
    this.limitsCache ??= (async () => {
      if (!this.extensions.has('limits@openssh.com')) return { readLength: DEFAULT_CHUNK, writeLength: DEFAULT_CHUNK };
      const reader = SftpSession.expect(await this.request(FXP.EXTENDED, str('limits@openssh.com')), FXP.EXTENDED_REPLY, 'limits');
      reader.u64(); // packet length
      const clamp = (n: number): number => (n === 0 ? DEFAULT_CHUNK : Math.max(1024, Math.min(n, MAX_CHUNK)));
      return { readLength: clamp(reader.u64()), writeLength: clamp(reader.u64()) };
    })();
    return this.limitsCache;
  }

  private requireExtension(name: string): void {
    if (!this.extensions.has(name)) throw new SftpError(`the SFTP server lacks ${name}`, 'ENOTSUP', STATUS.unsupported);
  }

  // ---- pipelined transfers ----

  /**
   * `length` bytes at `offset` of an open file, asked for in `chunk`-sized reads with at most
   * `window` in flight; shorter if the file ends first. A short reply (servers may send less than
   * asked) is followed by a read of the rest.
   */
  async readRange(handle: Buffer, offset: number, length: number, options: { chunk: number; window: number }): Promise<Buffer> {
    const out = Buffer.allocUnsafe(length);
    let end = length; // lowered to the file's end once a read meets it
    let next = 0;
    let failed = false;
    const worker = async (): Promise<void> => {
      while (!failed && next < end) {
        const start = next;
        const stop = Math.min(start + options.chunk, length);
        next = stop;
        let at = start;
        while (at < stop && at < end) {
          const data = await this.read(handle, offset + at, stop - at, out.subarray(at, stop));
          if (data === undefined || data.length === 0) {
            end = Math.min(end, at);
            break;
          }
          if (data.buffer !== out.buffer || data.byteOffset !== out.byteOffset + at) data.copy(out, at);
          at += data.length;
        }
      }
    };
    const results = await Promise.allSettled(
      Array.from({ length: Math.max(1, Math.min(options.window, Math.ceil(length / options.chunk))) }, () =>
        worker().catch((error: unknown) => {
          failed = true;
          throw error;
        }),
      ),
    );
    const rejected = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (rejected) throw rejected.reason;
    return out.subarray(0, end);
  }

  /**
   * Writes the parts in order from offset 0 in `chunk`-sized writes, at most `window` in flight.
   * Large parts go out as slices of themselves; small ones are gathered into chunks (a pack of tiny
   * blobs has thousands of parts, and one request each would cost more than their bytes).
   */
  async writeParts(handle: Buffer, parts: Buffer[], options: { chunk: number; window: number }): Promise<void> {
    const chunks = chunksOf(parts, options.chunk);
    let offset = 0;
    let failed = false;
    const worker = async (): Promise<void> => {
      for (;;) {
        if (failed) return;
        const next = chunks.next();
        if (next.done) return;
        const at = offset;
        offset += next.value.length;
        await this.write(handle, at, next.value);
      }
    };
    const results = await Promise.allSettled(
      Array.from({ length: Math.max(1, options.window) }, () =>
        worker().catch((error: unknown) => {
          failed = true;
          throw error;
        }),
      ),
    );
    const rejected = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (rejected) throw rejected.reason;
  }
}

/** The bytes of `parts` in pieces of at most `size` (slices where possible, gathered copies of small parts). */
function* chunksOf(parts: Buffer[], size: number): Generator<Buffer> {
  let gather: Buffer | undefined;
  let filled = 0;
  for (const part of parts) {
    let at = 0;
    while (at < part.length) {
      if (gather === undefined && part.length - at >= size) {
        yield part.subarray(at, at + size);
        at += size;
        continue;
      }
      gather ??= Buffer.allocUnsafe(size);
      const n = Math.min(size - filled, part.length - at);
      part.copy(gather, filled, at, at + n);
      filled += n;
      at += n;
      if (filled === size) {
        yield gather;
        gather = undefined;
        filled = 0;
      }
    }
  }
  if (gather !== undefined && filled > 0) yield gather.subarray(0, filled);
}
