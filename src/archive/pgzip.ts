/**
 * Parallel gzip: the input is cut into fixed-size blocks, each compressed as an independent gzip
 * member on libuv's thread pool, and the members are written in input order. RFC 1952 allows a
 * file to be a concatenation of members, and gzip, GNU tar -z, BusyBox tar and Node's zlib all
 * read such files as one stream — so archives stay readable by the guide's `tar -xzvf`.
 *
 * Media (JPEG, PNG, MP4) does not compress. Deflating it costs most of a backup's CPU and saves
 * nothing, so the compressor adapts: once a block shrinks by less than 3 %, the following blocks
 * are stored (deflate level 0, still valid gzip) and every 16th block is compressed again as a
 * probe, so a switch back to compressible data (a database folder after the media) is noticed.
 *
 * Memory: at most `concurrency + 1` blocks in flight.
 */
import { Transform, type TransformCallback } from 'node:stream';
import { availableParallelism } from 'node:os';
import { gzip, constants, type ZlibOptions } from 'node:zlib';
import { promisify } from 'node:util';

const gzipAsync = promisify<Buffer, ZlibOptions, Buffer>(gzip);

export interface ParallelGzipOptions {
  /** 1..9; default 3 (deflate's fast strategy, near level 6 on text and database pages). */
  level?: number;
  blockSize?: number;
  concurrency?: number;
}

const STORE_THRESHOLD = 0.97;
const PROBE_EVERY = 16;

export class ParallelGzip extends Transform {
  private readonly level: number;
  private readonly blockSize: number;
  private readonly concurrency: number;
  private pending: Buffer[] = [];
  private pendingLength = 0;
  private inFlight: Promise<Buffer>[] = [];
  private storing = false;
  private sinceProbe = 0;
  /** Uncompressed bytes seen so far. */
  bytesIn = 0;

  constructor(options: ParallelGzipOptions = {}) {
    super({ highWaterMark: 1 << 20 });
    this.level = options.level ?? 3;
    this.blockSize = options.blockSize ?? 1 << 20;
    this.concurrency = options.concurrency ?? Math.max(2, availableParallelism());
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.bytesIn += chunk.length;
    this.pending.push(chunk);
    this.pendingLength += chunk.length;
    this.pump(false).then(() => callback(), callback);
  }

  override _flush(callback: TransformCallback): void {
    this.pump(true)
      .then(async () => {
        while (this.inFlight.length > 0) this.push(await this.inFlight.shift()!);
      })
      .then(() => callback(), callback);
  }

  private async pump(final: boolean): Promise<void> {
    while (this.pendingLength >= this.blockSize || (final && this.pendingLength > 0)) {
      const all = Buffer.concat(this.pending, this.pendingLength);
      const block = all.subarray(0, Math.min(this.blockSize, all.length));
      const rest = all.subarray(block.length);
      this.pending = rest.length > 0 ? [rest] : [];
      this.pendingLength = rest.length;
      this.inFlight.push(this.compress(block));
      // Keep order: wait for the oldest member once the pipeline is full.
      while (this.inFlight.length > this.concurrency) this.push(await this.inFlight.shift()!);
    }
  }

  private compress(block: Buffer): Promise<Buffer> {
    const probe = !this.storing || ++this.sinceProbe >= PROBE_EVERY;
    if (!probe) return gzipAsync(block, { level: constants.Z_NO_COMPRESSION });
    this.sinceProbe = 0;
    return gzipAsync(block, { level: this.level, memLevel: 9 }).then((out) => {
      // Decided on completion order, which may lag by a few blocks: harmless, it is a heuristic.
      this.storing = out.length > block.length * STORE_THRESHOLD;
      return out;
    });
  }
}
