/**
 * Durable file writes: data goes to a hidden `.partial` file, is fsynced, renamed into place and
 * the directory fsynced, so a crash leaves either the old state or the complete new file.
 */
import { createWriteStream } from 'node:fs';
import { open, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { Transform, type TransformCallback, type Writable } from 'node:stream';
import { createHash, type Hash } from 'node:crypto';

export function partialPath(finalPath: string): string {
  return join(dirname(finalPath), `.${basename(finalPath)}.partial`);
}

export async function fsyncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * An exclusive, durable file: write `stream`, then `commit()` (fsync, rename into place, fsync the
 * folder) or `abort()`. The stream closes its own descriptor (pipeline waits for 'close'); commit
 * fsyncs through a second descriptor, which on Linux flushes the same inode.
 */
export class DurableFile {
  private constructor(
    readonly finalPath: string,
    readonly stream: Writable,
  ) {}

  static async create(finalPath: string): Promise<DurableFile> {
    const stream = createWriteStream(partialPath(finalPath), { flags: 'wx', mode: 0o600, highWaterMark: 1 << 20 });
    await new Promise<void>((resolve, reject) => {
      stream.once('open', () => resolve());
      stream.once('error', reject);
    });
    return new DurableFile(finalPath, stream);
  }

  async commit(): Promise<void> {
    const handle = await open(partialPath(this.finalPath), 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(partialPath(this.finalPath), this.finalPath);
    await fsyncDirectory(dirname(this.finalPath));
  }

  async abort(): Promise<void> {
    this.stream.destroy();
    await rm(partialPath(this.finalPath), { force: true });
  }
}

export async function writeFileDurably(finalPath: string, content: string | Buffer): Promise<void> {
  const file = await DurableFile.create(finalPath);
  try {
    await new Promise<void>((resolve, reject) => {
      file.stream.once('error', reject);
      file.stream.once('close', () => resolve());
      file.stream.end(content);
    });
    await file.commit();
  } catch (error) {
    await file.abort();
    throw error;
  }
}

/** Pass-through that hashes (SHA-256) and counts what flows through it. */
export class HashingCounter extends Transform {
  private readonly hash: Hash = createHash('sha256');
  bytes = 0;

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    callback(null, chunk);
  }

  digest(): string {
    return this.hash.digest('hex');
  }
}
