/**
 * A pool of blob workers (blob-worker.ts), one per core. `processFd` hands an open file to the
 * least busy worker and calls `onChunk` for each chunk, in order, acknowledging each one after
 * `onChunk` resolves (the worker's flow control).
 *
 * Descriptors: the caller opens the file and closes it; the promise `processFd` returns settles
 * only once the worker no longer reads that descriptor (it answered 'done' or 'error', or its
 * thread has ended), so closing it then can never let a worker read a reused descriptor number.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { ChunkerParams } from './chunker.js';
import type { BlobDestination, FetchedBlob, WorkerReply, WorkerRequest } from './blob-worker.js';
import type { SignedRequest } from '../backend/backend.js';
import { CorruptArchiveError } from '../errors.js';
import { restoreHeapHold } from './gc-hint.js';

/** A chunk a worker cut: its id, and its sealed bytes in parts (undefined for a hole). */
export type ChunkHandler = (chunk: { id: string; rawLength: number; sealed: Buffer[] | undefined }) => Promise<void>;

interface WorkerSlot {
  worker: Worker;
  load: number;
  /** Resolves once the thread is set up (or has ended). */
  ready: Promise<void>;
  /** Set once the thread has ended: nothing more is sent to it. */
  ended: boolean;
  error?: Error;
}

/** A request answered by one reply (a blob load, a batch to seal). */
interface OneReplyTask {
  /** Called with the reply ('error' included). */
  settle: (reply: WorkerReply) => void;
  reject: (error: Error) => void;
  slot: WorkerSlot;
}

/** What sealSmall gives back: each blob's id, and its sealed bytes (views into one buffer). */
export interface SealedBatch {
  ids: string[];
  sealed: Buffer[];
}

interface Task {
  slot: WorkerSlot;
  onChunk: ChunkHandler;
  chain: Promise<void>;
  resolve: (bytesRead: number) => void;
  reject: (error: Error) => void;
  /** The first failure on this side (a chunk handler, an abort): the task ends with it. */
  failure: Error | undefined;
  /** Looked at as each chunk arrives (no listener per task: many files are in flight). */
  signal: AbortSignal | undefined;
}

function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}

/** Workers for a backup: one per core but one, for the main thread's own share of the work. */
export function backupPoolSize(): number {
  return Math.max(1, availableParallelism() - 1);
}

export class ChunkPool {
  private readonly workers: WorkerSlot[] = [];
  private readonly tasks = new Map<number, Task>();
  private readonly loads = new Map<number, OneReplyTask>();
  private nextTask = 1;

  constructor(key: Buffer, chunker: ChunkerParams, size = Math.max(1, availableParallelism())) {
    for (let i = 0; i < size; i++) {
      // A worker allocates few JavaScript objects (its bytes live in buffers): a small young
      // generation is enough, and each megabyte reserved there is a megabyte of resident memory.
      const worker = new Worker(new URL('./blob-worker.js', import.meta.url), {
        workerData: { key: new Uint8Array(key), chunker },
        resourceLimits: { maxYoungGenerationSizeMb: 4 },
      });
      let setUp = (): void => undefined;
      const slot: WorkerSlot = { worker, load: 0, ended: false, ready: new Promise<void>((resolve) => (setUp = resolve)) };
      worker.once('exit', () => setUp());
      worker.on('message', (reply: WorkerReply) => {
        if (reply.type !== 'ready') return this.onReply(slot, reply);
        // Starting the thread (and the V8 flag it sets) reset V8's run-time flags.
        restoreHeapHold();
        setUp();
      });
      worker.on('error', (error) => (slot.error ??= error));
      // Tasks fail only once the thread has really ended: until then it may still read their files.
      worker.on('exit', (code) => this.failWorker(slot, slot.error ?? new Error(`a blob worker stopped (exit code ${code})`)));
      this.workers.push(slot);
    }
  }

  get size(): number {
    return this.workers.length;
  }

