/**
 * Archiver: stores a volume folder into the repository as chunks and trees.
 *
 * Incremental: with the parent snapshot's tree of the same volume, a file whose size, mtime (ns),
 * ctime (ns) and inode are all unchanged keeps the parent's chunk list and is not read at all.
 * Every other file is read, cut by the content-defined chunker, and only chunks the repository
 * does not hold yet are stored. All-zero chunks are recorded as holes, not stored.
 */
import { closeSync, createReadStream, openSync, readSync } from 'node:fs';
import { lstat, readFile, readdir, readlink } from 'node:fs/promises';
import type { BigIntStats } from 'node:fs';
import { isAllZero } from './zero.js';
import { Chunker } from './chunker.js';
import type { Repository } from './repository.js';
import type { ChunkPool } from './chunk-pool.js';
import { ZERO_PREFIX, type NodeType, type Tree, type TreeNode } from './tree.js';

export interface ArchiveStats {
  entries: number;
  files: number;
  /** Logical bytes of all files. */
  bytes: number;
  /** Bytes of files that were read (changed or new). */
  bytesRead: number;
  /** Files that were not read thanks to the parent snapshot. */
  filesUnchanged: number;
  /** Sealed bytes added to the repository. */
  bytesAdded: number;
}

export interface ArchiveOptions {
  signal?: AbortSignal;
  onProgress?: (stats: ArchiveStats) => void;
  /** Worker threads for chunking, hashing, compression and encryption (else: this thread). */
  pool?: ChunkPool;
  /**
   * A copy taken while CVAT runs (phase 1 of a two-phase backup): entries that vanish, and files
   * that change while they are read, are not errors. Such a file keeps no content, so the next
   * pass reads it again.
   */
  tolerateChanges?: boolean;
  /**
   * Racy files: a file whose mtime or ctime is at or after this instant (ns since the epoch) is
   * read again even if its metadata matches the parent's — it may have changed within the
   * timestamp granularity of the parent pass's read, which metadata cannot show.
   */
  racySinceNs?: bigint;
}

/** Files up to this size are read synchronously (see fileContent). */
const TINY_FILE = 64 * 1024;

/** Reads a file expected to hold `size` bytes; one byte more is asked for, so growth shows. */
function readTinyFile(path: Buffer, size: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buffer = Buffer.allocUnsafe(size + 1);
    let read = 0;
    for (;;) {
      const n = readSync(fd, buffer, read, buffer.length - read, read);
      if (n === 0 || read + n === buffer.length) {
        read += n;
        break;
      }
      read += n;
    }
    return buffer.subarray(0, read);
  } finally {
    closeSync(fd);
  }
}

/** Errors that mean "this entry changed or vanished while we looked". */
function isChangeError(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'ENOTDIR' || code === 'ECHANGED' || code === 'ELOOP';
}

function nodeType(st: BigIntStats): NodeType | undefined {
  if (st.isFile()) return 'file';
  if (st.isDirectory()) return 'dir';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isFIFO()) return 'fifo';
  if (st.isCharacterDevice()) return 'chardev';
  if (st.isBlockDevice()) return 'blockdev';
  return undefined;
}

export class Archiver {
  readonly stats: ArchiveStats = { entries: 0, files: 0, bytes: 0, bytesRead: 0, filesUnchanged: 0, bytesAdded: 0 };
  private readonly seenInodes = new Map<string, string>();
  private lastReport = 0;

  constructor(
    private readonly repo: Repository,
    private readonly options: ArchiveOptions = {},
  ) {}

  private report(force = false): void {
    const now = Date.now();
    if (!force && now - this.lastReport < 200) return;
    this.lastReport = now;
    this.options.onProgress?.({ ...this.stats });
  }

