/**
 * Durable file writes: data goes to a hidden `.partial` file, is fsynced, renamed into place and
 * the directory fsynced, so a crash leaves either the old state or the complete new file.
 */
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
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

/** An exclusive, durable file: `stream` to write, then `commit()` or `abort()`. */
export class DurableFile {
  private constructor(
    readonly finalPath: string,
    private readonly handle: FileHandle,
    readonly stream: Writable,
  ) {}

  static async create(finalPath: string): Promise<DurableFile> {
    const handle = await open(partialPath(finalPath), 'wx', 0o600);
    const stream = handle.createWriteStream({ autoClose: false, highWaterMark: 1 << 20 });
    return new DurableFile(finalPath, handle, stream);
  }

  async commit(): Promise<void> {
    await this.handle.sync();
    await this.handle.close();
    await rename(partialPath(this.finalPath), this.finalPath);
    await fsyncDirectory(dirname(this.finalPath));
  }

  async abort(): Promise<void> {
    await this.handle.close().catch(() => undefined);
    await rm(partialPath(this.finalPath), { force: true });
  }
}

export async function writeFileDurably(finalPath: string, content: string | Buffer): Promise<void> {
  const file = await DurableFile.create(finalPath);
  try {
    await new Promise<void>((resolve, reject) => {
      file.stream.once('error', reject);
      file.stream.end(content, () => resolve());
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
