/**
 * A staged restore that keeps what is already there: a file of the snapshot whose path in the
 * volume's current data holds the same bytes is hard-linked into the staged folder instead of
 * being downloaded and written again (restic 0.17's restore does the same: it verifies existing
 * files and rewrites only what differs). Restoring over a deployment whose media did not change
 * then reads and hashes the media instead of writing it.
 *
 * What counts as the same (the current data is hostile input like any other):
 * - a regular file with one link only (nothing else in or outside the volume shares its inode),
 *   whose size, owner, group, mode and modification time are the snapshot's: nothing of the inode
 *   is ever changed, so the rollback point's copy (the same inode) stays as it was;
 * - every chunk's range hashes to the chunk's id (the SHA-256 of its plaintext: the tree that names
 *   it was authenticated), or is zeros for a hole. The hashing runs on the blob workers.
 *
 * CVAT still runs and may write into the file. The order closes that window:
 * 1. link the current file into the staged folder, open the link (checked to be the inode listed)
 *    and note its ctime (the link itself sets it);
 * 2. wait until the clock is past that ctime by more than a kernel tick (a timestamp is the coarse
 *    clock's: a write in the same tick could keep the same ctime), then hash;
 * 3. the ctime is the one noted after the hash, and again once CVAT is stopped (`recheck`, before
 *    any rename of the rollback point changes it). A write, truncate or chmod after step 1 changes
 *    it; a file that changed is written from the repository during the downtime.
 * A file replaced by CVAT (a new inode renamed over the name) leaves the linked inode as it was.
 */
import { fstat as fstatCallback, type BigIntStats } from 'node:fs';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { DirHandle, closeFd } from '../fs/beneath.js';
import type { ChunkPool } from './chunk-pool.js';
import type { TreeNode } from './tree.js';

const fstatFd = promisify(fstatCallback) as (fd: number, options: { bigint: true }) => Promise<BigIntStats>;

/** Longer than a kernel tick at HZ=100: a ctime noted this long ago is no longer the clock's current value. */
const TICK_MS = 12;
/** Smaller files are written: a link, two stats and a worker round trip cost about what writing them does. */
export const REUSE_AT_LEAST = 32 * 1024;
/** A snapshot's modification time (ns) against the file's: a restore set it through a double (seconds). */
const MTIME_SLACK_NS = 1000n;

interface Reused {
  /** The folder's path below the staged root, as its components. */
  folder: Buffer[];
  name: Buffer;
  ino: bigint;
  ctimeNs: bigint;
  size: bigint;
  node: TreeNode;
}

export interface ReuseStats {
  files: number;
  bytes: number;
}

export class FileReuse {
  private reused: Reused[] = [];
  readonly stats: ReuseStats = { files: 0, bytes: 0 };

  constructor(private readonly pool: ChunkPool) {}

  /** Whether `node` is worth a look (a file that is not a later hard link, big enough). */
  static wants(node: TreeNode): boolean {
    return node.type === 'file' && node.hardlink === undefined && node.size >= REUSE_AT_LEAST;
  }

  /**
   * Links `oldDir/name` as `dir/name` when it holds what `node` says (see above); false leaves
   * `dir/name` absent (to be written). `lengths`: each chunk's plaintext length.
   */
  async tryReuse(oldDir: DirHandle, dir: DirHandle, folder: Buffer[], name: Buffer, node: TreeNode, lengths: number[]): Promise<boolean> {
    let listed: BigIntStats;
    try {
      listed = await oldDir.lstat(name);
    } catch {
      return false;
    }
    if (!sameMeta(listed, node) || listed.nlink !== 1n) return false;
    try {
      await dir.link(oldDir, name, name);
    } catch {
      return false;
    }
    let fd: number | undefined;
    let keep = false;
    try {
      const opened = await dir.openFile(name, { dev: listed.dev, ino: listed.ino });
      fd = opened.fd;
      const linked = await fstatFd(fd, { bigint: true });
      if (linked.ino !== listed.ino || !sameMeta(linked, node)) return false;
      const wait = Number(linked.ctimeNs / 1000000n) + TICK_MS - Date.now();
      if (wait > 0) await sleep(wait);
      const ranges: { offset: number; length: number; id: string }[] = [];
      let offset = 0;
      for (const [i, id] of (node.content ?? []).entries()) {
        const length = lengths[i]!;
        ranges.push({ offset, length, id });
        offset += length;
      }
      if (!(await this.pool.compareRanges(fd, ranges))) return false;
      const after = await fstatFd(fd, { bigint: true });
      if (after.ctimeNs !== linked.ctimeNs || after.size !== linked.size) return false;
      this.reused.push({ folder, name, ino: linked.ino, ctimeNs: linked.ctimeNs, size: linked.size, node });
      this.stats.files++;
      this.stats.bytes += node.size;
      keep = true;
      return true;
    } catch {
      return false;
    } finally {
      if (fd !== undefined) await closeFd(fd).catch(() => undefined);
      // Not the same: the link goes (the staged name is written instead).
      if (!keep) await dir.unlink(name);
    }
  }

  /**
   * With CVAT stopped (nothing writes any more) and before the rollback point is made: every
   * linked file whose ctime moved since it was hashed is unlinked and handed to `rewrite`.
   * Returns how many were.
   */
  async recheck(stagedRoot: string, rewrite: (dir: DirHandle, name: Buffer, node: TreeNode, display: string) => Promise<void>): Promise<number> {
    if (this.reused.length === 0) return 0;
    const byFolder = new Map<string, Reused[]>();
    for (const r of this.reused) {
      const key = Buffer.concat(r.folder.flatMap((c) => [c, Buffer.from([0])])).toString('latin1');
      const list = byFolder.get(key);
      if (list) list.push(r);
      else byFolder.set(key, [r]);
    }
    let rewritten = 0;
    const gone = new Set<Reused>();
    const root = await DirHandle.openRoot(stagedRoot);
    try {
      for (const list of byFolder.values()) {
        const opened: DirHandle[] = [];
        try {
          let dir = root;
          for (const part of list[0]!.folder) {
            dir = await dir.openDir(part);
            opened.push(dir);
          }
          const changed: Reused[] = [];
          for (let i = 0; i < list.length; i += 64) {
            await Promise.all(
              list.slice(i, i + 64).map(async (r) => {
                const st = await dir.lstat(r.name).catch(() => undefined);
                if (!st || st.ino !== r.ino || st.ctimeNs !== r.ctimeNs || st.size !== r.size) changed.push(r);
              }),
            );
          }
          for (const r of changed) {
            await dir.unlink(r.name).catch(() => undefined);
            await rewrite(dir, r.name, r.node, [...r.folder, r.name].map((p) => p.toString('utf8')).join('/'));
            gone.add(r);
            this.stats.files--;
            this.stats.bytes -= r.node.size;
            rewritten++;
          }
        } finally {
          for (const handle of opened.reverse()) await handle.close();
        }
      }
    } finally {
      await root.close();
      // Written again: no longer linked files.
      if (gone.size > 0) this.reused = this.reused.filter((r) => !gone.has(r));
    }
    return rewritten;
  }
}

function sameMeta(st: BigIntStats, node: TreeNode): boolean {
  if (!st.isFile() || st.size !== BigInt(node.size) || Number(st.uid) !== node.uid || Number(st.gid) !== node.gid) return false;
  if ((Number(st.mode) & 0o7777) !== (node.mode & 0o7777)) return false;
  const diff = st.mtimeNs - BigInt(node.mtimeNs);
  return diff <= MTIME_SLACK_NS && diff >= -MTIME_SLACK_NS;
}
