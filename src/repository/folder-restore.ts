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
import { chunkLength } from './restorer.js';
import { DirectWriter } from './direct-writes.js';
import { loadKeptBlob } from './pack-reads.js';
import { TreeWalkBounds, checkRootNode, comparePreOrder, hardLinkTarget, isReservedEntry, loadCheckedTree } from './tree-guard.js';
import { isZeroChunk, type SnapshotVolume, type TreeNode } from './tree.js';
import { Slots } from './slots.js';
import { FileReuse, type ReuseStats } from './reuse-files.js';

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
  /** Writes the chunks through pack reads on the workers (`restoreVolumeVerifying`). */
  direct?: DirectWriter;
  /** Told of what is not restored (cvat-backup's own folder, caught by a backup). */
  onWarning?: (message: string) => void;
  /**
   * The folder holding the volume's current data (a staged restore: `root` is inside it): files
   * of the snapshot that it holds unchanged are hard-linked, not written (reuse-files.ts). Needs
   * `pool`.
   */
  reuseFrom?: string;
}

export interface FolderRestoreResult {
  stats: TarStats;
  /** Entries that cannot be made from here (FIFOs, devices), as `path (type)`. */
  skipped: string[];
  /** The volume root's owner, mode and modification time (seconds), as the snapshot has them. */
  root: { uid: number; gid: number; mode: number | undefined; mtime: number };
  /** Files (and their bytes) linked from `reuseFrom` instead of written. */
  reused: ReuseStats;
  /**
   * With `reuseFrom`: to be called once nothing writes into the current data any more (CVAT
   * stopped), before anything of it is renamed: writes again each linked file that changed since
   * it was compared; resolves with how many.
   */
  recheck?: () => Promise<number>;
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

  const reuse = options.reuseFrom !== undefined && options.pool ? new FileReuse(options.pool) : undefined;
  /** Each chunk's plaintext length, checked against the file's size. */
  const lengthsOf = (node: TreeNode, display: string): number[] => {
    const lengths = (node.content ?? []).map((ref) => chunkLength(repo, ref));
    const total = lengths.reduce((a, b) => a + b, 0);
    if (total !== node.size) throw new CorruptArchiveError(`${display}: its chunks hold ${total} bytes, the file ${node.size}`);
    return lengths;
  };

  // `direct`: the pack reads to write through (none: each blob read on its own, as the downtime's rewrites do).
  const writeFile = async (dir: DirHandle, name: Buffer, node: TreeNode, display: string, direct: DirectWriter | undefined): Promise<void> => {
    const content = node.content ?? [];
    const lengths = lengthsOf(node, display);
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
        if (direct) {
          writes.push(
            direct.add(ref, fd, at).then(() => {
              stats.bytes += length;
              report();
            }),
          );
          await direct.flushIfFull();
          continue;
        }
        await chunks.admit();
        writes.push(
          chunks.track(
            writeBlob(repo, options.pool, ref, fd, at).then(() => {
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

  /** Reuse checks run ahead of the walk (each waits a tick before hashing: see reuse-files.ts). */
  const REUSE_AHEAD = 64;
  const walk = async (rootDir: DirHandle, treeId: string, dir: DirHandle, path: Buffer[], oldDir: DirHandle | undefined): Promise<void> => {
    const depth = bounds.depth;
    bounds.enter(treeId);
    const { tree, names } = await loadCheckedTree(repo, treeId);
    const checks = new Map<number, Promise<boolean>>();
    let started = 0;
    const startChecks = (upTo: number): void => {
      if (!reuse || !oldDir) return;
      for (; started < Math.min(upTo, tree.nodes.length); started++) {
        const node = tree.nodes[started]!;
        const name = names[started]!;
        if (!FileReuse.wants(node) || isReservedEntry(depth, name)) continue;
        const lengths = lengthsOf(node, [...path, name].map((p) => p.toString('utf8')).join('/'));
        checks.set(started, reuse.tryReuse(oldDir, dir, path, name, node, lengths));
      }
    };
    try {
      for (const [i, node] of tree.nodes.entries()) {
        startChecks(i + REUSE_AHEAD);
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
            const oldChild = reuse && oldDir && node.subtree ? await oldDir.openDir(name).catch(() => undefined) : undefined;
            try {
              if (node.subtree) await walk(rootDir, node.subtree, child, entryPath, oldChild);
              await child.setMeta(node.uid, node.gid, node.mode, seconds(node.mtimeNs));
            } finally {
              await oldChild?.close();
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
            else if (await checks.get(i)) {
              stats.bytes += node.size;
              report();
            } else await writeFile(dir, name, node, display, options.direct);
            break;
          default:
            skipped.push(`${display} (${node.type})`);
        }
      }
    } finally {
      // No check may still hold a descriptor or make a link once this folder is left.
      await Promise.allSettled(checks.values());
    }
    bounds.leave();
  };

  checkRootNode(volume.root);
  const rootDir = await DirHandle.openRoot(root);
  // The current data unreadable: nothing is kept, everything written.
  const oldRoot = reuse ? await DirHandle.openRoot(options.reuseFrom!).catch(() => undefined) : undefined;
  try {
    try {
      await walk(rootDir, volume.tree, rootDir, [], oldRoot);
      await options.direct?.finish();
    } catch (error) {
      // What waits for writes never sent fails too (the files waiting for them close).
      await options.direct?.abandon(error);
      throw error;
    } finally {
      // Whatever happened, no write may still be running when this returns.
      await Promise.allSettled([chunks.drain(), files.drain()]);
    }
    await chunks.drain();
    await files.drain();
    const r = volume.root;
    if (!options.leaveRoot) await rootDir.setMeta(r.uid, r.gid, r.mode, seconds(r.mtimeNs));
  } finally {
    await oldRoot?.close();
    await rootDir.close();
  }
  report(true);
  const r = volume.root;
  const recheck = reuse
    ? async (): Promise<number> => {
        try {
          return await reuse.recheck(root, (dir, name, node, display) => writeFile(dir, name, node, display, undefined));
        } finally {
          await Promise.allSettled([chunks.drain(), files.drain()]);
          await chunks.drain();
          await files.drain();
        }
      }
    : undefined;
  return { stats, skipped, root: { uid: r.uid, gid: r.gid, mode: r.mode, mtime: seconds(r.mtimeNs) }, reused: reuse?.stats ?? { files: 0, bytes: 0 }, ...(recheck ? { recheck } : {}) };
}

/**
 * One pass for a remote repository's volume (a staged folder, written while CVAT runs): the
 * chunks are read by pack and written into the files by the blob workers as they arrive
 * (direct-writes.ts), each authenticated as it is decrypted; no verification pass before, nothing
 * kept on this machine. A local repository's volume is written as `restoreVolumeToFolder` does
 * (the workers read each blob from its pack file, authenticating it).
 */
export async function restoreVolumeVerifying(repo: Repository, volume: SnapshotVolume, root: string, options: FolderRestoreOptions = {}): Promise<FolderRestoreResult> {
  if (repo.backend.localPath !== undefined || !options.pool) return restoreVolumeToFolder(repo, volume, root, options);
  return restoreVolumeToFolder(repo, volume, root, { ...options, direct: new DirectWriter(repo, options.pool, options.signal ? { signal: options.signal } : {}) });
}
