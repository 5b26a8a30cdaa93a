/**
 * Parallel gzip: the input is cut into fixed-size blocks, each compressed as an independent gzip
 * member on libuv's thread pool, and the members are written in input order. RFC 1952 allows a
 * file to be a concatenation of members, and gzip, GNU tar -z, BusyBox tar and Node's zlib all
 * read such files as one stream — so archives stay readable by the guide's `tar -xzvf`.
 *
 * Media (JPEG, PNG, MP4) does not compress. Deflating it costs most of a backup's CPU and saves
 * nothing, so each block is judged first by deflating a 32 KiB sample from its middle at level 1
 * (about 3 % of the block's work): a sample that shrinks by less than 3 % means the block is
 * stored (deflate level 0, still valid gzip); otherwise it is compressed at the chosen level.
 * The decision is per block, so a database folder right after the media is compressed again.
 *
 * Memory: at most `concurrency + 1` blocks in flight.
 */
import { Transform, type TransformCallback } from 'node:stream';
import { availableParallelism } from 'node:os';
import { deflateRawSync, gzip, constants, type ZlibOptions } from 'node:zlib';
import { promisify } from 'node:util';

const gzipAsync = promisify<Buffer, ZlibOptions, Buffer>(gzip);

export interface ParallelGzipOptions {
  /** 1..9; default 3 (deflate's fast strategy, near level 6 on text and database pages). */
  level?: number;
  blockSize?: number;
  concurrency?: number;
}

const STORE_THRESHOLD = 0.97;
const SAMPLE = 32 * 1024;

/** Whether deflate would save anything on this block, judged on a sample of `sampleSize` bytes from its middle. */
export function looksCompressible(block: Buffer, sampleSize = SAMPLE): boolean {
  if (block.length <= sampleSize) return true;
  const start = Math.floor((block.length - sampleSize) / 2);
  const sample = block.subarray(start, start + sampleSize);
  return deflateRawSync(sample, { level: 1 }).length < sampleSize * STORE_THRESHOLD;
}

export class ParallelGzip extends Transform {
  private readonly level: number;
  private readonly blockSize: number;
  private readonly concurrency: number;
  private pending: Buffer[] = [];
  private pendingLength = 0;
  private inFlight: Promise<Buffer>[] = [];
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
    const level = looksCompressible(block) ? this.level : constants.Z_NO_COMPRESSION;
    return gzipAsync(block, { level, memLevel: 9 });
  }
}
