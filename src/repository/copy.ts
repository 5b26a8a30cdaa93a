/**
 * `copy`: snapshots from one repository into another (restic's copy), e.g. from a local
 * repository for fast restores to a remote one off the host. Both may live on any backend.
 *
 * The two repositories have different master keys, so nothing is copied as stored: every blob the
 * target lacks is read from the source, authenticated with the source's key, decompressed and
 * hashed (its plaintext must hash to its id: verified on arrival), then sealed with the target's
 * key and packed. Its compressed form is reused; files are not cut again, so blob ids (and with
 * them tree and snapshot contents) stay the same. Whether later backups into the target
 * deduplicate against the copied chunks depends on the chunker parameters: a target made with
 * `init --from-repo SOURCE --copy-chunker-params` cuts files exactly like the source.
 *
 * What is copied:
 * - Snapshots the target already holds are skipped. Snapshot ids differ between repositories (a
 *   snapshot is named by the hash of its sealed bytes), so "already holds" compares content: every
 *   field but `parent` (a copy points at the parent's copy when the target has one) and `original`
 *   (the id in the repository the snapshot was first written to, recorded in every copy).
 * - Every tree of a snapshot is walked, even one the target has: a tree in the target proves
 *   nothing about its chunks (prune may have removed the chunks of an unused tree and kept the
 *   tree in a pack it did not rewrite). A tree walked completely in this run is not walked again.
 * - Each blob the target does not have is copied; the others cost one index lookup.
 *
 * Memory: blob by blob through the target's packer; at most `readAhead` blobs are read ahead from
 * the source, and one tree per folder level is held while its folder is walked. Never a whole
 * snapshot's data.
 *
 * Crash safety: a snapshot is written only after every pack its blobs went into is durable, named
 * by an index file, and read back (the index file and each pack's header, compared entry by
 * entry): a copy killed at any point leaves the target consistent (at worst packs no snapshot
 * uses, which a re-run reuses or prune removes), and running it again finishes the job.
 *
 * Damage: a source snapshot that cannot be read, or one of whose trees or blobs is missing or
 * fails to authenticate, is skipped and named in the result; the other snapshots are copied.
 * Problems of the target (a write that fails, a pack that does not read back) stop the copy.
 */
import { CorruptArchiveError, UsageError } from '../errors.js';
import type { BlobForCopy, Repository } from './repository.js';
import { findSnapshot, readSnapshots, shortId, type DamagedSnapshot, type StoredSnapshot } from './snapshots.js';
import { isZeroChunk, zeroChunkLength, type Snapshot } from './tree.js';
import { TreeWalkBounds, checkTree } from './tree-guard.js';
import type { PackHeaderEntry } from './packer.js';

export interface CopyOptions {
  /** Source snapshots to copy: `latest` or id prefixes, resolved as other commands do. Default: all. */
  refs?: string[];
  /** Only this compose project's snapshots (and its `latest`). */
  project?: string | undefined;
  /** Source blobs read ahead of the packer (default 4). */
  readAhead?: number;
  signal?: AbortSignal;
  onEvent?: (event: CopyEvent) => void;
}

/** What became of one source snapshot. */
export type SnapshotOutcome =
  | { status: 'copied'; source: string; target: string; time: string; project: string; blobsCopied: number; bytesAdded: number }
  | { status: 'present'; source: string; target: string; time: string; project: string }
  | { status: 'damaged'; source: string; error: string };

export type CopyEvent =
  /** A snapshot's copy begins; `bytes` is what its volumes (and dump) hold. */
  | { type: 'snapshot-start'; snapshot: string; time: string; project: string; bytes: number }
  /**
   * The snapshot so far: file bytes gone through (copied, found in the target, holes), files
   * walked (a folder already walked in this run is not walked again) and blobs copied.
   */
  | { type: 'snapshot-progress'; snapshot: string; bytes: number; files: number; blobsCopied: number }
  | { type: 'snapshot-done'; outcome: SnapshotOutcome }
  | { type: 'warning'; message: string };

export interface CopyResult {
  /** Every source snapshot considered, oldest first. */
  snapshots: SnapshotOutcome[];
  /** Blobs sealed into the target, and their plaintext bytes. */
  blobsCopied: number;
  bytesCopied: number;
  /**
   * File bytes of the copied snapshots, chunk by chunk as their files (and dumps) list them:
   * chunks copied, chunks the target had (or that repeat), and holes.
   */
  bytesProcessed: number;
  /** Bytes written to the target: packs, and index files and snapshots. */
  bytesWritten: { packs: number; objects: number };
  /** Packs written and read back. */
  packsVerified: number;
}

interface Progress {
  bytes: number;
  files: number;
  blobsCopied: number;
}