  /** Archives the folder `root`; returns the id of its tree blob. */
  async archive(root: string, parentTree: string | undefined): Promise<{ tree: string; root: TreeNode }> {
    const st = await lstat(root, { bigint: true });
    const tree = await this.folder(Buffer.from(root), Buffer.alloc(0), parentTree);
    this.report(true);
    return { tree, root: this.baseNode(Buffer.alloc(0), st, 'dir') };
  }

  private baseNode(name: Buffer, st: BigIntStats, type: NodeType): TreeNode {
    return {
      name: name.toString('base64'),
      type,
      mode: Number(st.mode & 0o7777n),
      uid: Number(st.uid),
      gid: Number(st.gid),
      mtimeNs: st.mtimeNs.toString(),
      ctimeNs: st.ctimeNs.toString(),
      inode: st.ino.toString(),
      size: type === 'file' ? Number(st.size) : 0,
    };
  }

  /** Runs a file system call; in a tolerant pass an entry that vanished or changed gives undefined. */
  private async tolerant<T>(call: Promise<T>): Promise<T | undefined> {
    try {
      return await call;
    } catch (error) {
      if (this.options.tolerateChanges && isChangeError(error)) return undefined;
      throw error;
    }
  }

  private isRacy(node: TreeNode): boolean {
    const since = this.options.racySinceNs;
    return since !== undefined && (BigInt(node.mtimeNs) >= since || BigInt(node.ctimeNs) >= since);
  }

  private async folder(absolute: Buffer, relative: Buffer, parentTree: string | undefined): Promise<string> {
    const parent = parentTree ? (JSON.parse((await this.repo.loadBlob(parentTree)).toString('utf8')) as Tree) : undefined;
    const parentNodes = new Map(parent?.nodes.map((n) => [n.name, n]));
    const names = ((await this.tolerant(readdir(absolute, { encoding: 'buffer' }))) ?? []).sort((a, b) => Buffer.compare(a, b));
    const nodes: TreeNode[] = [];
    /** Files of this folder to read; read several at once when workers are there. */
    const reads: { node: TreeNode; path: Buffer }[] = [];
    // lstat in batches: the calls go to the thread pool, so a batch costs about one call.
    const stats = new Map<Buffer, Promise<BigIntStats>>();
    const statAhead = (from: number): void => {
      for (const name of names.slice(from, from + 64)) {
        const pending = lstat(Buffer.concat([absolute, Buffer.from('/'), name]), { bigint: true });
        pending.catch(() => undefined); // awaited in turn below; never an unhandled rejection
        stats.set(name, pending);
      }
    };
    for (const [index, name] of names.entries()) {
      this.options.signal?.throwIfAborted();
      if (index % 64 === 0) statAhead(index);
      const path = Buffer.concat([absolute, Buffer.from('/'), name]);
      const rel = relative.length === 0 ? name : Buffer.concat([relative, Buffer.from('/'), name]);
      const st = await this.tolerant(stats.get(name)!);
      stats.delete(name);
      if (st === undefined) continue; // gone since readdir (a copy taken while CVAT runs)
      const type = nodeType(st);
      if (type === undefined) continue; // sockets
      const node = this.baseNode(name, st, type);
      const before = parentNodes.get(node.name);
      this.stats.entries++;
      if (type === 'dir') {
        node.subtree = await this.folder(path, rel, before?.type === 'dir' ? before.subtree : undefined);
      } else if (type === 'symlink') {
        const target = await this.tolerant(readlink(path, { encoding: 'buffer' }));
        if (target === undefined) continue;
        node.target = target.toString('base64');
      } else if (type === 'chardev' || type === 'blockdev') {
        node.rdev = Number(st.rdev);
      } else if (type === 'file') {
        this.stats.files++;
        this.stats.bytes += node.size;
        const inodeKey = `${st.dev}:${st.ino}`;
        const first = st.nlink > 1n ? this.seenInodes.get(inodeKey) : undefined;
        if (first !== undefined) {
          node.hardlink = first;
        } else {
          if (st.nlink > 1n) this.seenInodes.set(inodeKey, rel.toString('base64'));
          const unchanged =
            before?.type === 'file' &&
            before.content !== undefined &&
            before.size === node.size &&
            before.mtimeNs === node.mtimeNs &&
            before.ctimeNs === node.ctimeNs &&
            before.inode === node.inode &&
            !this.isRacy(node);
          if (unchanged && before.content) {
            node.content = before.content;
            this.stats.filesUnchanged++;
          } else {
            reads.push({ node, path });
          }
        }
      }
      nodes.push(node);
      this.report();
    }
    // A sliding window: a new file starts as soon as one finishes, so the workers never wait for
    // the slowest file of a batch.
    const window = this.options.pool ? 16 : 1;
    let next = 0;
    let failed = false;
    const lane = async (): Promise<void> => {
      while (next < reads.length && !failed) {
        const r = reads[next++]!;
        const content = await this.tolerant(this.fileContent(r.path, r.node.size)).catch((error: unknown) => {
          failed = true;
          throw error;
        });
        // No content: it changed while read; the next pass (CVAT stopped or frozen) reads it.
        if (content !== undefined) r.node.content = content;
        this.report();
      }
    };
    await Promise.all(Array.from({ length: Math.min(window, reads.length) }, lane));
    const saved = await this.repo.saveBlob('tree', Buffer.from(JSON.stringify({ nodes } satisfies Tree)));
    this.stats.bytesAdded += saved.added;
    return saved.id;
  }

