/**
 * Worker thread: reads one file at a time, cuts it into chunks, and for each chunk computes its
 * id (SHA-256), notes an all-zero chunk as a hole, and otherwise compresses and seals it. The
 * main thread only dedups and packs, so chunking, hashing, compression and encryption run on
 * every core. Flow control: at most MAX_UNACKED_BYTES of sealed chunks are sent before the main
 * thread acknowledges them, so memory stays bounded even for a file of many GB.
 *
 * A file arrives as a file descriptor that the main thread opened (relative to a folder handle,
 * checked to be the inode it listed: see fs/beneath.ts); descriptors are the process's, so the
 * number is enough. This thread never opens a volume's file by path and never closes the
 * descriptor: the main thread closes it once this thread has answered 'done' or 'error' (or has
 * ended). A 'cancel' makes it stop reading that file at the next chunk and answer 'error'.
 *
 * The master key arrives in workerData (memory shared with the parent), never in argv.
 */
import { createHash } from 'node:crypto';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { isAllZero } from './zero.js';
import { Chunker, type ChunkerParams } from './chunker.js';
import { open as openSealed, seal, sealParts } from './crypto.js';
import { packPayload, payloadParts, unpackPayload } from './compression.js';
import { blobAad } from './aad.js';
import { GarbageHint } from './gc-hint.js';
import { CorruptArchiveError } from '../errors.js';
import type { SignedRequest } from '../backend/backend.js';
import type { SignedGetter } from '../backend/signed-get.js';

/**
 * Sealed bytes sent and not yet acknowledged, per worker (and at most MAX_UNACKED chunks): enough
 * to keep the main thread fed while it writes a batch (a 1 MiB batch, chunks of 1 MiB on
 * average), little enough that sealed chunks waiting for it stay a few MiB — counted in bytes,
 * since data without content-defined boundaries (a database's padded rows) comes in chunks of
 * the maximum size, 8 MiB. One chunk always goes. (8 MiB here, and reads of 4 MiB, cost about
 * 10 MiB more at the peak of a first backup.)
 */
export const MAX_UNACKED_BYTES = 3 << 20;
export const MAX_UNACKED = 16;
/** Bytes read per system call (the worker's buffer holds a max-size chunk and one read). */
const READ_SIZE = 1 << 20;

export type WorkerRequest =
  | { type: 'file'; task: number; fd: number; size: number }
  | { type: 'cancel'; task: number }
  | { type: 'ack'; task: number }
  /** Small blobs (whole small files) to hash and seal, back to back in one transferred buffer. */
  | { type: 'seal'; task: number; data: ArrayBuffer; lengths: number[] }
  | { type: 'load'; task: number; packPath: string; id: string; blobType: string; offset: number; length: number; rawLength: number; hash: boolean; to: BlobDestination }
  /**
   * Downloads `length` bytes (a range of a pack) with a signed request, writes them into the kept
   * reads' file at `keep.position` (when given), and authenticates the blobs in them (`start`:
   * where a blob begins in the range). The request carries a signature: never logged.
   */
  | {
      type: 'fetch';
      task: number;
      /** The signed request, or the range's bytes (transferred) when the main thread read them. */
      request: SignedRequest | undefined;
      data?: ArrayBuffer;
      length: number;
      keep: { path: string; position: number } | undefined;
      blobs: FetchedBlob[];
    }
  /** Closes the files kept open between reads (packs, kept reads); answered with 'closed'. */
  | { type: 'close-files'; task: number }
  /**
   * Reads the open file `fd` range by range and compares each with the chunk it should hold (its
   * SHA-256, or zeros for a `zero:` chunk); answered with 'compared'. The caller keeps `fd` open
   * until the answer.
   */
  | { type: 'compare'; task: number; fd: number; ranges: { offset: number; length: number; id: string }[] };

/** A blob in a fetched range: its id, type and lengths, and where it starts in the range. */
export interface FetchedBlob {
  id: string;
  blobType: string;
  start: number;
  length: number;
  rawLength: number;
  /** Where its plaintext goes (a restore's files, at these offsets): written here, once authenticated. */
  dests?: { fd: number; position: number }[];
}

