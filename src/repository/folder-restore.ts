/**
 * The direct path of a snapshot restore: a volume's trees written straight into its folder on this
 * host (local engine, root), with no tar stream in between. Blob workers read, authenticate and
 * decompress each chunk and write it into the open file at its offset, several files and chunks
 * at once; this thread walks the trees, creates folders, files and links, and sets owners, modes
 * and times. Holes (`zero:` chunks) are never written, so sparse files stay sparse.
 *
 * Contract (as HostExtractor's): `root` is empty except for entries starting with `.cvat-backup-`.
 * Every name is one path component (a tree that says otherwise is refused as damaged), folders are
 * created fresh, so nothing can be written outside the volume. Owners are set before modes (chown
 * clears setuid/setgid); folder modes and times last, deepest first.
 */
import { chmod, lchown, link, lutimes, mkdir, open, symlink, type FileHandle } from 'node:fs/promises';
import type { TarStats } from '../archive/tar.js';
import { CorruptArchiveError } from '../errors.js';
import type { ChunkPool } from './chunk-pool.js';
import type { Repository } from './repository.js';
import { chunkLength, loadTree } from './restorer.js';
import { isZeroChunk, type SnapshotVolume, type TreeNode } from './tree.js';

export interface FolderRestoreOptions {
  signal?: AbortSignal;
  pool?: ChunkPool;
  onProgress?: (stats: TarStats) => void;
  /** Chunks being read and written at once (each holds about one chunk of memory on a worker). */
  chunksInFlight?: number;
  /** Files open at once, waiting for their chunks. */
  filesInFlight?: number;
}

export interface FolderRestoreResult {
  stats: TarStats;
  /** Entries that cannot be made from here (FIFOs, devices), as `path (type)`. */
  skipped: string[];
}

const SLASH = Buffer.from('/');

function checkedName(node: TreeNode): Buffer {
  const name = Buffer.from(node.name, 'base64');
  if (name.length === 0 || name.includes(SLASH) || name.includes(0) || name.equals(Buffer.from('.')) || name.equals(Buffer.from('..'))) {
    throw new CorruptArchiveError(`snapshot tree holds an invalid name '${name.toString('utf8')}'`);
  }
  return name;
}

/** A hard link's first path, relative to the volume root: components checked like names. */
function checkedLinkTarget(node: TreeNode): Buffer {
  const path = Buffer.from(node.hardlink ?? '', 'base64');
  const text = path.toString('latin1');
  if (text === '' || text.startsWith('/') || text.split('/').some((p) => p === '' || p === '.' || p === '..' || p.includes('\0'))) {
    throw new CorruptArchiveError(`snapshot tree holds an invalid hard link target '${path.toString('utf8')}'`);
  }
  return path;
}

function seconds(ns: string): number {
  const value = BigInt(ns);
  return Number(value / 1000000000n) + Number(value % 1000000000n) / 1e9;
}

async function setMeta(path: Buffer, node: TreeNode, chmodToo: boolean): Promise<void> {
  await lchown(path, node.uid, node.gid);
  if (chmodToo) await chmod(path, node.mode & 0o7777);
  const t = seconds(node.mtimeNs);
  await lutimes(path, t, t);
}

/** Bounded concurrency with the first failure kept: nothing new is admitted after one. */
class Slots {
  private readonly running = new Set<Promise<void>>();
  failure: Error | undefined;

  constructor(private readonly size: number) {}

  /** Waits for a free slot; throws the first failure instead once there is one. */
  async admit(): Promise<void> {
    while (this.running.size >= this.size) await Promise.race(this.running);
    if (this.failure !== undefined) throw this.failure;
  }

  /** Tracks admitted work; returns it as given. */
  track<T>(work: Promise<T>): Promise<T> {
    const tracked: Promise<void> = work.then(
      () => undefined,
      (error: unknown) => {
        this.failure ??= error instanceof Error ? error : new Error(String(error));
      },
    );
    const done = tracked.finally(() => this.running.delete(done));
    this.running.add(done);
    return work;
  }

  async drain(): Promise<void> {
    while (this.running.size > 0) await Promise.race(this.running);
    if (this.failure !== undefined) throw this.failure;
  }
}

export async function restoreVolumeToFolder(
  repo: Repository,
  volume: SnapshotVolume,
  root: string,
  options: FolderRestoreOptions = {},
): Promise<FolderRestoreResult> {
  const stats: TarStats = { entries: 1, files: 0, bytes: 0 };
  const skipped: string[] = [];
  const folders: { path: Buffer; node: TreeNode }[] = [{ path: Buffer.from(root), node: volume.root }];
  const chunks = new Slots(options.chunksInFlight ?? 16);
  const files = new Slots(options.filesInFlight ?? 64);
  const rootPath = Buffer.from(root);
  let lastReport = 0;
  const report = (force = false): void => {
    const now = Date.now();
    if (!force && now - lastReport < 200) return;
    lastReport = now;
    options.onProgress?.({ ...stats });
  };

  const writeFile = async (path: Buffer, node: TreeNode, display: string): Promise<void> => {
    const content = node.content ?? [];
    const lengths = content.map((ref) => chunkLength(repo, ref));
    const total = lengths.reduce((a, b) => a + b, 0);
    if (total !== node.size) throw new CorruptArchiveError(`${display}: its chunks hold ${total} bytes, the file ${node.size}`);
    const handle: FileHandle = await open(path, 'wx', 0o600);
    const writes: Promise<void>[] = [];
    let closed = false;
    const close = async (): Promise<void> => {
      if (closed) return;
      closed = true;
      await handle.close();
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
        writes.push(
          chunks.track(
            repo.writeBlobTo(ref, options.pool, handle.fd, at).then(() => {
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
          if (content.some(isZeroChunk)) await handle.truncate(node.size);
        } finally {
          await Promise.allSettled(writes);
          await close();
        }
        await setMeta(path, node, true);
      })(),
    ).catch(() => undefined); // kept as the slots' failure
  };

  const walk = async (treeId: string, dir: Buffer, rel: string): Promise<void> => {
    const tree = await loadTree(repo, treeId);
    for (const node of tree.nodes) {
      options.signal?.throwIfAborted();
      if (chunks.failure !== undefined) throw chunks.failure;
      if (files.failure !== undefined) throw files.failure;
      const name = checkedName(node);
      const path = Buffer.concat([dir, SLASH, name]);
      const display = rel === '' ? name.toString('utf8') : `${rel}/${name.toString('utf8')}`;
      stats.entries++;
      switch (node.type) {
        case 'dir':
          await mkdir(path, { mode: 0o700 });
          folders.push({ path, node });
          if (node.subtree) await walk(node.subtree, path, display);
          break;
        case 'symlink':
          await symlink(Buffer.from(node.target ?? '', 'base64'), path);
          await setMeta(path, node, false);
          break;
        case 'file':
          stats.files++;
          if (node.hardlink !== undefined) {
            await link(Buffer.concat([rootPath, SLASH, checkedLinkTarget(node)]), path);
          } else {
            await writeFile(path, node, display);
          }
          break;
        default:
          skipped.push(`${display} (${node.type})`);
      }
    }
  };

  try {
    await walk(volume.tree, rootPath, '');
  } finally {
    // Whatever happened, no write may still be running when this returns.
    await Promise.allSettled([chunks.drain(), files.drain()]);
  }
  await chunks.drain();
  await files.drain();
  for (const { path, node } of folders.reverse()) await setMeta(path, node, true);
  report(true);
  return { stats, skipped };
}