  /**
   * Resolves once every thread is set up. Starting one resets V8's flags set at run time, the
   * main thread's small heap among them (gc-hint.ts): a caller that allocates much
   * on the main thread waits for this before it starts, so that its young generation never grows.
   */
  async ready(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.ready));
  }

  /** The least busy worker still running; throws if none is left. */
  private pick(): WorkerSlot {
    const live = this.workers.filter((w) => !w.ended);
    if (live.length === 0) throw this.workers.find((w) => w.error)?.error ?? new Error('the blob workers have stopped');
    return live.reduce((a, b) => (b.load < a.load ? b : a));
  }

  /**
   * Chunks, hashes, compresses and seals the open file `fd` (`size` bytes expected) on a worker.
   * Resolves with the bytes read; rejects with code ECHANGED if the size was not `size`, with the
   * handler's error if `onChunk` failed, or with the abort reason. Settles only once the worker
   * is done with `fd`; the caller closes it.
   */
  processFd(fd: number, size: number, onChunk: ChunkHandler, signal?: AbortSignal): Promise<number> {
    let slot: WorkerSlot;
    try {
      signal?.throwIfAborted();
      slot = this.pick();
    } catch (error) {
      return Promise.reject(asError(error));
    }
    slot.load++;
    const taskId = this.nextTask++;
    return new Promise<number>((resolve, reject) => {
      this.tasks.set(taskId, {
        slot,
        onChunk,
        chain: Promise.resolve(),
        resolve: (n) => {
          slot.load--;
          resolve(n);
        },
        reject: (e) => {
          slot.load--;
          reject(e);
        },
        failure: undefined,
        signal,
      });
      slot.worker.postMessage({ type: 'file', task: taskId, fd, size } satisfies WorkerRequest);
    });
  }

  /** Gives up on a task: its worker stops reading at the next chunk and answers; the task then fails with `error`. */
  private cancel(taskId: number, error: Error): void {
    const task = this.tasks.get(taskId);
    if (!task || task.failure) return;
    task.failure = error;
    if (!task.slot.ended) task.slot.worker.postMessage({ type: 'cancel', task: taskId } satisfies WorkerRequest);
  }

  /**
   * Reads, authenticates and checks one blob on a worker; returns its bytes when `to` is
   * 'reply', else nothing (discarded after the check, or written into the file `to` names).
   */
  loadBlob(
    packPath: string,
    id: string,
    where: { type: string; offset: number; length: number; rawLength: number },
    hash: boolean,
    to: BlobDestination = { kind: 'reply' },
  ): Promise<Buffer | undefined> {
    return this.oneReply(
      (task) => ({ type: 'load', task, packPath, id, blobType: where.type, offset: where.offset, length: where.length, rawLength: where.rawLength, hash, to }),
      [],
      (reply) => (reply.type === 'blob' ? reply.data && Buffer.from(reply.data.buffer, reply.data.byteOffset, reply.data.byteLength) : undefined),
    );
  }

  /**
   * Downloads a range of a pack on a worker with the signed request `source` (`length` bytes), or
   * takes its bytes read here (`source` a Buffer: unusable here afterwards), writes it at `keep` (a
   * kept reads file) when given, and authenticates `blobs` in it there, writing the plaintext of
   * those with `dests` into their files.
   * Resolves with the blobs (indexes into `blobs`) that failed authentication and whether the
   * bytes were written at `keep`; rejects when the download failed (the caller loads the range
   * through its backend instead).
   */
  fetchBlobs(
    source: SignedRequest | Buffer,
    length: number,
    keep: { path: string; position: number } | undefined,
    blobs: FetchedBlob[],
  ): Promise<{ damaged: { index: number; message: string }[]; kept: boolean }> {
    // Bytes read here go to the worker without a copy when they own their memory.
    const data = Buffer.isBuffer(source) ? ownedArrayBuffer(source) : undefined;
    return this.oneReply(
      (task) => ({ type: 'fetch', task, request: Buffer.isBuffer(source) ? undefined : source, ...(data ? { data } : {}), length, keep, blobs }),
      data ? [data] : [],
      (reply) => (reply.type === 'fetched' ? { damaged: reply.damaged, kept: reply.kept } : { damaged: [], kept: false }),
    );
  }

  /**
   * Hashes, compresses and seals small blobs (whole small files) on a worker: `data` holds them
   * back to back, `lengths` says where each ends. `data` must own its whole ArrayBuffer: it is
   * transferred, not copied (unusable here afterwards).
   */
  sealSmall(data: Buffer, lengths: number[]): Promise<SealedBatch> {
    const buffer = data.buffer;
    if (data.byteOffset !== 0 || data.length !== buffer.byteLength || !(buffer instanceof ArrayBuffer)) {
      return Promise.reject(new Error('sealSmall needs a buffer that owns its memory'));
    }
    return this.oneReply(
      (task) => ({ type: 'seal', task, data: buffer, lengths }),
      [buffer],
      (reply) => {
        if (reply.type !== 'sealed') return { ids: [], sealed: [] };
        const all = Buffer.from(reply.sealed);
        let offset = 0;
        const sealed = reply.sealedLengths.map((length) => all.subarray(offset, (offset += length)));
        return { ids: reply.ids, sealed };
      },
    );
  }

  /**
   * Whether the open file `fd` holds, at each range, the chunk `id` names (its SHA-256, or zeros
   * for `zero:`), read and hashed on a worker. `fd` must stay open until this settles.
   */
  compareRanges(fd: number, ranges: { offset: number; length: number; id: string }[]): Promise<boolean> {
    return this.oneReply(
      (task) => ({ type: 'compare', task, fd, ranges }),
      [],
      (reply) => reply.type === 'compared' && reply.same,
    );
  }

  /**
   * Closes the files the workers keep open between reads (packs, kept reads), on every worker: a
   * restore calls it once it has written everything, so that deleting its kept reads frees them
   * (an open file's dirty pages would go to disk with the volumes' sync).
   */
  async closeFiles(): Promise<void> {
    await Promise.all(this.workers.filter((w) => !w.ended).map((slot) => this.oneReply((task) => ({ type: 'close-files', task }), [], () => undefined, slot)));
  }

  private oneReply<T>(request: (task: number) => WorkerRequest, transfer: ArrayBuffer[], result: (reply: WorkerReply) => T, on?: WorkerSlot): Promise<T> {
    let slot: WorkerSlot;
    try {
      slot = on ?? this.pick();
    } catch (error) {
      return Promise.reject(asError(error));
    }
    slot.load++;
    const task = this.nextTask++;
    return new Promise<T>((resolve, reject) => {
      this.loads.set(task, {
        settle: (reply) => {
          if (reply.type === 'error') reject(reply.corrupt ? new CorruptArchiveError(reply.message) : Object.assign(new Error(reply.message), { code: reply.code }));
          else resolve(result(reply));
        },
        reject,
        slot,
      });
      slot.worker.postMessage(request(task), transfer);
    });
  }

  private onReply(slot: WorkerSlot, reply: WorkerReply): void {
    const load = this.loads.get(reply.task);
    if (load) {
      this.loads.delete(reply.task);
      load.slot.load--;
      load.settle(reply);
      return;
    }
    const task = this.tasks.get(reply.task);
    if (!task) return;
    if (reply.type === 'chunk') {
      // Every chunk is acknowledged, also after a failure, so the worker never waits forever.
      const taskId = reply.task;
      const chunk = { id: reply.id, rawLength: reply.rawLength, sealed: reply.sealed?.map((part) => Buffer.from(part.buffer, part.byteOffset, part.byteLength)) };
      task.chain = task.chain.then(async () => {
        try {
          if (task.signal?.aborted) this.cancel(taskId, asError(task.signal.reason));
          if (!task.failure) await task.onChunk(chunk);
        } catch (error) {
          this.cancel(taskId, error as Error);
        }
        if (!slot.ended) slot.worker.postMessage({ type: 'ack', task: taskId } satisfies WorkerRequest);
      });
      return;
    }
    // The worker is done with the descriptor; settle after the chunks before it were handled.
    if (reply.type === 'done') {
      void task.chain.then(() => this.finish(reply.task, task.failure, reply.bytesRead));
      return;
    }
    if (reply.type === 'error') {
      const error = Object.assign(new Error(reply.message), { code: reply.code });
      void task.chain.then(() => this.finish(reply.task, task.failure ?? error));
    }
  }

  private finish(taskId: number, error: Error | undefined, bytesRead = 0): void {
    const task = this.tasks.get(taskId);
    if (!task) return;
    this.tasks.delete(taskId);
    if (error) task.reject(error);
    else task.resolve(bytesRead);
  }

  /** The thread has ended: its tasks fail (their descriptors are no longer read), and it gets no more work. */
  private failWorker(slot: WorkerSlot, error: Error): void {
    slot.ended = true;
    for (const [id, task] of this.tasks) {
      if (task.slot === slot) void task.chain.then(() => this.finish(id, task.failure ?? error));
    }
    for (const [id, load] of this.loads) {
      if (load.slot !== slot) continue;
      this.loads.delete(id);
      load.slot.load--;
      load.reject(error);
    }
  }

  /** Ends the threads; any task still running fails once its thread has ended. */
  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.worker.terminate()));
  }
}

/** `bytes` as an ArrayBuffer of its own (to transfer): its own memory when it owns it whole, else a copy. */
function ownedArrayBuffer(bytes: Buffer): ArrayBuffer {
  const buffer = bytes.buffer;
  if (bytes.byteOffset === 0 && bytes.length === buffer.byteLength && buffer instanceof ArrayBuffer) return buffer;
  const copy = new ArrayBuffer(bytes.length);
  new Uint8Array(copy).set(bytes);
  return copy;
}
