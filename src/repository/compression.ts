/**
 * zstd for repository blobs: Node's own zstd where the runtime has it (22.15+, 24), else a
 * WebAssembly build of the reference library (Node 20). Both write standard zstd frames, so a
 * repository written under one runtime reads under the other.
 *
 * Incompressible chunks (camera images, video) are stored as they are: an 8 KiB sample decides,
 * with the same test the archive compressor uses.
 */
import * as zlib from 'node:zlib';
import { looksCompressible } from '../archive/pgzip.js';
import { GarbageHint } from './gc-hint.js';

type Codec = { compress(data: Buffer): Buffer; decompress(data: Buffer, rawLength: number): Buffer };

interface NativeZstd {
  zstdCompressSync: (data: Buffer, options: { params: Record<number, number> }) => Buffer;
  zstdDecompressSync: (data: Buffer) => Buffer;
  constants: { ZSTD_c_compressionLevel: number };
}

let codec: Promise<Codec> | undefined;

/** What one call of Node's zstd holds until collected, at least (measured: 0.3 to 1 MiB). */
const CALL_COST = 512 << 10;

function loadCodec(): Promise<Codec> {
  const native = zlib as unknown as Partial<NativeZstd>;
  if (typeof native.zstdCompressSync === 'function' && typeof native.zstdDecompressSync === 'function') {
    const { zstdCompressSync, zstdDecompressSync } = native as NativeZstd;
    const level = (native as NativeZstd).constants.ZSTD_c_compressionLevel;
    // Node 22 frees a zstd call's native context (megabytes) only when the garbage collector
    // finds its small JavaScript handle, which it has no reason to look for soon: 300 MB of
    // database pages left 500 MB resident. A scavenge every few MiB frees them (gc-hint.ts).
    // A call counts as at least CALL_COST bytes, as each holds a context however small its
    // input: counted by input alone, a database's small files (8 KiB pages, sealed in batches)
    // left hundreds of contexts between two scavenges, 45 MiB resident.
    // Node 24 frees some of them only in a full collection (4000 pages of 8 KiB on the main
    // thread: 40 MiB resident with scavenges alone, 11 MiB with a full collection every 8 calls).
    // One every 16 MiB of input (a few ms on a worker's small heap) took a first backup's peak
    // from 179-182 MiB to 173-174 MiB in alternating runs.
    const garbage = new GarbageHint(4 << 20);
    const major = new GarbageHint(16 << 20, 'major');
    return Promise.resolve({
      compress: (data) => {
        const out = zstdCompressSync(data, { params: { [level]: 3 } });
        garbage.note(Math.max(data.length, CALL_COST));
        major.note(data.length);
        return out;
      },
      decompress: (data) => {
        const out = zstdDecompressSync(data);
        garbage.note(Math.max(out.length, CALL_COST));
        major.note(out.length);
        return out;
      },
    });
  }
  // Loaded only where it is used: on Node 22 the module alone is 12 MiB resident, in each thread.
  return import('@bokuweb/zstd-wasm').then(async (wasm) => {
    await wasm.init();
    return {
      compress: (data) => {
        const out = wasm.compress(data, 3); // a copy out of the WebAssembly heap already: wrapped, not copied again
        return Buffer.from(out.buffer, out.byteOffset, out.byteLength);
      },
      decompress: (data, rawLength) => Buffer.from(wasm.decompress(data, { defaultHeapSize: rawLength + 1024 })),
    };
  });
}

export function zstd(): Promise<Codec> {
  codec ??= loadCodec();
  return codec;
}

export const STORED = 0;
export const ZSTD = 1;

const STORED_BYTE = Buffer.from([STORED]);
const ZSTD_BYTE = Buffer.from([ZSTD]);

/** A framed blob as two parts, not joined: one byte (0 stored, 1 zstd), then the payload. */
export async function payloadParts(data: Buffer): Promise<[Buffer, Buffer]> {
  // An 8 KiB sample: enough to tell camera images and video from database pages, at a quarter
  // of the cost (a wrong "compressible" only costs a zstd attempt; the result is kept if smaller).
  if (data.length >= 512 && looksCompressible(data, 8 * 1024)) {
    const compressed = (await zstd()).compress(data);
    if (compressed.length < data.length) return [ZSTD_BYTE, compressed];
  }
  return [STORED_BYTE, data];
}

/** Frames a blob: one byte (0 stored, 1 zstd) then the payload. */
export async function packPayload(data: Buffer): Promise<Buffer> {
  return Buffer.concat(await payloadParts(data));
}

export async function unpackPayload(framed: Buffer, rawLength: number): Promise<Buffer> {
  if (framed[0] === STORED) return framed.subarray(1);
  if (framed[0] === ZSTD) return (await zstd()).decompress(framed.subarray(1), rawLength);
  throw new Error(`unknown blob compression ${framed[0]}`);
}
