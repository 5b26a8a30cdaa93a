/** Reading a range of a file on this machine (local backend, cache, spool). */
import type { FileHandle } from 'node:fs/promises';

/** Up to `length` bytes from `offset` (fewer at the end of the file). */
export async function readRange(handle: FileHandle, offset: number, length: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  let read = 0;
  while (read < length) {
    const { bytesRead } = await handle.read(buffer, read, length - read, offset + read);
    if (bytesRead === 0) break;
    read += bytesRead;
  }
  return buffer.subarray(0, read);
}
