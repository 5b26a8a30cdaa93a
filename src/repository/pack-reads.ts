/**
 * Reading many blobs from a remote repository by pack, not by blob (restic's restorer reads a
 * pack's needed blobs as one range): a restore's verification pass asks for every data blob of a
 * snapshot, and one request per blob leaves the process waiting on round trips most of the time.
 *
 * - `planPackReads` groups blobs by pack and merges the ranges of a pack whose gaps are small (a
 *   gap is downloaded and thrown away, cheaper than another round trip) into reads of a bounded
 *   length (each read is held in memory once, until it is on this machine's disk).
 * - `PackReader` takes blob ids as a tree walk meets them, plans a window of them at a time,
 *   runs a few reads at once (S3: that many connections; SFTP: pipelined over the one session)
 *   and authenticates every blob of a read as soon as it arrived, while the next reads are in
 *   flight. Through the local cache's kept reads (backend/cache.ts, `keepReads`) a read lands in a
 *   file on this machine and its blobs are authenticated there by the worker pool; the restore's
 *   write pass then reads them from that file (`loadKeptBlob`), again on the workers. Without
 *   kept reads (no cache, or no room) the blobs are authenticated here, from memory.
 *
 * Where the backend signs requests another thread can make (S3: `Backend.signedLoad`), a read
 * goes to the worker pool whole: a worker downloads the range into a buffer it reuses, writes it
 * into the kept reads and authenticates its blobs there, so the main thread never receives the
 * bytes (it did, at about 170 MB/s, a quarter of its time spent collecting download buffers). A
 * download that fails there is made again here, through the backend (whose retry layer reports
 * and repeats it); after a few such failures and no success, reads stay here.
 *
 * Memory is bounded by the reads in flight (`concurrency` × `maxLength`) and the window's list of
 * blob locations, whatever the size of the snapshot.
 */
import { localCopiesOf } from '../backend/cache.js';
import { CorruptArchiveError } from '../errors.js';
import type { BlobLocation } from './blob-index.js';
import type { BlobDestination } from './blob-worker.js';
import type { ChunkPool } from './chunk-pool.js';
import type { Repository } from './repository.js';
import { Slots } from './slots.js';

/** One ranged read of a pack and the blobs it holds. */
export interface PackRead {
  pack: string;
  offset: number;
  length: number;
  blobs: { id: string; where: BlobLocation }[];
}

export interface PackReadPlan {
  /** Bytes between two needed blobs of a pack read (and discarded) rather than asked for apart. */
  maxGap: number;
  /** The longest read (a blob longer than this is a read of its own). */
  maxLength: number;
}

export const DEFAULT_PLAN: PackReadPlan = { maxGap: 512 << 10, maxLength: 4 << 20 };

/**
 * The reads that fetch `blobs`: grouped by pack (packs in the order the blobs first name them),
 * each pack's blobs by offset, neighbours merged while the gap between them is at most `maxGap`
 * and the read at most `maxLength` long. A blob named twice is read once.
 */
export function planPackReads(blobs: Iterable<{ id: string; where: BlobLocation }>, plan: PackReadPlan = DEFAULT_PLAN): PackRead[] {
  const byPack = new Map<string, { id: string; where: BlobLocation }[]>();
  const seen = new Set<string>();
  for (const blob of blobs) {
    if (seen.has(blob.id)) continue;
    seen.add(blob.id);
    const list = byPack.get(blob.where.pack);
    if (list) list.push(blob);
    else byPack.set(blob.where.pack, [blob]);
  }
  const reads: PackRead[] = [];
  for (const [pack, list] of byPack) {
    list.sort((a, b) => a.where.offset - b.where.offset);
    let current: PackRead | undefined;
    for (const blob of list) {
      const { offset, length } = blob.where;
      const end = current ? current.offset + current.length : 0;
      if (current && offset - end <= plan.maxGap && Math.max(end, offset + length) - current.offset <= plan.maxLength) {
        current.length = Math.max(end, offset + length) - current.offset;
        current.blobs.push(blob);
      } else {
        current = { pack, offset, length, blobs: [blob] };
        reads.push(current);
      }
    }
  }
  return reads;
}

export interface PackReaderOptions {
  /** Authenticates blobs of kept reads on these workers (else on this thread). */
  pool?: ChunkPool | undefined;
  /** Reads in flight at once (default 5, restic's connections to S3). */
  concurrency?: number;
  /** Blobs planned together (default 4096), and their sealed bytes at most (default 256 MiB). */
  windowBlobs?: number;
  windowBytes?: number;
  plan?: PackReadPlan;
  signal?: AbortSignal | undefined;
  /** Told of each blob authenticated, with its sealed length. */
  onBlob?: (id: string, sealedLength: number) => void;
}

/**
 * Authenticates data blobs of a remote repository by pack reads (see the file header): `add` each
 * id (it waits while the reads in flight are many), then `finish`. The first failure (damage, a
 * missing pack, a read that failed after its retries) is thrown by the next `add` or by `finish`.
 */
export class PackReader {
  private window: { id: string; where: BlobLocation }[] = [];
  private windowBytes = 0;
  private readonly reads: Slots;
  /** Blob checks on the workers (each holds about one blob on a worker while it runs). */
  private readonly checks = new Slots(32);
  private readonly plan: PackReadPlan;
  /** Downloads on the workers: how many succeeded and failed (they stop after failures without a success). */
  private workerReads = 0;
  private workerFailures = 0;

