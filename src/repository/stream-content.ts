/**
 * A byte stream (a database dump) stored like a file's content: cut by the repository's
 * content-defined chunker, each chunk stored once (so yesterday's dump shares most chunks with
 * today's), and read back in order as a stream.
 */
import { Readable } from 'node:stream';
import { Chunker } from './chunker.js';
import type { ChunkPool } from './chunk-pool.js';
import type { Repository } from './repository.js';
import { BlobPrefetcher } from './restorer.js';
import { isZeroChunk, zeroChunkLength, ZERO_PREFIX } from './tree.js';
import { isAllZero } from './zero.js';

export interface StoredStream {
  content: string[];
  size: number;
  bytesAdded: number;
}

export async function storeStream(repo: Repository, source: AsyncIterable<Buffer>, options: { signal?: AbortSignal; onProgress?: (bytes: number) => void } = {}): Promise<StoredStream> {
  const chunker = new Chunker(repo.config.chunker);
  const result: StoredStream = { content: [], size: 0, bytesAdded: 0 };
  const store = async (chunk: Buffer): Promise<void> => {
    if (isAllZero(chunk)) {
      result.content.push(`${ZERO_PREFIX}${chunk.length}`);
      return;
    }
    const saved = await repo.saveBlob('data', chunk);
    result.bytesAdded += saved.added;
    result.content.push(saved.id);
  };
  for await (const piece of source) {
    options.signal?.throwIfAborted();
    result.size += piece.length;
    for (const chunk of chunker.push(piece)) await store(chunk);
    options.onProgress?.(result.size);
  }
  for (const chunk of chunker.finish()) await store(chunk);
  return result;
}

/** The stored bytes in order, read (and authenticated) a few chunks ahead. */
export function contentStream(repo: Repository, content: string[], pool?: ChunkPool, signal?: AbortSignal): Readable {
  const blobs = new BlobPrefetcher(repo, content.filter((ref) => !isZeroChunk(ref)), pool, 4);
  async function* chunks(): AsyncGenerator<Buffer> {
    for (const ref of content) {
      signal?.throwIfAborted();
      yield isZeroChunk(ref) ? Buffer.alloc(zeroChunkLength(ref)) : await blobs.take();
    }
  }
  return Readable.from(chunks(), { objectMode: false });
}
