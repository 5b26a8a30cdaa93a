/**
 * The direct path of a snapshot restore: a volume's trees written straight into its folder on this
 * host (local engine, root), with no tar stream in between. Blob workers read, authenticate and
 * decompress each chunk and write it into the open file at its offset, several files and chunks
 * at once; this thread walks the trees, creates folders, files and links, and sets owners, modes
 * and times. Holes (`zero:` chunks) are never written, so sparse files stay sparse.
 *
 * Contract (as HostExtractor's): `root` is empty except for entries starting with `.cvat-backup-`.
 * Every tree is checked as it is read (tree-guard.ts; the snapshot was verified the same way
 * before CVAT stopped), and nothing can be written outside the volume whatever a tree says: every
 * folder is made and entered through an open folder handle (DirHandle), never following a link;
 * one handle per level of the walk. Files are created new (O_EXCL, O_NOFOLLOW) and their owner,
 * mode and times set on the open descriptor; symbolic links get lchown/lutimes; a hard link is
 * made (no link followed) to a regular file that an earlier entry of this walk created. Owners
 * are set before modes (chown clears setuid/setgid); a folder's owner, mode and times are set as
 * soon as its subtree is done (nothing more is created in it).
 */
import { ftruncate as ftruncateCallback } from 'node:fs';
import { promisify } from 'node:util';
import type { TarStats } from '../archive/tar.js';
import { CorruptArchiveError } from '../errors.js';
import { DirHandle, closeFd, setFileMeta } from '../fs/beneath.js';
import type { ChunkPool } from './chunk-pool.js';
import type { Repository } from './repository.js';
import { chunkLength, verifySnapshotVolume } from './restorer.js';
import { loadKeptBlob } from './pack-reads.js';
import { TreeWalkBounds, checkRootNode, comparePreOrder, hardLinkTarget, isReservedEntry, loadCheckedTree } from './tree-guard.js';
import { isZeroChunk, type SnapshotVolume, type TreeNode } from './tree.js';
import { Slots } from './slots.js';

const ftruncateFd = promisify(ftruncateCallback);

export interface FolderRestoreOptions {
  signal?: AbortSignal;
  pool?: ChunkPool;
  onProgress?: (stats: TarStats) => void;
  /** Chunks being read and written at once (each holds about one chunk of memory on a worker). */
  chunksInFlight?: number;
  /** Files open at once, waiting for their chunks. */
  filesInFlight?: number;
  /**
   * Leaves the owner, mode and times of `root` itself as they are (a staged folder whose entries
   * move into the volume's root later); the result says what they should be.
   */
  leaveRoot?: boolean;
  /** Waits before blob `id` is written (`restoreVolumeVerifying`: until the download alongside has it). */
  blobReady?: (id: string) => Promise<void>;
  /** Told of what is not restored (cvat-backup's own folder, caught by a backup). */
  onWarning?: (message: string) => void;
}

export interface FolderRestoreResult {
  stats: TarStats;
  /** Entries that cannot be made from here (FIFOs, devices), as `path (type)`. */
  skipped: string[];
  /** The volume root's owner, mode and modification time (seconds), as the snapshot has them. */
  root: { uid: number; gid: number; mode: number | undefined; mtime: number };
}

function seconds(ns: string): number {
  const value = BigInt(ns);
  return Number(value / 1000000000n) + Number(value % 1000000000n) / 1e9;
}

/** Blob `id` written into `fd` at `position`: from what the verification kept when it can (pack-reads.ts). */
async function writeBlob(repo: Repository, pool: ChunkPool | undefined, id: string, fd: number, position: number): Promise<void> {
  if (await loadKeptBlob(repo, pool, id, { kind: 'file', fd, position })) return;
  await repo.writeBlobTo(id, pool, fd, position);
}

