/**
 * A pool of blob workers (blob-worker.ts), one per core. `processFile` hands a file to the least
 * busy worker and calls `onChunk` for each chunk, in order, acknowledging each one after
 * `onChunk` resolves (the worker's flow control).
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { ChunkerParams } from './chunker.js';
import type { BlobDestination, WorkerReply, WorkerRequest } from './blob-worker.js';
import { CorruptArchiveError } from '../errors.js';

export type ChunkHandler = (chunk: { id: string; rawLength: number; sealed: Buffer | undefined }) => Promise<void>;

interface LoadTask {
  resolve: (data: Buffer | undefined) => void;
  reject: (error: Error) => void;
  slot: { load: number };
}

interface Task {
  worker: Worker;
  onChunk: ChunkHandler;
  chain: Promise<void>;
  resolve: (bytesRead: number) => void;
  reject: (error: Error) => void;
  failed: boolean;
}

export class ChunkPool {
  private readonly workers: { worker: Worker; load: number }[] = [];
  private readonly tasks = new Map<number, Task>();
  private readonly loads = new Map<number, LoadTask>();
  private nextTask = 1;

  constructor(key: Buffer, chunker: ChunkerParams, size = Math.max(1, availableParallelism())) {
    for (let i = 0; i < size; i++) {
      const worker = new Worker(new URL('./blob-worker.js', import.meta.url), { workerData: { key: new Uint8Array(key), chunker } });
      worker.on('message', (reply: WorkerReply) => this.onReply(worker, reply));
      worker.on('error', (error) => this.failWorker(worker, error));
      this.workers.push({ worker, load: 0 });
    }
  }

  get size(): number {
    return this.workers.length;
  }

  processFile(path: Buffer, size: number, onChunk: ChunkHandler): Promise<number> {
    const slot = this.workers.reduce((a, b) => (b.load < a.load ? b : a));
    slot.load++;
    const task = this.nextTask++;
    return new Promise<number>((resolve, reject) => {
      this.tasks.set(task, {
        worker: slot.worker,
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
        failed: false,
      });
      slot.worker.postMessage({ type: 'file', task, path: new Uint8Array(path), size } satisfies WorkerRequest);
    });
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
    const slot = this.workers.reduce((a, b) => (b.load < a.load ? b : a));
    slot.load++;
    const task = this.nextTask++;
    return new Promise<Buffer | undefined>((resolve, reject) => {
      this.loads.set(task, { resolve, reject, slot });
      slot.worker.postMessage({ type: 'load', task, packPath, id, blobType: where.type, offset: where.offset, length: where.length, rawLength: where.rawLength, hash, to } satisfies WorkerRequest);
    });
  }

  private onReply(worker: Worker, reply: WorkerReply): void {
    const load = this.loads.get(reply.task);
    if (load) {
      this.loads.delete(reply.task);
      load.slot.load--;
      if (reply.type === 'blob') load.resolve(reply.data && Buffer.from(reply.data.buffer, reply.data.byteOffset, reply.data.byteLength));
      else if (reply.type === 'error') load.reject(reply.corrupt ? new CorruptArchiveError(reply.message) : Object.assign(new Error(reply.message), { code: reply.code }));
      return;
    }
    const task = this.tasks.get(reply.task);
    if (!task) return;
    if (reply.type === 'chunk') {
      task.chain = task.chain.then(async () => {
        if (!task.failed) {
          await task.onChunk({ id: reply.id, rawLength: reply.rawLength, sealed: reply.sealed ? Buffer.from(reply.sealed.buffer, reply.sealed.byteOffset, reply.sealed.byteLength) : undefined });
        }
        worker.postMessage({ type: 'ack', task: reply.task } satisfies WorkerRequest);
      });
      task.chain.catch((error: unknown) => {
        task.failed = true;
        worker.postMessage({ type: 'ack', task: reply.task } satisfies WorkerRequest);
        this.finish(reply.task, error as Error);
      });
      return;
    }
    if (reply.type === 'done') {
      void task.chain.then(() => this.finish(reply.task, undefined, reply.bytesRead), () => undefined);
      return;
    }
    if (reply.type === 'error') this.finish(reply.task, Object.assign(new Error(reply.message), { code: reply.code }));
  }

  private finish(taskId: number, error: Error | undefined, bytesRead = 0): void {
    const task = this.tasks.get(taskId);
    if (!task) return;
    this.tasks.delete(taskId);
    if (error) task.reject(error);
    else task.resolve(bytesRead);
  }

  private failWorker(worker: Worker, error: Error): void {
    for (const [id, task] of this.tasks) if (task.worker === worker) this.finish(id, error);
    for (const [id, load] of this.loads) {
      this.loads.delete(id);
      load.reject(error);
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.worker.terminate()));
  }
}