/**
 * Where a loaded blob goes: back to the main thread, nowhere (verification: only authenticated),
 * or straight into an open file (restore: the plaintext never crosses threads).
 */
export type BlobDestination = { kind: 'reply' } | { kind: 'discard' } | { kind: 'file'; fd: number; position: number };

export type WorkerReply =
  /** `sealed`: the sealed chunk in parts (see sealParts), undefined for a hole. */
  | { type: 'chunk'; task: number; id: string; rawLength: number; sealed: Uint8Array[] | undefined }
  | { type: 'done'; task: number; bytesRead: number }
  | { type: 'error'; task: number; message: string; code: string | undefined; corrupt?: boolean }
  | { type: 'blob'; task: number; data: Uint8Array | undefined }
  | { type: 'closed'; task: number }
  /** For a 'fetch' whose download succeeded: the blobs (by their index) that failed authentication, and whether the range was kept. */
  | { type: 'fetched'; task: number; damaged: { index: number; message: string }[]; kept: boolean }
  /** For a 'seal': each blob's id, and the sealed blobs back to back. */
  | { type: 'sealed'; task: number; ids: string[]; sealed: ArrayBuffer; sealedLengths: number[] }
  /** For a 'compare': whether every range held its chunk (false at the first that did not, or at a short read). */
  | { type: 'compared'; task: number; same: boolean }
  /** Sent once, when this thread has set itself up (V8 flags included: see gc-hint.ts). */
  | { type: 'ready'; task: 0 };

interface WorkerData {
  key: Uint8Array;
  chunker: ChunkerParams;
}


