/**
 * Restorer: turns a snapshot's volume back into a tar stream whose members are named after the
 * mount path — the same stream an archive set holds — so restore (through the engine or straight
 * into the volume folder) and export reuse the archive code. Files with holes (`zero:` chunks)
 * become GNU sparse 1.0 members, which the host extractor writes back as holes.
 */
import { Readable } from 'node:stream';
import { encodeHeader, encodeSparseMember, pad } from '../archive/host-tar.js';
import { memberPrefixOf } from '../archive/manifest.js';
import type { TarStats } from '../archive/tar.js';
import type { Repository } from './repository.js';
import type { ChunkPool } from './chunk-pool.js';
import { PackReader, loadKeptBlob } from './pack-reads.js';
import { CorruptArchiveError } from '../errors.js';
import { isZeroChunk, zeroChunkLength, type SnapshotVolume, type Tree, type TreeNode } from './tree.js';
import { TreeWalkBounds, checkRootNode, comparePreOrder, hardLinkTarget, isReservedEntry, loadCheckedTree } from './tree-guard.js';

const BLOCK = 512;

function seconds(ns: string): number {
  return Number(BigInt(ns) / 1000000000n);
}

function meta(node: TreeNode): { mode: number; uid: number; gid: number; mtime: number } {
  return { mode: node.mode, uid: node.uid, gid: node.gid, mtime: seconds(node.mtimeNs) };
}

/** Loads a tree blob, checked (tree-guard.ts): a tree that breaks the rules is damage. */
export async function loadTree(repo: Repository, id: string): Promise<Tree> {
  return (await loadCheckedTree(repo, id)).tree;
}

/** Plain length of a chunk reference (a hole's own length, or the indexed blob's). */
export function chunkLength(repo: Repository, ref: string): number {
  if (isZeroChunk(ref)) return zeroChunkLength(ref);
  const where = repo.location(ref);
  if (!where) throw new CorruptArchiveError(`blob ${ref.slice(0, 12)} is missing from the index`);
  return where.rawLength;
}

/**
 * Loads blobs in the order given, with up to `ahead` reads in flight, so reading, decryption (on
 * workers) and writing overlap even for small files. The restorer uses one per folder (a
 * sub-folder gets its own, so the order of consumption is the order of loading); a stored stream
 * (a database dump) uses one for its chunks.
 */
export class BlobPrefetcher {
  private readonly queue: Promise<Buffer>[] = [];
  private next = 0;

  constructor(
    private readonly repo: Repository,
    private readonly refs: string[],
    private readonly pool: ChunkPool | undefined,
    private readonly ahead = 6,
  ) {}

  take(): Promise<Buffer> {
    while (this.queue.length < this.ahead && this.next < this.refs.length) {
      const p = this.load(this.refs[this.next++]!);
      p.catch(() => undefined); // awaited in order by take()
      this.queue.push(p);
    }
    const head = this.queue.shift();
    if (!head) throw new Error('restorer read past its blob list');
    return head;
  }

  /** What the verification kept on this machine is read there, on a worker; the rest as usual. */
  private async load(id: string): Promise<Buffer> {
    const kept = await loadKeptBlob(this.repo, this.pool, id, { kind: 'reply' });
    return kept?.data ?? this.repo.loadBlob(id, this.pool);
  }
}

async function* fileData(repo: Repository, node: TreeNode, name: Buffer, blobs: BlobPrefetcher): AsyncGenerator<Buffer> {
  const content = node.content ?? [];
  const total = content.reduce((sum, ref) => sum + chunkLength(repo, ref), 0);
  if (total !== node.size) {
    throw new CorruptArchiveError(`${name.toString('utf8')}: its chunks hold ${total} bytes, the file ${node.size}`);
  }
  if (!content.some(isZeroChunk)) {
    yield encodeHeader({ ...meta(node), name, type: '0', size: node.size });
    for (let i = 0; i < content.length; i++) yield await blobs.take();
    yield pad(node.size);
    return;
  }
  // Sparse: data segments are the runs of stored chunks; zero chunks are holes.
  const segments: { offset: number; length: number }[] = [];
  let offset = 0;
  for (const ref of content) {
    const length = chunkLength(repo, ref);
    if (!isZeroChunk(ref)) {
      const last = segments[segments.length - 1];
      if (last && last.offset + last.length === offset) last.length += length;
      else segments.push({ offset, length });
    }
    offset += length;
  }
  const last = segments[segments.length - 1];
  if (!last || last.offset + last.length < node.size) segments.push({ offset: node.size, length: 0 });
  const sparse = encodeSparseMember({ ...meta(node), name, realSize: node.size }, segments);
  yield sparse.header;
  for (const ref of content) if (!isZeroChunk(ref)) yield await blobs.take();
  yield pad(sparse.size);
}

