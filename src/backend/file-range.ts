/** Reading a range of a file and writing parts to one, on this machine (local backend, cache, spool). */
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

/**
 * Writes the parts in order with writev, up to 1024 at a time (a pack of tiny blobs has thousands
 * of parts: one write call each would cost more than the data). A short write continues where it
 * stopped.
 */
export async function writeParts(handle: FileHandle, parts: Buffer[], at?: number): Promise<void> {
  let position = at;
  for (let first = 0; first < parts.length; first += 1024) {
    let batch = parts.slice(first, first + 1024);
    while (batch.length > 0) {
      const total = batch.reduce((sum, b) => sum + b.length, 0);
      let { bytesWritten } = await handle.writev(batch, position);
      if (position !== undefined) position += bytesWritten;
      if (bytesWritten === total) break;
      const rest: Buffer[] = [];
      for (const b of batch) {
        if (bytesWritten >= b.length) bytesWritten -= b.length;
        else {
          rest.push(b.subarray(bytesWritten));
          bytesWritten = 0;
        }
      }
      batch = rest;
    }
  }
}