if (parentPort) {
  const port = parentPort;
  const data = workerData as WorkerData;
  const key = Buffer.from(data.key);
  let wake: (() => void) | undefined;
  const queue: { task: number; fd: number; size: number }[] = [];
  /** Tasks the main thread gave up on (its chunk handler failed, or the backup was aborted). */
  const cancelled = new Set<number>();
  let active: number | undefined;
  /** Allocated with the first file: a backup of small files only (sealed in batches) never needs it. */
  let work: Buffer | undefined;
  const probe = Buffer.allocUnsafe(1);
  const garbage = new GarbageHint();

  /**
   * Sizes of the chunks sent and not yet acknowledged, released oldest first (an ack of the next
   * file's chunk may overtake the last ones of this file: that only shifts which size is freed).
   */
  const unackedSizes: number[] = [];
  let unackedBytes = 0;
  const send = async (reply: WorkerReply, transfer: ArrayBuffer[] = []): Promise<void> => {
    if (reply.type === 'chunk') {
      const size = reply.sealed?.reduce((n, part) => n + part.byteLength, 0) ?? 0;
      while (unackedSizes.length >= MAX_UNACKED || (unackedSizes.length > 0 && unackedBytes + size > MAX_UNACKED_BYTES)) {
        await new Promise<void>((resolve) => (wake = resolve));
      }
      unackedSizes.push(size);
      unackedBytes += size;
    }
    port.postMessage(reply, transfer);
  };

  const processFile = async (task: number, fd: number, size: number): Promise<void> => {
    const chunker = new Chunker(data.chunker);
    const emit = async (chunk: Buffer): Promise<void> => {
      if (cancelled.has(task)) throw Object.assign(new Error('cancelled'), { code: 'ECANCELED' });
      const id = createHash('sha256').update(chunk).digest('hex');
      if (isAllZero(chunk)) {
        await send({ type: 'chunk', task, id: `zero:${chunk.length}`, rawLength: chunk.length, sealed: undefined });
        return;
      }
      // In parts, never joined: the ciphertext of a chunk is one buffer of its own, transferred to
      // the main thread and written into the pack as it is (no copy of the chunk's size anywhere).
      const parts = sealParts(key, await payloadParts(chunk), blobAad('data', id));
      garbage.note(chunk.length); // compressed copies and cipher state die here
      const transfer: ArrayBuffer[] = [];
      const sealed = parts.map((part) => {
        const whole = part.byteOffset === 0 && part.buffer.byteLength === part.length && part.buffer instanceof ArrayBuffer;
        if (!whole || part.length < 4096) return new Uint8Array(part); // a copy of a small part is cheaper than a transfer
        transfer.push(part.buffer);
        return new Uint8Array(part.buffer);
      });
      await send({ type: 'chunk', task, id, rawLength: chunk.length, sealed }, transfer);
    };
    // Plain system calls: this thread is the worker's own, and async reads would queue on the
    // process's four libuv threads behind the main thread's file work (and pack fsyncs).
    //
    // The bytes are read into one buffer each worker keeps (a max-size chunk plus one read): the
    // current chunk is [start, end) of it, cut where the chunker finds a boundary, and what is
    // left is moved to the front before a read would not fit. No buffer is allocated per read or
    // per chunk (the chunks' ciphertext aside): fresh ones piled up as garbage faster than a
    // thread collects it, tens of MiB per worker with big files. End of file is checked with a
    // read into a buffer of its own, as the file may have grown.
    work ??= Buffer.allocUnsafe(data.chunker.maxSize + READ_SIZE);
    let read = 0;
    let start = 0;
    let end = 0;
    for (;;) {
      const want = Math.min(READ_SIZE, size - read);
      if (want === 0) {
        read += readSync(fd, probe, 0, 1, read); // 1 if it grew: fails below as changed
        break;
      }
      if (end + want > work.length) {
        work.copyWithin(0, start, end);
        end -= start;
        start = 0;
      }
      const bytesRead = readSync(fd, work, end, want, read);
      if (bytesRead === 0) break;
      read += bytesRead;
      end += bytesRead;
      for (let cut = chunker.cut(work.subarray(start, end)); cut !== undefined; cut = chunker.cut(work.subarray(start, end))) {
        await emit(work.subarray(start, start + cut));
        start += cut;
      }
    }
    if (end > start) await emit(work.subarray(start, end));
    if (read !== size) throw Object.assign(new Error(`a file of ${size} bytes changed size while it was read (${read} bytes)`), { code: 'ECHANGED' });
    await send({ type: 'done', task, bytesRead: read });
  };

  const next = (): void => {
    if (active !== undefined) return;
    const job = queue.shift();
    if (!job) return;
    active = job.task;
    processFile(job.task, job.fd, job.size)
      .catch((error: unknown) => send({ type: 'error', task: job.task, message: (error as Error).message, code: (error as NodeJS.ErrnoException).code }))
      .finally(() => {
        cancelled.delete(job.task);
        active = undefined;
        next();
      });
  };

  /**
   * Pack files stay open between blobs (most consecutive blobs share a pack). Reads and writes
   * here are synchronous: a worker is its own thread, and Node's async file calls would all queue
   * on the process's four libuv threads, behind the main thread's own file work.
   */
  const packs = new Map<string, number>();
  const packFd = (path: string): number => {
    const open = packs.get(path);
    if (open !== undefined) {
      packs.delete(path);
      packs.set(path, open); // most recently used last
      return open;
    }
    const fd = openSync(path, 'r');
    packs.set(path, fd);
    if (packs.size > 8) {
      const [oldest, oldFd] = packs.entries().next().value as [string, number];
      packs.delete(oldest);
      closeSync(oldFd);
    }
    return fd;
  };

  /**
   * Download buffers of a restore's 'fetch'es, reused by them and by the 'load's of its write pass
   * (thousands of ranges and blobs of a few MiB). A backup never fetches, so its loads (parent
   * trees) allocate as before and nothing is held between them.
   */
  const spare: Buffer[] = [];
  const takeSpare = (length: number): Buffer | undefined => {
    const index = spare.findIndex((b) => b.length >= length);
    return index >= 0 ? spare.splice(index, 1)[0] : undefined;
  };

  /** Reads, authenticates, decompresses and checks one blob (restore and verification). */
  const load = async (m: Extract<WorkerRequest, { type: 'load' }>): Promise<void> => {
    const reused = takeSpare(m.length);
    try {
      const what = `pack ${m.packPath.slice(-64, -52)} blob ${m.id.slice(0, 12)}`;
      // The plaintext never shares memory with it (deciphering makes a buffer of its own).
      const sealed = reused ? reused.subarray(0, m.length) : Buffer.allocUnsafe(m.length);
      const fd = packFd(m.packPath);
      let read = 0;
      while (read < m.length) {
        const bytesRead = readSync(fd, sealed, read, m.length - read, m.offset + read);
        if (bytesRead === 0) break;
        read += bytesRead;
      }
      if (read !== m.length) throw new CorruptArchiveError(`pack ${m.packPath.slice(-64, -52)} is truncated (blob ${m.id.slice(0, 12)})`);
      const plain = await unpackPayload(openSealed(key, sealed, blobAad(m.blobType, m.id), what), m.rawLength);
      if (m.hash && createHash('sha256').update(plain).digest('hex') !== m.id) throw new CorruptArchiveError(`${what}: content does not match its id`);
      if (plain.length !== m.rawLength) throw new CorruptArchiveError(`${what}: wrong length`);
      if (m.to.kind === 'file') {
        let written = 0;
        while (written < plain.length) written += writeSync(m.to.fd, plain, written, plain.length - written, m.to.position + written);
        port.postMessage({ type: 'blob', task: m.task, data: undefined } satisfies WorkerReply);
      } else if (m.to.kind === 'discard') {
        port.postMessage({ type: 'blob', task: m.task, data: undefined } satisfies WorkerReply);
      } else {
        const copy = new Uint8Array(plain);
        port.postMessage({ type: 'blob', task: m.task, data: copy } satisfies WorkerReply, [copy.buffer]);
      }
    } catch (error) {
      port.postMessage({
        type: 'error',
        task: m.task,
        message: (error as Error).message,
        code: (error as NodeJS.ErrnoException).code,
        corrupt: error instanceof CorruptArchiveError,
      } satisfies WorkerReply);
    } finally {
      if (reused) spare.push(reused);
    }
  };

  /** Made on the first 'fetch' (a backup never loads node:http here). */
  let getter: Promise<SignedGetter> | undefined;
  const keptFiles = new Map<string, number>();
  const keptFd = (path: string): number => {
    let fd = keptFiles.get(path);
    if (fd === undefined) {
      for (const old of keptFiles.values()) closeSync(old); // one kept file at a time: an older one is gone
      keptFiles.clear();
      fd = openSync(path, 'r+');
      keptFiles.set(path, fd);
    }
    return fd;
  };

  /** Downloads a range, keeps it, authenticates its blobs (see the 'fetch' request). */
  const fetchRange = async (m: Extract<WorkerRequest, { type: 'fetch' }>): Promise<void> => {
    const given = m.data ? Buffer.from(m.data) : undefined;
    const buffer = given ?? takeSpare(m.length) ?? Buffer.allocUnsafe(Math.max(m.length, 4 << 20));
    try {
      const bytes = buffer.subarray(0, m.length);
      if (!given) {
        if (!m.request) throw new Error('fetch without a request or bytes');
        getter ??= import('../backend/signed-get.js').then(({ SignedGetter }) => new SignedGetter());
        await (await getter).get(m.request, bytes);
      }
      let kept = false;
      if (m.keep) {
        try {
          const fd = keptFd(m.keep.path);
          let written = 0;
          while (written < bytes.length) written += writeSync(fd, bytes, written, bytes.length - written, m.keep.position + written);
          kept = true;
        } catch {
          // A full disk: the range is not kept (the write pass reads it from the remote again).
        }
      }
      const damaged: { index: number; message: string }[] = [];
      for (const [i, blob] of m.blobs.entries()) {
        try {
          if (blob.start < 0 || blob.start + blob.length > bytes.length) throw new CorruptArchiveError(`blob ${blob.id.slice(0, 12)} lies outside the range read`);
          const what = `blob ${blob.id.slice(0, 12)}`;
          const plain = await unpackPayload(openSealed(key, bytes.subarray(blob.start, blob.start + blob.length), blobAad(blob.blobType, blob.id), what), blob.rawLength);
          if (plain.length !== blob.rawLength) throw new CorruptArchiveError(`${what}: wrong length`);
          for (const dest of blob.dests ?? []) {
            let written = 0;
            while (written < plain.length) written += writeSync(dest.fd, plain, written, plain.length - written, dest.position + written);
          }
        } catch (error) {
          if (!(error instanceof CorruptArchiveError)) throw error;
          damaged.push({ index: i, message: error.message });
        }
      }
      port.postMessage({ type: 'fetched', task: m.task, damaged, kept } satisfies WorkerReply);
    } catch (error) {
      port.postMessage({ type: 'error', task: m.task, message: (error as Error).message, code: (error as NodeJS.ErrnoException).code } satisfies WorkerReply);
    } finally {
      if (!given && spare.length < 4) spare.push(buffer);
    }
  };

  /** Hashes, compresses and seals a batch of small blobs (a message per blob would cost more than the work). */
  const sealBatch = async (m: Extract<WorkerRequest, { type: 'seal' }>): Promise<void> => {
    try {
      const data = Buffer.from(m.data);
      const ids: string[] = [];
      const parts: Buffer[] = [];
      let offset = 0;
      for (const length of m.lengths) {
        const blob = data.subarray(offset, offset + length);
        offset += length;
        const id = createHash('sha256').update(blob).digest('hex');
        ids.push(id);
        parts.push(seal(key, await packPayload(blob), blobAad('data', id)));
      }
      const sealed = Buffer.concat(parts);
      const out = sealed.byteOffset === 0 && sealed.buffer.byteLength === sealed.length && sealed.buffer instanceof ArrayBuffer ? sealed.buffer : new Uint8Array(sealed).buffer;
      port.postMessage({ type: 'sealed', task: m.task, ids, sealed: out, sealedLengths: parts.map((p) => p.length) } satisfies WorkerReply, [out]);
    } catch (error) {
      port.postMessage({ type: 'error', task: m.task, message: (error as Error).message, code: (error as NodeJS.ErrnoException).code } satisfies WorkerReply);
    }
  };

  /** Whether an existing file holds the chunks a restore would write (restore reusing unchanged files). */
  const compare = (m: Extract<WorkerRequest, { type: 'compare' }>): void => {
    let buffer: Buffer | undefined;
    try {
      const longest = m.ranges.reduce((n, r) => Math.max(n, r.length), 0);
      buffer = takeSpare(longest) ?? Buffer.allocUnsafe(longest);
      let same = true;
      for (const range of m.ranges) {
        const part = buffer.subarray(0, range.length);
        let got = 0;
        while (got < range.length) {
          const n = readSync(m.fd, part, got, range.length - got, range.offset + got);
          if (n === 0) break;
          got += n;
        }
        if (got !== range.length) same = false;
        else if (range.id.startsWith('zero:')) same = isAllZero(part);
        else same = createHash('sha256').update(part).digest('hex') === range.id;
        if (!same) break;
      }
      port.postMessage({ type: 'compared', task: m.task, same } satisfies WorkerReply);
    } catch (error) {
      port.postMessage({ type: 'error', task: m.task, message: (error as Error).message, code: (error as NodeJS.ErrnoException).code } satisfies WorkerReply);
    } finally {
      if (buffer && spare.length < 4) spare.push(buffer);
    }
  };

  port.on('message', (message: WorkerRequest) => {
    if (message.type === 'compare') {
      compare(message);
      return;
    }
    if (message.type === 'load') {
      void load(message);
      return;
    }
    if (message.type === 'seal') {
      void sealBatch(message);
      return;
    }
    if (message.type === 'fetch') {
      void fetchRange(message);
      return;
    }
    if (message.type === 'close-files') {
      for (const fd of [...packs.values(), ...keptFiles.values()]) closeSync(fd);
      packs.clear();
      keptFiles.clear();
      port.postMessage({ type: 'closed', task: message.task } satisfies WorkerReply);
      return;
    }
    if (message.type === 'ack') {
      unackedBytes -= unackedSizes.shift() ?? 0;
      const w = wake;
      wake = undefined;
      w?.();
      return;
    }
    if (message.type === 'cancel') {
      // A task still queued is answered at once (its descriptor is not read at all).
      const queued = queue.findIndex((job) => job.task === message.task);
      if (queued >= 0) {
        queue.splice(queued, 1);
        port.postMessage({ type: 'error', task: message.task, message: 'cancelled', code: 'ECANCELED' } satisfies WorkerReply);
      } else if (message.task === active) cancelled.add(message.task);
      return;
    }
    queue.push({ task: message.task, fd: message.fd, size: message.size });
    next();
  });
  port.postMessage({ type: 'ready', task: 0 } satisfies WorkerReply);
}