export async function restoreVolumeToFolder(
  repo: Repository,
  volume: SnapshotVolume,
  root: string,
  options: FolderRestoreOptions = {},
): Promise<FolderRestoreResult> {
  const stats: TarStats = { entries: 1, files: 0, bytes: 0 };
  const skipped: string[] = [];
  const chunks = new Slots(options.chunksInFlight ?? 16);
  const files = new Slots(options.filesInFlight ?? 64);
  const bounds = new TreeWalkBounds(volume);
  let lastReport = 0;
  const report = (force = false): void => {
    const now = Date.now();
    if (!force && now - lastReport < 200) return;
    lastReport = now;
    options.onProgress?.({ ...stats });
  };

  const writeFile = async (dir: DirHandle, name: Buffer, node: TreeNode, display: string): Promise<void> => {
    const content = node.content ?? [];
    const lengths = content.map((ref) => chunkLength(repo, ref));
    const total = lengths.reduce((a, b) => a + b, 0);
    if (total !== node.size) throw new CorruptArchiveError(`${display}: its chunks hold ${total} bytes, the file ${node.size}`);
    const fd = await dir.createFile(name, 0o600);
    const writes: Promise<void>[] = [];
    let closed = false;
    const close = async (): Promise<void> => {
      if (closed) return;
      closed = true;
      await closeFd(fd);
    };
    try {
      let position = 0;
      for (const [i, ref] of content.entries()) {
        const at = position;
        const length = lengths[i]!;
        position += length;
        if (isZeroChunk(ref)) {
          stats.bytes += length;
          continue;
        }
        options.signal?.throwIfAborted();
        await chunks.admit();
        const ready = options.blobReady;
        writes.push(
          chunks.track(
            (ready ? ready(ref).then(() => writeBlob(repo, options.pool, ref, fd, at)) : writeBlob(repo, options.pool, ref, fd, at)).then(() => {
              stats.bytes += length;
              report();
            }),
          ),
        );
      }
    } catch (error) {
      await Promise.allSettled(writes);
      await close();
      throw error;
    }
    // The rest waits for the chunks, without holding up the walk.
    await files.admit().catch(async (error: unknown) => {
      await Promise.allSettled(writes);
      await close();
      throw error;
    });
    void files.track(
      (async () => {
        try {
          await Promise.all(writes);
          // Holes at the end (or a file of holes only) need the size set.
          if (content.some(isZeroChunk)) await ftruncateFd(fd, node.size);
          await setFileMeta(fd, node.uid, node.gid, node.mode, seconds(node.mtimeNs));
        } finally {
          await Promise.allSettled(writes);
          await close();
        }
      })(),
    ).catch(() => undefined); // kept as the slots' failure
  };

  /** A hard link to a file an earlier entry made: reached from the root through folder handles. */
  const hardLink = async (rootDir: DirHandle, dir: DirHandle, name: Buffer, path: Buffer[], node: TreeNode): Promise<void> => {
    const target = hardLinkTarget(node);
    const show = (p: Buffer[]): string => p.map((c) => c.toString('utf8')).join('/');
    if (comparePreOrder(target, path) >= 0) throw new CorruptArchiveError(`hard link '${show(path)}' points at '${show(target)}', which does not come before it`);
    const opened: DirHandle[] = [];
    try {
      let from = rootDir;
      for (const part of target.slice(0, -1)) {
        from = await from.openDir(part);
        opened.push(from);
      }
      const fromName = target[target.length - 1]!;
      if (!(await from.lstat(fromName)).isFile()) throw new CorruptArchiveError(`hard link '${show(path)}' points at '${show(target)}', which is not a regular file`);
      await dir.link(from, fromName, name);
    } catch (error) {
      if (error instanceof CorruptArchiveError) throw error;
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR' || code === 'ELOOP') {
        throw new CorruptArchiveError(`hard link '${show(path)}' points at '${show(target)}', which this restore did not make`, { cause: error });
      }
      throw error;
    } finally {
      for (const handle of opened) await handle.close();
    }
  };

  const walk = async (rootDir: DirHandle, treeId: string, dir: DirHandle, path: Buffer[]): Promise<void> => {
    const depth = bounds.depth;
    bounds.enter(treeId);
    const { tree, names } = await loadCheckedTree(repo, treeId);
    for (const [i, node] of tree.nodes.entries()) {
      options.signal?.throwIfAborted();
      if (chunks.failure !== undefined) throw chunks.failure;
      if (files.failure !== undefined) throw files.failure;
      const name = names[i]!;
      // cvat-backup's own folder, caught by a backup: never restored.
      if (isReservedEntry(depth, name)) {
        options.onWarning?.(`not restored: ${name.toString('utf8')} (a cvat-backup working folder the backup caught)`);
        continue;
      }
      bounds.count();
      const entryPath = [...path, name];
      const display = entryPath.map((p) => p.toString('utf8')).join('/');
      stats.entries++;
      switch (node.type) {
        case 'dir': {
          await dir.mkdir(name, 0o700);
          const child = await dir.openDir(name);
          try {
            if (node.subtree) await walk(rootDir, node.subtree, child, entryPath);
            await child.setMeta(node.uid, node.gid, node.mode, seconds(node.mtimeNs));
          } finally {
            await child.close();
          }
          break;
        }
        case 'symlink': {
          await dir.symlink(Buffer.from(node.target ?? '', 'base64'), name);
          await dir.lchown(name, node.uid, node.gid);
          const t = seconds(node.mtimeNs);
          await dir.lutimes(name, t, t);
          break;
        }
        case 'file':
          stats.files++;
          if (node.hardlink !== undefined) await hardLink(rootDir, dir, name, entryPath, node);
          else await writeFile(dir, name, node, display);
          break;
        default:
          skipped.push(`${display} (${node.type})`);
      }
    }
    bounds.leave();
  };

  checkRootNode(volume.root);
  const rootDir = await DirHandle.openRoot(root);
  try {
    try {
      await walk(rootDir, volume.tree, rootDir, []);
    } finally {
      // Whatever happened, no write may still be running when this returns.
      await Promise.allSettled([chunks.drain(), files.drain()]);
    }
    await chunks.drain();
    await files.drain();
    const r = volume.root;
    if (!options.leaveRoot) await rootDir.setMeta(r.uid, r.gid, r.mode, seconds(r.mtimeNs));
  } finally {
    await rootDir.close();
  }
  report(true);
  const r = volume.root;
  return { stats, skipped, root: { uid: r.uid, gid: r.gid, mode: r.mode, mtime: seconds(r.mtimeNs) } };
}