/** Source-side damage: the snapshot being copied is skipped, the copy goes on. */
class SourceDamage extends Error {}

const EMPTY = Buffer.alloc(0);

/**
 * Copies snapshots from `source` into `target`. Both should be opened, and locked (shared) by the
 * caller; the target's lock is checked before every index file and snapshot written. Loads both
 * indexes. Throws UsageError when both are the same repository or a reference names no snapshot.
 */
export async function copySnapshots(source: Repository, target: Repository, options: CopyOptions = {}): Promise<CopyResult> {
  if (source.config.id === target.config.id) {
    throw new UsageError(`${source.backend.location} and ${target.backend.location} are the same repository (id ${source.config.id.slice(0, 10)}): nothing to copy`);
  }
  const emit = options.onEvent ?? (() => undefined);
  const signal = options.signal;

  // Snapshots before indexes, in each repository: a snapshot written meanwhile had its index
  // files written first (see check.ts).
  const listing = await readSnapshots(source);
  const inTarget = await readSnapshots(target);
  for (const d of inTarget.damaged) {
    emit({ type: 'warning', message: `target snapshot ${shortId(d.id)} cannot be read (${d.error}): a snapshot it copied is copied again; run 'cvat-backup check' on the target` });
  }
  await source.loadIndex();
  await target.loadIndex();

  const chosen = selectSnapshots(listing, source.backend.location, options, (d) =>
    emit({ type: 'warning', message: `source snapshot ${shortId(d.id)} cannot be read (${d.error}): passed over` }),
  );

  const held = new Map<string, string>(); // content → target id
  for (const t of inTarget.snapshots) held.set(snapshotContent(t), t.id);
  /** Source id → id of its copy in the target (for parents). */
  const copies = new Map<string, string>();
  for (const s of listing.snapshots) {
    const there = held.get(snapshotContent(s));
    if (there !== undefined) copies.set(s.id, there);
  }

  const copier = new BlobCopier(source, target, options.readAhead ?? 4, signal);
  const outcomes: SnapshotOutcome[] = [];
  const done = (outcome: SnapshotOutcome): void => {
    outcomes.push(outcome);
    emit({ type: 'snapshot-done', outcome });
  };

  for (const item of chosen) {
    signal?.throwIfAborted();
    if ('error' in item) {
      done({ status: 'damaged', source: item.id, error: item.error });
      continue;
    }
    const snapshot = item;
    const content = snapshotContent(snapshot);
    const there = held.get(content);
    if (there !== undefined) {
      copies.set(snapshot.id, there);
      done({ status: 'present', source: snapshot.id, target: there, time: snapshot.time, project: snapshot.project });
      continue;
    }
    const bytes = (Array.isArray(snapshot.volumes) ? snapshot.volumes.reduce((n, v) => n + (Number(v?.bytes) || 0), 0) : 0) + (Number(snapshot.database?.size) || 0);
    emit({ type: 'snapshot-start', snapshot: snapshot.id, time: snapshot.time, project: snapshot.project, bytes });
    const before = { blobs: copier.blobsCopied, bytes: copier.bytesAdded };
    try {
      await copier.copySnapshotData(snapshot, (progress) => emit({ type: 'snapshot-progress', snapshot: snapshot.id, ...progress }));
    } catch (error) {
      if (!(error instanceof SourceDamage)) throw error;
      done({ status: 'damaged', source: snapshot.id, error: error.message });
      continue;
    }
    // Every blob durable and indexed, and read back, before the snapshot that needs them.
    await target.flush();
    await copier.verifyWritten();
    const { id: _id, parent, original, ...rest } = snapshot;
    void _id;
    const parentCopy = parent === undefined ? undefined : copies.get(parent);
    const copy: Snapshot = { ...rest, ...(parentCopy !== undefined ? { parent: parentCopy } : {}), original: original ?? snapshot.id };
    const id = await target.saveObject('snapshots', copy);
    held.set(content, id);
    copies.set(snapshot.id, id);
    done({
      status: 'copied',
      source: snapshot.id,
      target: id,
      time: snapshot.time,
      project: snapshot.project,
      blobsCopied: copier.blobsCopied - before.blobs,
      bytesAdded: copier.bytesAdded - before.bytes,
    });
  }
  return {
    snapshots: outcomes,
    blobsCopied: copier.blobsCopied,
    bytesCopied: copier.bytesCopied,
    bytesProcessed: copier.bytesProcessed,
    bytesWritten: target.bytesWritten,
    packsVerified: copier.packsVerified,
  };
}

