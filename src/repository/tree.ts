/**
 * Directory trees and snapshots as stored in the repository.
 *
 * A tree is one folder: its entries sorted by name bytes, each with the metadata a restore needs
 * (owner, mode, times in nanoseconds) and what incremental backups compare (size, mtime, ctime,
 * inode). A file's content is the list of its chunks: a blob id, or `zero:<length>` for a chunk
 * that is all zero bytes (never stored; restored as a hole). Sub-folders point at their own
 * tree blob, so an unchanged folder is one shared blob across snapshots.
 */
export type NodeType = 'file' | 'dir' | 'symlink' | 'fifo' | 'chardev' | 'blockdev';

export interface TreeNode {
  /** Name bytes, base64 (names need not be UTF-8). */
  name: string;
  type: NodeType;
  mode: number;
  uid: number;
  gid: number;
  /** Nanoseconds since the epoch, as decimal strings (beyond 2^53). */
  mtimeNs: string;
  ctimeNs: string;
  inode: string;
  size: number;
  /** Files: chunk ids or `zero:<length>`. */
  content?: string[];
  /** Folders: the tree blob of the folder's entries. */
  subtree?: string;
  /** Symlinks: target bytes, base64. */
  target?: string;
  /** Hard links after the first: path of the first link relative to the volume root, base64. */
  hardlink?: string;
  rdev?: number;
}

export interface Tree {
  nodes: TreeNode[];
}

export interface SnapshotVolume {
  composeName: string;
  name: string;
  role: string;
  mountPath: string;
  tree: string;
  /** The mount folder itself: owner, mode, times. */
  root: TreeNode;
  entries: number;
  files: number;
  bytes: number;
}

/** A logical dump of CVAT's PostgreSQL (`backup --db dump`), stored as chunks like a file. */
export interface SnapshotDatabase {
  engine: 'postgresql';
  /** `pg_dump --format=custom --compress=0`; loaded with pg_restore. */
  format: 'pg_dump-custom';
  /** bundled: dumped in the cvat_db container (whose volume is then not in `volumes`); external: from the host. */
  location: 'bundled' | 'external';
  dbname: string;
  content: string[];
  size: number;
  /** When the dump began (the state it holds), and how long it took. */
  time: string;
  durationMs: number;
}

export interface Snapshot {
  version: 1;
  time: string;
  hostname: string;
  tool: string;
  project: string;
  cvat: { version: string | null; versionSource: string; serverImage: string | null; serverImageDigest: string | null };
  parent?: string;
  /**
   * A copy (`cvat-backup copy`): the id of the snapshot in the repository where it was first
   * written; kept through copies of copies.
   */
  original?: string;
  /** How CVAT was held still: stopped for the whole copy, stopped for the delta only, or frozen. */
  mode?: 'offline' | 'two-phase' | 'freeze';
  /** First container stopped (or frozen) → last started (or thawed), ms. */
  downtimeMs: number;
  durationMs: number;
  volumes: SnapshotVolume[];
  /** With `--db dump`: the database as a logical dump. */
  database?: SnapshotDatabase;
  skipped: { composeName: string; reason: string }[];
  /** Filled when read: the snapshot's id (its file name). */
  id?: string;
}

export const ZERO_PREFIX = 'zero:';

export function isZeroChunk(ref: string): boolean {
  return ref.startsWith(ZERO_PREFIX);
}

export function zeroChunkLength(ref: string): number {
  return Number(ref.slice(ZERO_PREFIX.length));
}