/**
 * Arrival of blobs that a download alongside the writes authenticates: `wait(id)` settles once
 * `id` arrived, or the download ended (a blob it did not keep is then read as usual), and fails
 * with the download's failure.
 */
class Arrivals {
  private readonly arrived = new Set<string>();
  private readonly waiting = new Map<string, { promise: Promise<void>; resolve: () => void; reject: (error: Error) => void }>();
  private ended: { failure: Error | undefined } | undefined;

  arrive(id: string): void {
    this.arrived.add(id);
    const w = this.waiting.get(id);
    if (w) {
      this.waiting.delete(id);
      w.resolve();
    }
  }

  end(failure?: Error): void {
    this.ended = { failure };
    for (const w of this.waiting.values()) {
      if (failure === undefined) w.resolve();
      else w.reject(failure);
    }
    this.waiting.clear();
  }

  wait(id: string): Promise<void> {
    if (this.arrived.has(id)) return Promise.resolve();
    if (this.ended) return this.ended.failure === undefined ? Promise.resolve() : Promise.reject(this.ended.failure);
    let w = this.waiting.get(id);
    if (!w) {
      let resolve!: () => void;
      let reject!: (error: Error) => void;
      const promise = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      // A wait nobody awaits any more (the walk failed) must not be an unhandled rejection.
      promise.catch(() => undefined);
      w = { promise, resolve, reject };
      this.waiting.set(id, w);
    }
    return w.promise;
  }
}

/**
 * One pass for a remote repository's volume written into a staged folder: the download by pack
 * (pack-reads.ts; kept on this machine) runs alongside the writes, and each write waits until its
 * blob has arrived, then reads it from the kept copy and authenticates it (a damaged copy is
 * dropped and the blob read from the remote: its damage is the restore's failure).
 * The first failure of either stops both. Without kept reads there is nothing to share: use
 * `restoreVolumeToFolder` alone (every blob it writes is authenticated as it is read).
 */
export async function restoreVolumeVerifying(repo: Repository, volume: SnapshotVolume, root: string, options: FolderRestoreOptions = {}): Promise<FolderRestoreResult> {
  const arrivals = new Arrivals();
  const stop = new AbortController();
  const signal = options.signal ? AbortSignal.any([options.signal, stop.signal]) : stop.signal;
  const download = verifySnapshotVolume(repo, volume, {
    signal,
    ...(options.pool ? { pool: options.pool } : {}),
    onBlob: (id) => arrivals.arrive(id),
    // The writes authenticate what they read from the kept copies: checking here too would
    // decrypt and decompress everything twice.
    authenticate: false,
  }).then(
    () => arrivals.end(),
    (error: unknown) => {
      arrivals.end(error instanceof Error ? error : new Error(String(error)));
      throw error;
    },
  );
  // Awaited below; its failure may come while the writes still run.
  download.catch(() => undefined);
  try {
    const result = await restoreVolumeToFolder(repo, volume, root, { ...options, signal, blobReady: (id) => arrivals.wait(id) });
    await download;
    return result;
  } catch (error) {
    stop.abort(error);
    // The download's own failure (damage found first) is the cause the writes stopped for.
    const downloaded = await download.then(
      () => undefined,
      (e: unknown) => e,
    );
    throw downloaded !== undefined && !isAbort(downloaded) ? downloaded : error;
  }
}

function isAbort(error: unknown): boolean {
  return (error as { name?: string }).name === 'AbortError';
}
