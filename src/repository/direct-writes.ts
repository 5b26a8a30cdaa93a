/**
 * One pass from a remote repository into files (restic's restorer): the writes of a restore are
 * collected in a window (the files a tree walk opened, and where each of their chunks goes), the
 * window's blobs are planned as pack reads (pack-reads.ts: one ranged read per pack, near blobs
 * merged), and each read goes to a blob worker with the destinations of its blobs. The worker
 * downloads the range (S3: the signed GET itself; otherwise the bytes read here are handed over
 * without a copy), authenticates and decompresses each blob, and writes the plaintext into its
 * files at their offsets. Nothing is kept on this machine's disk, nothing is decrypted twice.
 *
 * A blob found damaged in a download is read again through the backend, blob by blob (the remote
 * decides: its damage fails the restore); a download that fails on a worker is made again here,
 * through the backend's retries, and after a few such failures without a success the workers are
 * not asked to download any more.
 *
 * Memory is bounded by the reads in flight (`concurrency` × the plan's `maxLength`) and the window
 * (`maxFiles` files, `maxBytes` of their blobs), whatever the size of the snapshot.
 */
import { CorruptArchiveError } from '../errors.js';
import type { BlobLocation } from './blob-index.js';
import type { ChunkPool } from './chunk-pool.js';
import type { FetchedBlob } from './blob-worker.js';
import { DEFAULT_PLAN, planPackReads, type PackRead, type PackReadPlan } from './pack-reads.js';
import type { Repository } from './repository.js';
import { Slots } from './slots.js';

interface Destination {
  fd: number;
  position: number;
  resolve: () => void;
  reject: (error: Error) => void;
}

export interface DirectWriterOptions {
  signal?: AbortSignal | undefined;
  /** Reads in flight at once (default 5, restic's connections to S3). */
  concurrency?: number;
  plan?: PackReadPlan;
  /** A window is sent once it holds this many files (default 32; keep it below the walk's open files). */
  maxFiles?: number;
  /** ... or this many bytes of sealed blobs (default 16 MiB). */
  maxBytes?: number;
}

export class DirectWriter {
  private window = new Map<string, { where: BlobLocation; dests: Destination[] }>();
  private windowBytes = 0;
  private readonly windowFiles = new Set<number>();
  private readonly reads: Slots;
  private workerReads = 0;
  private workerFailures = 0;

  constructor(
    private readonly repo: Repository,
    private readonly pool: ChunkPool,
    private readonly options: DirectWriterOptions = {},
  ) {
    this.reads = new Slots(Math.max(1, options.concurrency ?? 5));
  }

  /**
   * Blob `id` is to be written into the open file `fd` at `position`: settles once it is (the
   * file must stay open until then), or with the failure that stopped it.
   */
  add(id: string, fd: number, position: number): Promise<void> {
    if (this.reads.failure) return Promise.reject(this.reads.failure);
    const where = this.repo.location(id);
    if (!where) return Promise.reject(new CorruptArchiveError(`blob ${id.slice(0, 12)} is missing from the index`));
    let entry = this.window.get(id);
    if (!entry) {
      entry = { where, dests: [] };
      this.window.set(id, entry);
      this.windowBytes += where.length;
    }
    this.windowFiles.add(fd);
    const dests = entry.dests;
    const written = new Promise<void>((resolve, reject) => dests.push({ fd, position, resolve, reject }));
    written.catch(() => undefined); // the walk may stop before it waits for this one
    return written;
  }

  /** Sends the window when it is full (waits while the reads in flight are many). */
  async flushIfFull(): Promise<void> {
    if (this.windowFiles.size >= (this.options.maxFiles ?? 32) || this.windowBytes >= (this.options.maxBytes ?? 16 << 20)) await this.flush();
  }