async function* treeEntries(
  repo: Repository,
  treeId: string,
  path: Buffer,
  prefix: Buffer,
  signal: AbortSignal | undefined,
  pool: ChunkPool | undefined,
  bounds: TreeWalkBounds,
): AsyncGenerator<Buffer> {
  const depth = bounds.depth;
  bounds.enter(treeId);
  const { tree, names } = await loadCheckedTree(repo, treeId);
  const refs = tree.nodes.flatMap((n, i) =>
    n.type === 'file' && n.hardlink === undefined && !isReservedEntry(depth, names[i]!) ? (n.content ?? []).filter((r) => !isZeroChunk(r)) : [],
  );
  const blobs = new BlobPrefetcher(repo, refs, pool);
  for (const [i, node] of tree.nodes.entries()) {
    signal?.throwIfAborted();
    if (isReservedEntry(depth, names[i]!)) continue;
    bounds.count();
    const name = Buffer.concat([path, Buffer.from('/'), names[i]!]);
    switch (node.type) {
      case 'dir':
        yield encodeHeader({ ...meta(node), name: Buffer.concat([name, Buffer.from('/')]), type: '5', size: 0 });
        if (node.subtree) yield* treeEntries(repo, node.subtree, name, prefix, signal, pool, bounds);
        break;
      case 'symlink':
        yield encodeHeader({ ...meta(node), name, type: '2', size: 0, linkName: Buffer.from(node.target ?? '', 'base64') });
        break;
      case 'file':
        if (node.hardlink !== undefined) {
          const target = Buffer.concat([prefix, Buffer.from('/'), Buffer.from(node.hardlink, 'base64')]);
          yield encodeHeader({ ...meta(node), name, type: '1', size: 0, linkName: target });
        } else {
          yield* fileData(repo, node, name, blobs);
        }
        break;
      case 'fifo':
        yield encodeHeader({ ...meta(node), name, type: '6', size: 0 });
        break;
      case 'chardev':
      case 'blockdev':
        yield encodeHeader({
          ...meta(node),
          name,
          type: node.type === 'chardev' ? '3' : '4',
          size: 0,
          devMajor: Math.floor((node.rdev ?? 0) / 256),
          devMinor: (node.rdev ?? 0) % 256,
        });
        break;
    }
  }
  bounds.leave();
}

/** The volume of a snapshot as an uncompressed tar stream. */
export function snapshotVolumeTar(repo: Repository, volume: SnapshotVolume, signal?: AbortSignal, pool?: ChunkPool): Readable {
  const prefix = Buffer.from(memberPrefixOf(volume.mountPath), 'utf8');
  async function* all(): AsyncGenerator<Buffer> {
    yield encodeHeader({ ...meta(volume.root), name: Buffer.concat([prefix, Buffer.from('/')]), type: '5', size: 0 });
    yield* treeEntries(repo, volume.tree, prefix, prefix, signal, pool, new TreeWalkBounds(volume));
    yield Buffer.alloc(BLOCK * 2);
  }
  return Readable.from(all(), { objectMode: false, highWaterMark: 1 << 20 });
}

/**
 * Reads every tree and every blob of a volume (decrypting and hashing each), so a damaged or
 * hostile snapshot is found before a restore touches anything: every tree is checked
 * (tree-guard.ts: names, values, sorted and unique, no cycle, bounded walk), every file's chunks
 * must add up to its size, and every hard link must name a regular file that comes earlier in the
 * walk. Returns what the volume holds; `onWarning` names what a restore will leave out.
 */
export async function verifySnapshotVolume(
  repo: Repository,
  volume: SnapshotVolume,
  options: {
    signal?: AbortSignal;
    onProgress?: (stats: TarStats) => void;
    pool?: ChunkPool;
    onWarning?: (message: string) => void;
  } = {},
): Promise<TarStats> {
  const stats: TarStats = { entries: 1, files: 0, bytes: 0 };
  const verified = new Set<string>();
  const bounds = new TreeWalkBounds(volume);
  const links: { path: Buffer[]; target: Buffer[] }[] = [];
  const blobs = blobChecker(repo, options.pool, options.signal);
  const walk = async (treeId: string, path: Buffer[]): Promise<void> => {
    const depth = bounds.depth;
    bounds.enter(treeId);
    const { tree, names } = await loadCheckedTree(repo, treeId);
    for (const [i, node] of tree.nodes.entries()) {
      options.signal?.throwIfAborted();
      const name = names[i]!;
      if (isReservedEntry(depth, name)) {
        options.onWarning?.(`not restored: ${name.toString('utf8')} (a cvat-backup working folder the backup caught)`);
        continue;
      }
      bounds.count();
      stats.entries++;
      if (node.type === 'dir' && node.subtree) await walk(node.subtree, [...path, name]);
      if (node.type !== 'file') continue;
      stats.files++;
      if (node.hardlink !== undefined) {
        links.push({ path: [...path, name], target: hardLinkTarget(node) });
        continue;
      }
      const content = node.content ?? [];
      const total = content.reduce((sum, ref) => sum + chunkLength(repo, ref), 0);
      if (total !== node.size) throw new CorruptArchiveError(`${[...path, name].map((p) => p.toString('utf8')).join('/')}: its chunks hold ${total} bytes, the file ${node.size}`);
      stats.bytes += node.size;
      for (const ref of content) {
        if (isZeroChunk(ref) || verified.has(ref)) continue;
        verified.add(ref);
        await blobs.add(ref);
      }
      options.onProgress?.({ ...stats });
    }
    bounds.leave();
  };
  try {
    checkRootNode(volume.root);
    await walk(volume.tree, []);
    await checkHardLinks(repo, volume, links);
  } catch (error) {
    await blobs.finish().catch(() => undefined); // nothing may still run; the first error is told
    throw error;
  }
  await blobs.finish();
  return stats;
}

