/** All-zero detection for chunks (holes of sparse files are recorded, never stored). */
const ZEROS = Buffer.alloc(64 * 1024);

export function isAllZero(data: Buffer): boolean {
  // Compare in 64 KiB steps against a zero buffer: native memcmp, not a byte loop.
  for (let off = 0; off < data.length; off += ZEROS.length) {
    const part = data.subarray(off, off + ZEROS.length);
    if (!part.equals(ZEROS.subarray(0, part.length))) return false;
  }
  return true;
}