  /** Sends the window's reads (waiting while the reads in flight are many); their writes settle later. */
  async flush(): Promise<void> {
    const window = this.window;
    this.window = new Map();
    this.windowBytes = 0;
    this.windowFiles.clear();
    const reads = planPackReads(
      [...window].map(([id, { where }]) => ({ id, where })),
      this.options.plan ?? DEFAULT_PLAN,
    );
    for (const [i, read] of reads.entries()) {
      try {
        this.options.signal?.throwIfAborted();
        await this.reads.admit();
      } catch (error) {
        // Nothing more goes out: what waits for the reads not sent fails with the same cause.
        for (const rest of reads.slice(i)) fail(rest, window, error);
        throw error;
      }
      void this.reads.track(this.read(read, window));
    }
  }

  /** Sends what is left and waits for every write; throws the first failure. */
  async finish(): Promise<void> {
    try {
      await this.flush();
    } finally {
      await Promise.allSettled([this.reads.drain()]);
    }
    await this.reads.drain();
  }

  /** After a failure: the writes not sent fail with it, and no read is still running when this returns. */
  async abandon(error: unknown): Promise<void> {
    const window = this.window;
    this.window = new Map();
    this.windowBytes = 0;
    this.windowFiles.clear();
    const cause = error instanceof Error ? error : new Error(String(error));
    for (const { dests } of window.values()) for (const d of dests) d.reject(cause);
    await Promise.allSettled([this.reads.drain()]);
  }

  private async read(read: PackRead, window: Map<string, { where: BlobLocation; dests: Destination[] }>): Promise<void> {
    try {
      const blobs: FetchedBlob[] = read.blobs.map(({ id, where }) => ({
        id,
        blobType: where.type,
        start: where.offset - read.offset,
        length: where.length,
        rawLength: where.rawLength,
        dests: window.get(id)!.dests.map(({ fd, position }) => ({ fd, position })),
      }));
      const range = { offset: read.offset, length: read.length };
      let result = await this.onWorker(read, blobs);
      if (!result) {
        // Read once: each blob goes straight into its files, so no copy is kept for a second read.
        const bytes = await this.repo.backend.load('data', read.pack, range, { once: true });
        if (bytes.length !== read.length) throw new CorruptArchiveError(`pack ${read.pack.slice(0, 12)} is truncated (a read of ${read.length} bytes gave ${bytes.length})`);
        result = await this.pool.fetchBlobs(bytes, read.length, undefined, blobs);
      }
      const damaged = new Set(result.damaged.map((d) => d.index));
      for (const [i, { id }] of read.blobs.entries()) {
        const dests = window.get(id)!.dests;
        if (damaged.has(i)) {
          // Damaged on the way or on the remote: read it again through the backend (it decides).
          for (const d of dests) await this.repo.writeBlobTo(id, this.pool, d.fd, d.position);
        }
        for (const d of dests) d.resolve();
      }
    } catch (error) {
      fail(read, window, error);
      throw error;
    }
  }

  /** Downloads and writes `read` on a worker with a signed request; undefined when it cannot (then it is read here). */
  private async onWorker(read: PackRead, blobs: FetchedBlob[]): Promise<{ damaged: { index: number }[] } | undefined> {
    const backend = this.repo.backend;
    if (!backend.signedLoad || (this.workerFailures >= 3 && this.workerReads === 0)) return undefined;
    let request;
    try {
      request = await backend.signedLoad('data', read.pack, { offset: read.offset, length: read.length });
    } catch {
      this.workerFailures++; // no credentials for it, no region: `load` will say so
      return undefined;
    }
    if (!request) return undefined;
    try {
      const result = await this.pool.fetchBlobs(request, read.length, undefined, blobs);
      this.workerReads++;
      return result;
    } catch (error) {
      if (error instanceof CorruptArchiveError) throw error;
      this.workerFailures++;
      return undefined;
    }
  }
}

function fail(read: PackRead, window: Map<string, { dests: Destination[] }>, error: unknown): void {
  const cause = error instanceof Error ? error : new Error(String(error));
  for (const { id } of read.blobs) for (const d of window.get(id)?.dests ?? []) d.reject(cause);
}