/**
 * Checks data blobs as they are added (`add` waits while many are in flight and throws the first
 * failure; `finish` waits for the rest and throws it too). A local repository's blobs are read by
 * the workers straight from its packs, up to 8 at once; a remote one's by pack (pack-reads.ts),
 * several reads at once, kept on this machine for the writes that follow.
 */
function blobChecker(repo: Repository, pool: ChunkPool | undefined, signal: AbortSignal | undefined): { add(id: string): Promise<void>; finish(): Promise<void> } {
  if (repo.backend.localPath === undefined) return new PackReader(repo, { pool, signal });
  const inFlight = new Set<Promise<void>>();
  let failure: Error | undefined;
  return {
    add: async (id) => {
      while (inFlight.size >= 8) await Promise.race(inFlight);
      if (failure) throw failure;
      const tracked: Promise<void> = repo
        .checkBlob(id, pool)
        .then(
          () => undefined,
          (error: unknown) => {
            failure ??= error as Error;
          },
        )
        .finally(() => inFlight.delete(tracked));
      inFlight.add(tracked);
    },
    finish: async () => {
      await Promise.all(inFlight);
      if (failure) throw failure;
    },
  };
}

/** Checks every blob of `refs` (holes skipped) as a restore's verification does (a database dump's chunks). */
export async function verifyBlobs(repo: Repository, refs: string[], pool?: ChunkPool, signal?: AbortSignal): Promise<void> {
  const blobs = blobChecker(repo, pool, signal);
  const seen = new Set<string>();
  try {
    for (const ref of refs) {
      signal?.throwIfAborted();
      if (isZeroChunk(ref) || seen.has(ref)) continue;
      seen.add(ref);
      await blobs.add(ref);
    }
  } catch (error) {
    await blobs.finish().catch(() => undefined);
    throw error;
  }
  await blobs.finish();
}

/** Every hard link names a regular file (not itself a link) that the walk meets before the link. */
async function checkHardLinks(repo: Repository, volume: SnapshotVolume, links: { path: Buffer[]; target: Buffer[] }[]): Promise<void> {
  const trees = new Map<string, { tree: Tree; names: Buffer[] }>();
  const load = async (id: string): Promise<{ tree: Tree; names: Buffer[] }> => {
    let found = trees.get(id);
    if (!found) {
      found = await loadCheckedTree(repo, id);
      if (trees.size > 256) trees.clear();
      trees.set(id, found);
    }
    return found;
  };
  const resolved = new Map<string, boolean>();
  for (const { path, target } of links) {
    const show = (p: Buffer[]): string => p.map((c) => c.toString('utf8')).join('/');
    if (comparePreOrder(target, path) >= 0) throw new CorruptArchiveError(`hard link '${show(path)}' points at '${show(target)}', which does not come before it`);
    const key = target.map((c) => c.toString('latin1')).join('/');
    let ok = resolved.get(key);
    if (ok === undefined) {
      ok = false;
      let treeId: string | undefined = volume.tree;
      for (const [i, part] of target.entries()) {
        if (treeId === undefined) break;
        const { tree, names } = await load(treeId);
        const at = names.findIndex((n) => n.equals(part));
        const node = at === -1 ? undefined : tree.nodes[at];
        treeId = undefined;
        if (!node) break;
        if (i < target.length - 1) {
          if (node.type === 'dir') treeId = node.subtree;
        } else {
          ok = node.type === 'file' && node.hardlink === undefined;
        }
      }
      resolved.set(key, ok);
    }
    if (!ok) throw new CorruptArchiveError(`hard link '${show(path)}' points at '${show(target)}', which is not a regular file of this snapshot`);
  }
}
