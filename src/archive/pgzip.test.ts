import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { gunzipSync } from 'node:zlib';
import { ParallelGzip, type ParallelGzipOptions } from './pgzip.js';

async function compress(input: Buffer, options: ParallelGzipOptions, pieces = 7): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const step = Math.max(1, Math.ceil(input.length / pieces));
  for (let i = 0; i < input.length; i += step) chunks.push(input.subarray(i, i + step));
  const out: Buffer[] = [];
  await pipeline(Readable.from(chunks), new ParallelGzip(options), new Writable({ write: (c: Buffer, _e, cb) => (out.push(c), cb()) }));
  return Buffer.concat(out);
}

/** Deterministic pseudo-random generator so a failing case can be replayed. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

void describe('ParallelGzip', () => {
  void it('round-trips any input through gunzip (property: 40 random cases)', async () => {
    const rnd = prng(42);
    for (let i = 0; i < 40; i++) {
      const size = Math.floor(rnd() * 300000);
      const text = rnd() < 0.5;
      const input = text ? Buffer.from('row,'.repeat(size / 4 + 1)).subarray(0, size) : randomBytes(size);
      const options = { blockSize: 1 + Math.floor(rnd() * 70000), concurrency: 1 + Math.floor(rnd() * 4), level: 1 + Math.floor(rnd() * 9) };
      const gz = await compress(input, options, 1 + Math.floor(rnd() * 20));
      assert.ok(gunzipSync(gz).equals(input), `case ${i}: ${JSON.stringify({ size, text, ...options })}`);
    }
  });

  void it('writes members that gzip itself reads as one stream', async () => {
    const input = Buffer.concat([randomBytes(3 << 20), Buffer.alloc(2 << 20, 'a')]);
    const gz = await compress(input, { blockSize: 1 << 20 });
    const out = execFileSync('gzip', ['-dc'], { input: gz, maxBuffer: 1 << 26 });
    assert.ok(out.equals(input));
  });

  void it('stores incompressible media instead of deflating it, and notices compressible data again', async () => {
    const media = randomBytes(40 << 20);
    const gz = await compress(media, { blockSize: 1 << 20, concurrency: 1 });
    assert.ok(gz.length < media.length * 1.001, `${gz.length} vs ${media.length}`);
    const mixed = Buffer.concat([media.subarray(0, 20 << 20), Buffer.alloc(40 << 20, 'x')]);
    const gz2 = await compress(mixed, { blockSize: 1 << 20, concurrency: 1 });
    assert.ok(gz2.length < (21 << 20) + (17 << 20) / 10, `compressible tail was compressed: ${gz2.length}`);
  });
});