/** The snapshots to consider, oldest first: the ones `refs` name (each once), or all (of the project). */
function selectSnapshots(
  listing: Awaited<ReturnType<typeof readSnapshots>>,
  location: string,
  options: CopyOptions,
  onDamaged: (damaged: DamagedSnapshot) => void,
): (StoredSnapshot | DamagedSnapshot)[] {
  const refs = options.refs ?? [];
  if (refs.length === 0) {
    const good = options.project === undefined ? listing.snapshots : listing.snapshots.filter((s) => s.project === options.project);
    // A damaged snapshot's project is unknown: named whatever the project filter.
    return [...listing.damaged, ...good];
  }
  const picked = new Map<string, StoredSnapshot | DamagedSnapshot>();
  for (const [i, ref] of refs.entries()) {
    // `latest` passes over damaged snapshots, and names them (once).
    const found = findSnapshot(listing, ref, location, options.project, refs.indexOf('latest') === i ? onDamaged : undefined);
    picked.set(found.id, found);
  }
  const order = new Map(listing.snapshots.map((s, i) => [s.id, i]));
  return [...picked.values()].sort((a, b) => (order.get(a.id) ?? -1) - (order.get(b.id) ?? -1));
}

/**
 * A snapshot's content, as compared between repositories: every field but the id, `parent` and
 * `original`, as JSON with sorted keys (a copy may list its fields in another order).
 */
export function snapshotContent(snapshot: Snapshot): string {
  const { id: _id, parent: _parent, original: _original, ...rest } = snapshot;
  void _id;
  void _parent;
  void _original;
  return canonicalJson(rest);
}

function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value) ?? 'null';
}

/** The blob traffic of one copy run: walks snapshots' trees and moves what the target lacks. */
class BlobCopier {
  blobsCopied = 0;
  bytesCopied = 0;
  bytesAdded = 0;
  packsVerified = 0;
  bytesProcessed = 0;
  /**
   * Trees walked to the end in this run: their whole content is in the target (durable or in the
   * packer). One entry per folder, not per file.
   */
  private readonly walked = new Set<string>();
  /** Reads from the source under way, in the order their blobs go into the packer. */
  private queue: { id: string; read: Promise<BlobForCopy>; fileBytes: number }[] = [];
  private readonly queued = new Set<string>();
  private readonly verifiedIndexFiles = new Set<string>();
  private progress: Progress = { bytes: 0, files: 0, blobsCopied: 0 };
  private report: (progress: Progress) => void = () => undefined;

  constructor(
    private readonly source: Repository,
    private readonly target: Repository,
    private readonly readAhead: number,
    private readonly signal: AbortSignal | undefined,
  ) {}

  /** Copies every blob `snapshot` needs that the target lacks; SourceDamage if the source cannot give one. */
  async copySnapshotData(snapshot: StoredSnapshot, report: (progress: Progress) => void): Promise<void> {
    this.progress = { bytes: 0, files: 0, blobsCopied: 0 };
    this.report = report;
    try {
      if (!Array.isArray(snapshot.volumes)) throw new SourceDamage('the snapshot lists no volumes');
      for (const volume of snapshot.volumes) {
        const tree = (volume as { tree?: unknown } | null)?.tree;
        if (typeof tree !== 'string') throw new SourceDamage(`volume ${String(volume?.composeName)} has no tree`);
        await this.copyTree(tree, new TreeWalkBounds({ ...volume, entries: Number.MAX_SAFE_INTEGER }), volume.composeName);
      }
      const dump = snapshot.database?.content;
      if (dump !== undefined) {
        if (!Array.isArray(dump)) throw new SourceDamage('the database dump lists no chunks');
        await this.copyChunks(dump, 'the database dump');
      }
      await this.drain();
      this.bytesProcessed += this.progress.bytes;
    } catch (error) {
      // Blobs of trees already marked walked may have been in the abandoned queue: walk again.
      await this.abandonQueue();
      this.walked.clear();
      throw error;
    }
  }

  private async copyTree(id: string, bounds: TreeWalkBounds, where: string): Promise<void> {
    this.signal?.throwIfAborted();
    if (this.walked.has(id)) return;
    try {
      bounds.enter(id);
    } catch (error) {
      throw new SourceDamage(`${where}: ${(error as Error).message}`);
    }
    const blob = await this.fromSource(this.source.readBlobForCopy(id), `tree of ${where}`);
    if (blob.type !== 'tree') throw new SourceDamage(`${where}: blob ${shortId(id)} is not a tree`);
    let nodes;
    try {
      nodes = checkTree(JSON.parse(blob.plaintext.toString('utf8')), id).tree.nodes;
    } catch (error) {
      throw new SourceDamage(`tree ${shortId(id)} of ${where} cannot be read (${(error as Error).message})`);
    }
    // The tree first (in walk order, like its children): its bytes are not held while its folder is walked.
    this.store(id, Promise.resolve({ ...blob, plaintext: EMPTY }), 0);
    await this.keepReadAhead();
    for (const node of nodes) {
      const path = `${where}/${Buffer.from(node.name, 'base64').toString('utf8')}`;
      if (node.type === 'file') this.progress.files++;
      if (node.content) await this.copyChunks(node.content, path);
      if (node.subtree) await this.copyTree(node.subtree, bounds, path);
    }
    bounds.leave();
    this.walked.add(id);
  }