  constructor(
    private readonly repo: Repository,
    private readonly options: PackReaderOptions = {},
  ) {
    this.reads = new Slots(Math.max(1, options.concurrency ?? 5));
    this.plan = options.plan ?? DEFAULT_PLAN;
  }

  async add(id: string): Promise<void> {
    const where = this.repo.location(id);
    if (!where) throw new CorruptArchiveError(`blob ${id.slice(0, 12)} is missing from the index`);
    if (this.reads.failure) throw this.reads.failure;
    if (this.checks.failure) throw this.checks.failure;
    this.window.push({ id, where });
    this.windowBytes += where.length;
    if (this.window.length >= (this.options.windowBlobs ?? 4096) || this.windowBytes >= (this.options.windowBytes ?? 256 << 20)) await this.flush();
  }

  async finish(): Promise<void> {
    try {
      await this.flush();
    } finally {
      await Promise.allSettled([this.reads.drain(), this.checks.drain()]);
    }
    await this.reads.drain();
    await this.checks.drain();
  }

  private async flush(): Promise<void> {
    const reads = planPackReads(this.window, this.plan);
    this.window = [];
    this.windowBytes = 0;
    for (const read of reads) {
      this.options.signal?.throwIfAborted();
      await this.reads.admit();
      if (this.checks.failure) throw this.checks.failure;
      void this.reads.track(this.read(read));
    }
  }

  private async read(read: PackRead): Promise<void> {
    if (await this.readOnWorker(read)) return;
    const bytes = await this.repo.backend.load('data', read.pack, { offset: read.offset, length: read.length });
    const cache = localCopiesOf(this.repo.backend);
    const pool = this.options.pool;
    for (const { id, where } of read.blobs) {
      const start = where.offset - read.offset;
      if (start + where.length > bytes.length) throw new CorruptArchiveError(`pack ${read.pack.slice(0, 12)} is truncated (blob ${id.slice(0, 12)})`);
      const kept = pool ? cache?.keptAt(read.pack, where) : undefined;
      if (pool && kept) {
        await this.checks.admit();
        void this.checks.track(this.checkKept(id, where, pool, kept));
      } else {
        // From memory, on this thread (unpacking waits for zstd, so reads go on meanwhile).
        await this.repo.openBlob(id, where, bytes.subarray(start, start + where.length), false);
        this.options.onBlob?.(id, where.length);
      }
    }
  }

  /**
   * Downloads and authenticates `read` on a worker (see the file header); false when that cannot
   * be done (no pool, no cache, no signed request, or the download failed), for `read` to do it here.
   */
  private async readOnWorker(read: PackRead): Promise<boolean> {
    const pool = this.options.pool;
    const cache = localCopiesOf(this.repo.backend);
    if (!pool || !cache || (this.workerFailures >= 3 && this.workerReads === 0)) return false;
    const range = { offset: read.offset, length: read.length };
    let request;
    try {
      request = await cache.signedLoad('data', read.pack, range);
    } catch {
      this.workerFailures++; // no credentials for it, no region: `load` will say so
      return false;
    }
    if (!request) return false;
    const room = cache.reserveKept(read.pack, range);
    const blobs = read.blobs.map(({ id, where }) => ({ id, blobType: where.type, start: where.offset - read.offset, length: where.length, rawLength: where.rawLength }));
    let fetched: { damaged: { index: number }[]; kept: boolean };
    try {
      fetched = await pool.fetchBlobs(request, read.length, room && { path: room.path, position: room.position }, blobs);
    } catch (error) {
      if (error instanceof CorruptArchiveError) throw error;
      this.workerFailures++;
      return false;
    }
    this.workerReads++;
    if (fetched.kept) room?.arrived();
    const damaged = fetched.damaged;
    if (damaged.length > 0) {
      // Damaged on the way or on the remote: forget the copy, let the remote decide (read here).
      await cache.forget('data', read.pack);
      for (const { index } of damaged) await this.repo.checkBlob(read.blobs[index]!.id, pool);
    }
    for (const { id, where } of read.blobs) this.options.onBlob?.(id, where.length);
    return true;
  }

  private async checkKept(id: string, where: BlobLocation, pool: ChunkPool, kept: { path: string; position: number }): Promise<void> {
    try {
      await pool.loadBlob(kept.path, id, { ...where, offset: kept.position }, false, { kind: 'discard' });
    } catch (error) {
      if (!(error instanceof CorruptArchiveError)) throw error;
      // The copy on this machine is damaged, or the remote's: drop the copy, let the remote decide.
      await localCopiesOf(this.repo.backend)?.forget('data', where.pack);
      await this.repo.checkBlob(id, pool);
    }
    this.options.onBlob?.(id, where.length);
  }
}

/**
 * Reads blob `id` from the kept reads of a restore (what `PackReader` downloaded) on a worker of
 * `pool`, delivered as `to` says; `undefined` when it is not kept (the caller reads it as usual).
 * A kept copy that fails authentication is dropped and the blob read from the remote.
 */
export async function loadKeptBlob(repo: Repository, pool: ChunkPool | undefined, id: string, to: BlobDestination): Promise<{ data: Buffer | undefined } | undefined> {
  const cache = pool ? localCopiesOf(repo.backend) : undefined;
  const where = cache ? repo.location(id) : undefined;
  const kept = where ? cache?.keptAt(where.pack, where) : undefined;
  if (!pool || !cache || !where || !kept) return undefined;
  try {
    return { data: await pool.loadBlob(kept.path, id, { ...where, offset: kept.position }, false, to) };
  } catch (error) {
    if (!(error instanceof CorruptArchiveError)) throw error;
    await cache.forget('data', where.pack);
    return undefined;
  }
}