  private async fileContent(path: Buffer, size: number): Promise<string[]> {
    this.options.signal?.throwIfAborted();
    const pool = this.options.pool;
    // A file below the chunker's minimum is one chunk: handled here, without a worker round trip.
    if (pool && size >= this.repo.config.chunker.minSize) {
      const content: string[] = [];
      await pool.processFile(path, size, async ({ id, rawLength, sealed }) => {
        content.push(id);
        this.stats.bytesRead += rawLength;
        if (sealed) this.stats.bytesAdded += await this.repo.saveSealedBlob(id, 'data', sealed, rawLength);
        this.report();
      });
      return content;
    }
    if (size < this.repo.config.chunker.minSize) {
      // One chunk: read it whole (no stream, no chunker). A tiny file is read with plain system
      // calls on this thread: three calls from the page cache cost less than the thread-pool hops.
      const data = size <= TINY_FILE ? readTinyFile(path, size) : await readFile(path, this.options.signal ? { signal: this.options.signal } : {});
      if (data.length !== size) throw Object.assign(new Error(`${path.toString()} changed size while it was read`), { code: 'ECHANGED' });
      this.stats.bytesRead += data.length;
      if (data.length === 0) return [];
      if (isAllZero(data)) return [`${ZERO_PREFIX}${data.length}`];
      const saved = await this.repo.saveBlob('data', data);
      this.stats.bytesAdded += saved.added;
      return [saved.id];
    }
    const chunker = new Chunker(this.repo.config.chunker);
    const content: string[] = [];
    const store = async (chunk: Buffer): Promise<void> => {
      if (isAllZero(chunk)) {
        content.push(`${ZERO_PREFIX}${chunk.length}`);
        return;
      }
      const saved = await this.repo.saveBlob('data', chunk);
      this.stats.bytesAdded += saved.added;
      content.push(saved.id);
    };
    let read = 0;
    for await (const piece of createReadStream(path, { highWaterMark: 1 << 20, ...(this.options.signal ? { signal: this.options.signal } : {}) })) {
      read += (piece as Buffer).length;
      this.stats.bytesRead += (piece as Buffer).length;
      for (const chunk of chunker.push(piece as Buffer)) await store(chunk);
      this.report();
    }
    for (const chunk of chunker.finish()) await store(chunk);
    if (read !== size) throw Object.assign(new Error(`${path.toString()} changed size while it was read`), { code: 'ECHANGED' });
    return content;
  }
}
