/**
 * Small files sealed on the worker threads, a batch at a time.
 *
 * A small file (one chunk) is read on the main thread with plain system calls (see archiver.ts),
 * but hashing, compressing and sealing it costs that thread more than reading it, while the
 * workers have nothing to do in a folder of small files. So the bytes of up to BATCH_FILES files
 * go to a worker in one transferred buffer, and the sealed blobs come back in one. A message per
 * file would cost more than the work; a batch too small to pay for its round trip is sealed here.
 */
import type { ChunkPool } from './chunk-pool.js';

const BATCH_FILES = 32;
const BATCH_BYTES = 256 * 1024;
/** Batches out at once: enough to keep two workers busy, few enough to bound memory. */
const IN_FLIGHT = 4;
/** A last batch smaller than this is sealed on this thread: the round trip would cost more. */
const WORTH_SENDING = 8;

export interface SmallBlobStore {
  /** Stores a blob a worker sealed (deduplicated by the repository). */
  storeSealed: (id: string, sealed: Buffer, rawLength: number) => Promise<void>;
  /** Hashes, compresses, seals and stores a blob on this thread; returns its id. */
  storeHere: (data: Buffer) => Promise<string>;
}

export class SmallBlobBatches {
  private parts: Buffer[] = [];
  private targets: ((id: string) => void)[] = [];
  private bytes = 0;
  private readonly inFlight = new Set<Promise<void>>();
  private failure: { error: unknown } | undefined;

  constructor(
    private readonly pool: ChunkPool,
    private readonly store: SmallBlobStore,
  ) {}

  /** Queues `data` (not all zero); `onId` is called with its blob id once it is stored. */
  async add(data: Buffer, onId: (id: string) => void): Promise<void> {
    this.parts.push(data);
    this.targets.push(onId);
    this.bytes += data.length;
    if (this.parts.length >= BATCH_FILES || this.bytes >= BATCH_BYTES) await this.send();
  }

  /** Stores everything queued and waits until every batch is stored; throws the first failure. */
  async drain(): Promise<void> {
    if (this.parts.length >= WORTH_SENDING) await this.send();
    else await this.storeQueuedHere();
    while (this.inFlight.size > 0) await Promise.race(this.inFlight);
    this.throwFailure();
  }

  private throwFailure(): void {
    if (this.failure) throw this.failure.error;
  }

  private async storeQueuedHere(): Promise<void> {
    const { parts, targets } = this.take();
    for (const [i, part] of parts.entries()) targets[i]!(await this.store.storeHere(part));
  }

  private take(): { parts: Buffer[]; targets: ((id: string) => void)[] } {
    const taken = { parts: this.parts, targets: this.targets };
    this.parts = [];
    this.targets = [];
    this.bytes = 0;
    return taken;
  }

  private async send(): Promise<void> {
    while (this.inFlight.size >= IN_FLIGHT) await Promise.race(this.inFlight);
    this.throwFailure();
    const { parts, targets } = this.take();
    if (parts.length === 0) return;
    const lengths = parts.map((p) => p.length);
    // One buffer that owns its memory, so it can be transferred to the worker.
    const data = Buffer.allocUnsafeSlow(lengths.reduce((a, b) => a + b, 0));
    let offset = 0;
    for (const part of parts) offset += part.copy(data, offset);
    const batch = this.pool
      .sealSmall(data, lengths)
      .then(async ({ ids, sealed }) => {
        for (const [i, id] of ids.entries()) {
          await this.store.storeSealed(id, sealed[i]!, lengths[i]!);
          targets[i]!(id);
        }
      })
      .catch((error: unknown) => void (this.failure ??= { error }))
      .finally(() => this.inFlight.delete(batch));
    this.inFlight.add(batch);
  }
}