  private async copyChunks(refs: unknown[], where: string): Promise<void> {
    for (const ref of refs) {
      if (typeof ref !== 'string') throw new SourceDamage(`${where}: a chunk reference is not a string`);
      if (isZeroChunk(ref)) {
        this.progress.bytes += zeroChunkLength(ref) || 0;
        continue;
      }
      const location = this.source.location(ref);
      if (!location) throw new SourceDamage(`blob ${shortId(ref)} of ${where} is missing from the source's index`);
      if (location.type !== 'data') throw new SourceDamage(`blob ${shortId(ref)} of ${where} is not a data blob`);
      // The plaintext is dropped as soon as it was hashed: only the compressed form waits in the queue.
      const read = this.source.readBlobForCopy(ref).then((blob) => ({ ...blob, plaintext: EMPTY }));
      this.store(ref, this.fromSource(read, where), location.rawLength);
      await this.keepReadAhead();
    }
  }

  /**
   * Queues a blob for the packer unless the target has it (or it is queued). `fileBytes`: what it
   * adds to the snapshot's progress (a chunk's length; 0 for a tree).
   */
  private store(id: string, read: Promise<BlobForCopy>, fileBytes: number): void {
    if (this.target.has(id) || this.queued.has(id)) {
      read.catch(() => undefined);
      this.progress.bytes += fileBytes;
      this.report({ ...this.progress });
      return;
    }
    read.catch(() => undefined); // awaited in order by drainOne
    this.queue.push({ id, read, fileBytes });
    this.queued.add(id);
  }

  private async keepReadAhead(): Promise<void> {
    while (this.queue.length > this.readAhead) await this.drainOne();
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) await this.drainOne();
  }

  private async drainOne(): Promise<void> {
    this.signal?.throwIfAborted();
    const next = this.queue[0]!;
    const blob = await next.read;
    this.queue.shift();
    this.queued.delete(next.id);
    const added = await this.target.saveCopiedBlob(blob);
    if (added > 0) {
      this.blobsCopied++;
      this.bytesCopied += blob.rawLength;
      this.bytesAdded += added;
      this.progress.blobsCopied++;
    }
    this.progress.bytes += next.fileBytes;
    this.report({ ...this.progress });
  }

  /** After a failure: no read is left behind (each settles), the queue is empty. */
  private async abandonQueue(): Promise<void> {
    const left = this.queue;
    this.queue = [];
    this.queued.clear();
    await Promise.allSettled(left.map((q) => q.read));
  }

  /** A source read whose damage (or a missing pack) means: skip this snapshot. */
  private async fromSource<T>(read: Promise<T>, where: string): Promise<T> {
    try {
      return await read;
    } catch (error) {
      if (error instanceof CorruptArchiveError) throw new SourceDamage(`${where}: ${error.message}`);
      if ((error as NodeJS.ErrnoException | null)?.code === 'ENOENT') throw new SourceDamage(`${where}: a pack of the source is missing`);
      throw error;
    }
  }

  /**
   * Reads back what the target's index files written in this run say, and each pack they name:
   * the pack's own header (authenticated with the target's key) must list exactly the same blobs
   * at the same places. CorruptArchiveError otherwise (the target's storage lost or altered them).
   */
  async verifyWritten(): Promise<void> {
    for (const name of this.target.writtenIndexFiles()) {
      if (this.verifiedIndexFiles.has(name)) continue;
      this.signal?.throwIfAborted();
      const file = await this.target.readIndexFile(name);
      for (const pack of file.packs) {
        const header = await this.target.readPackHeader(pack.id);
        const key = (e: PackHeaderEntry): string => `${e.id}:${e.type}:${e.offset}:${e.length}:${e.rawLength}`;
        const written = new Set(pack.blobs.map(key));
        if (header.length !== written.size || !header.every((e) => written.has(key(e)))) {
          throw new CorruptArchiveError(`copy: pack ${shortId(pack.id)} in ${this.target.backend.location} does not read back as it was written; the copy stopped before writing a snapshot that needs it`);
        }
        this.packsVerified++;
      }
      this.verifiedIndexFiles.add(name);
    }
  }
}
