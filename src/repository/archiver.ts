/**
 * Archiver: stores a volume folder into the repository as chunks and trees.
 *
 * Incremental: with the parent snapshot's tree of the same volume, a file whose size, mtime (ns),
 * ctime (ns) and inode are all unchanged keeps the parent's chunk list and is not read at all.
 * Every other file is read, cut by the content-defined chunker, and only chunks the repository
 * does not hold yet are stored. All-zero chunks are recorded as holes, not stored.
 *
 * Reading a volume that containers may change under us (we run as root, while CVAT runs):
 * nothing is reached by path. Each entry is looked up relative to its folder's handle without
 * following a link and without opening anything (O_PATH; its fstat is the listing: see
 * fs/beneath.ts); a folder or a small file is then opened through that handle, so exactly the
 * inode listed; a larger file, read after the folder is listed, is looked up again and must be
 * the same device and inode. So a folder swapped for a link, or a file swapped for a link, FIFO
 * or device, is never followed, opened or blocked on. FIFOs, devices and sockets are recorded
 * from the lookup and never opened. Worker threads read the descriptors this thread opened.
 *
 * An entry that is not what was listed (gone, another inode or type, a link now) or a file that
 * changed size while read is "changed": a tolerant pass (phase 1) leaves it for the next pass (a
 * file keeps no content; a folder or link is left out); any other pass looks at it once more
 * (lookup, open, read) and, if it changed again, leaves it out with a warning.
 *
 * Small files are read here with plain system calls and sealed on the workers in batches
 * (small-blobs.ts); larger ones are read and sealed on the workers, several files at once.
 *
 * With a change journal (fs/change-journal.ts: what changed since the parent pass began), the
 * final pass of a two-phase or --freeze backup visits only what changed (see changedFolder): a
 * folder neither changed nor above a changed one keeps the parent tree's node untouched (no
 * lookup, no tree load); in a folder on the way to a change only the changed names are looked up,
 * and a changed file is always read again (the journal saw a write: its size and mtime prove
 * nothing). What the parent pass saw and a journal does not tell (hard links, entries a tolerant
 * pass left for the next one, the counts of the whole tree) comes from that pass: PassFacts.
 *
 * Hard links and the journal: a change to one name of an inode changes every name's ctime (and a
 * write through one name changes every name's content), but the journal reports only the name it
 * went through, or no name at all (link counts). So the volume is walked in full when a changed
 * name is, or was at the parent pass, a name of an inode with several links; when a folder that
 * held such a name is gone, replaced or listed in full; and when an inode had links outside the
 * names the parent pass saw (a write through those is never reported here). The simplest rule that
 * is provably right; linked files elsewhere in the volume keep the journal.
 *
 * With the native helper (fs/native-walk.ts) a folder is listed in one call off this thread
 * (names and lstat of every entry), a few folders ahead of the one being archived; a listed
 * entry is then opened by name and must be the device and inode listed (else "changed", as
 * above), with the same rules: no link followed, no device or FIFO opened. Without it (or
 * `walk: 'plain'`) every entry is looked up as described above. Both make the same trees.
 */
import { closeSync, read as readCallback, readSync } from 'node:fs';
import type { BigIntStats } from 'node:fs';
import { promisify } from 'node:util';
import { changedError, DirHandle, isChangedError, isComponent, type EntryHandle } from '../fs/beneath.js';
import type { VolumeChanges } from '../fs/change-journal.js';
import { errnoName, nativeWalk, NUMS, TEXTS, type FolderListing, type NativeWalk } from '../fs/native-walk.js';
import { isReservedName, leaveOutOwnFolders } from '../archive/member-guard.js';
import { isAllZero } from './zero.js';
import { Chunker } from './chunker.js';
import type { Repository } from './repository.js';
import type { ChunkPool } from './chunk-pool.js';
import { SmallBlobBatches } from './small-blobs.js';
import { ZERO_PREFIX, type NodeType, type Tree, type TreeNode } from './tree.js';

const readFd = promisify(readCallback);

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
  /**
   * An entry left out of this pass's tree: it changed while it was read and again when it was
   * read a second time (never called in a tolerant pass). The message names its path.
   */
  onWarning?: (message: string) => void;
  /**
   * How folders are listed: 'native' (the default where the native helper is there: one call per
   * folder, off this thread, several folders ahead) or 'plain' (a lookup per entry on this
   * thread). Both give the same trees.
   */
  walk?: 'native' | 'plain';
}

/**
 * What a full walk saw that a later pass using a change journal needs (Archiver.passFacts). Paths
 * and names are as in fs/change-journal.ts: relative to the volume root, bytes as 'latin1'.
 */
export interface PassFacts {
  /** Entries, files and bytes of the tree below its root (the journal pass adjusts them). */
  totals: { entries: number; files: number; bytes: number };
  /** Every name of a regular file with several links. */
  linked: ReadonlySet<string>;
  /** Some inode had more links than names seen here (a name elsewhere, or one left out). */
  linksOutside: boolean;
  /** Folder -> names a tolerant pass left out or left without content: the next pass looks at them. */
  incomplete: ReadonlyMap<string, ReadonlySet<string>>;
}

/** The changes since the parent pass began, and that pass's facts: what a journal pass needs. */
export interface ChangesSinceParent {
  changes: VolumeChanges;
  parentPass: PassFacts;
}

export interface ArchiveResult {
  tree: string;
  /** The volume root itself. */
  root: TreeNode;
  /** Only with changes given: whether they were used, or why the volume was walked in full. */
  journal?: { used: true } | { used: false; reason: string };
}

/** How much of the volume a pass looked at (the journal pass exists to keep these small). */
export interface VisitCounts {
  /** Folders listed in full (readdir). */
  foldersListed: number;
  /** Entries looked up (one lstat-like system call each). */
  lookups: number;
  /** Tree blobs of the parent pass loaded. */
  treesLoaded: number;
}

/** A journal pass cannot be trusted for this volume (caught in archive: full walk). */
class FullWalkNeeded extends Error {}

/** The changes a journal pass follows (Archiver.journalPlan). Keys and names: 'latin1'. */
interface JournalPlan {
  /** Folder -> changed names, or 'all': the journal's, and what the parent pass left for this one. */
  folders: ReadonlyMap<string, ReadonlySet<string> | 'all'>;
  /** Folder -> names of its sub-folders on the way to a changed folder. */
  onPath: ReadonlyMap<string, ReadonlySet<string>>;
  /** Every name of a file with several links at the parent pass. */
  linked: ReadonlySet<string>;
  /** The same, and every folder above one. */
  linkedOrAbove: ReadonlySet<string>;
}

/** Kept nodes (in name order, as in their tree) and fresh ones (in name order) as one list in name order. */
function mergeByName(kept: TreeNode[], fresh: { node: TreeNode; name: Buffer }[]): TreeNode[] {
  const out: TreeNode[] = [];
  let k = 0;
  for (const { node, name } of fresh) {
    while (k < kept.length && Buffer.compare(Buffer.from(kept[k]!.name, 'base64'), name) < 0) out.push(kept[k++]!);
    out.push(node);
  }
  while (k < kept.length) out.push(kept[k++]!);
  return out;
}

const SLASH = Buffer.from('/');

function childPath(relative: Buffer, name: Buffer): Buffer {
  return relative.length === 0 ? name : Buffer.concat([relative, SLASH, name]);
}

/** Files up to this size are read synchronously (see fileContent). */
const TINY_FILE = 64 * 1024;

/** Reads a file expected to hold `size` bytes; one byte more is asked for, so growth shows. */
function readTinyFile(fd: number, size: number): Buffer {
  const buffer = Buffer.allocUnsafe(size + 1);
  let read = 0;
  for (;;) {
    const n = readSync(fd, buffer, read, buffer.length - read, read);
    read += n;
    if (n === 0 || read === buffer.length) break;
  }
  return buffer.subarray(0, read);
}

/** As readTinyFile, through the thread pool (files between TINY_FILE and the chunker's minimum). */
async function readSmallFile(fd: number, size: number): Promise<Buffer> {
  const buffer = Buffer.allocUnsafe(size + 1);
  let read = 0;
  for (;;) {
    const { bytesRead } = await readFd(fd, buffer, read, buffer.length - read, read);
    read += bytesRead;
    if (bytesRead === 0 || read === buffer.length) break;
  }
  return buffer.subarray(0, read);
}

function changedSize(size: number, read: number): Error {
  return Object.assign(new Error(`a file of ${size} bytes changed size while it was read (${read} bytes)`), { code: 'ECHANGED' });
}

/** A folder being archived: its handle, its path in the volume, its node in the parent tree. */
interface Folder {
  dir: DirHandle;
  relative: Buffer;
  parentNodes: Map<string, TreeNode>;
  /** The parent tree's id and nodes (its blob is this folder's tree if every node is reused). */
  parentTree: string | undefined;
  parent: Tree | undefined;
  /** Per node type: whether the parent tree's nodes have baseNode's key order (see reusable()). */
  keyOrder: Map<NodeType, boolean>;
}

/** The keys of a file node with content and of a folder node, in the order this file sets them. */
const NODE_KEYS: Partial<Record<NodeType, string>> = {
  file: 'name,type,mode,uid,gid,mtimeNs,ctimeNs,inode,size,content',
  dir: 'name,type,mode,uid,gid,mtimeNs,ctimeNs,inode,size,subtree',
};

/** A file of a folder whose content is read after the folder is listed, several at once. */
interface PendingRead {
  slot: number;
  name: Buffer;
  /** Opens it again by name, checked to be the inode listed (code ECHANGED if not). */
  reopen: () => number;
  node: TreeNode;
}

/** A folder opened, and its listing and parent tree asked for, before its turn (native walk). */
interface FolderAhead {
  dir: DirHandle;
  listing: Promise<FolderListing>;
  /** The parent tree's JSON. */
  parent: Promise<Buffer | undefined>;
  /** Closed before its turn (a failure before it): its listing, if not started yet, never starts. */
  abandoned?: boolean;
}

/**
 * An entry as listed (an O_PATH handle's fstat, or a line of a native listing): its node's
 * metadata, and the checked ways to open exactly the inode listed.
 */
interface Listed {
  /** undefined: a socket (left out). */
  type: NodeType | undefined;
  /** Owner, mode, times, inode, size: the node without content, subtree, target or link. */
  node: TreeNode | undefined;
  nlink: number;
  rdev: number;
  /** Device and inode, as the key of hard links. */
  inodeKey: string;
  /** A folder's handle (the listed one; else code ECHANGED). */
  openDir(): DirHandle;
  /** A regular file opened for reading (the listed one; else code ECHANGED). */
  openFile(): number;
  /** For later, when the listing's handle is closed: opens the name again, checked. */
  reopenFile(): number;
  close(): void;
  /** A folder started ahead (its handle is the one openDir returns). */
  ahead?: FolderAhead | undefined;
}

/** Folders of a folder opened and listed ahead of their turn (native walk). */
const FOLDERS_AHEAD = 4;

const S_IFMT = 0o170000;

function typeOfMode(mode: number): NodeType | undefined {
  switch (mode & S_IFMT) {
    case 0o100000:
      return 'file';
    case 0o040000:
      return 'dir';
    case 0o120000:
      return 'symlink';
    case 0o010000:
      return 'fifo';
    case 0o020000:
      return 'chardev';
    case 0o060000:
      return 'blockdev';
    default:
      return undefined;
  }
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
  /** Errors of repository calls: never taken for a change in the volume (a missing pack is ENOENT too). */
  private readonly repositoryErrors = new WeakSet<object>();
  private lastReport = 0;
  private readonly walk: NativeWalk | undefined;
  readonly visits: VisitCounts = { foldersListed: 0, lookups: 0, treesLoaded: 0 };
  /** Names of files with several links seen by this pass, per inode (for PassFacts). */
  private readonly linkNames = new Map<string, { nlink: bigint; paths: Set<string> }>();
  /** Folder -> names this tolerant pass left out or without content (for PassFacts). */
  private readonly incomplete = new Map<string, Set<string>>();
  private facts: PassFacts | undefined;

  /** Small files' bytes on their way to the workers to be sealed (only with a pool). */
  private readonly small: SmallBlobBatches | undefined;

  constructor(
    private readonly repo: Repository,
    private readonly options: ArchiveOptions = {},
  ) {
    this.walk = options.walk === 'plain' ? undefined : nativeWalk();
    this.small =
      options.pool &&
      new SmallBlobBatches(options.pool, {
        storeSealed: async (id, sealed, rawLength) => {
          const added = await this.inRepository(repo.saveSealedBlob(id, 'data', sealed, rawLength));
          this.stats.bytesAdded += added;
        },
        storeHere: async (data) => {
          const saved = await this.inRepository(repo.saveBlob('data', data));
          this.stats.bytesAdded += saved.added;
          return saved.id;
        },
      });
  }

  private report(force = false): void {
    const now = Date.now();
    if (!force && now - this.lastReport < 200) return;
    this.lastReport = now;
    this.options.onProgress?.({ ...this.stats });
  }

  /**
   * Archives the folder `root` (a trusted path: the volume's mount point); returns the id of its
   * tree blob. With `changes` (everything changed since `parentTree`'s pass began), only what
   * changed is visited, unless the changes cannot be trusted for this volume (hard links: see the
   * file header): then it is walked in full, and `journal` says why.
   */
  async archive(root: string, parentTree: string | undefined, changes?: ChangesSinceParent): Promise<ArchiveResult> {
    const dir = await DirHandle.openRoot(root);
    try {
      const st = await dir.stat();
      let journal: ArchiveResult['journal'];
      let tree: string | undefined;
      if (changes !== undefined) {
        try {
          if (parentTree === undefined) throw new FullWalkNeeded('no parent tree');
          const plan = this.journalPlan(changes);
          // The parent's tree as it is, every file unchanged; what the pass replaces is taken out.
          const { entries, files, bytes } = changes.parentPass.totals;
          Object.assign(this.stats, { entries, files, bytes, filesUnchanged: files });
          tree = await this.changedFolder(dir, Buffer.alloc(0), parentTree, plan);
          // A file with several links met anywhere (also in a new folder walked in full).
          if (this.linkNames.size > 0) throw new FullWalkNeeded(`'${[...[...this.linkNames.values()][0]!.paths][0]}' has several hard links`);
          journal = { used: true };
        } catch (error) {
          if (!(error instanceof FullWalkNeeded)) throw error;
          journal = { used: false, reason: error.message };
          tree = undefined;
          this.restart();
        }
      }
      if (tree === undefined) {
        tree = await this.folder(dir, Buffer.alloc(0), parentTree);
        this.facts = this.factsOfWalk();
      }
      this.report(true);
      return { tree, root: this.baseNode(Buffer.alloc(0), st, 'dir'), ...(journal ? { journal } : {}) };
    } finally {
      await dir.close();
    }
  }

  /** What this pass saw that a later journal pass needs; undefined unless it walked in full. */
  get passFacts(): PassFacts | undefined {
    return this.facts;
  }

  private factsOfWalk(): PassFacts {
    const linked = new Set<string>();
    let linksOutside = false;
    for (const { nlink, paths } of this.linkNames.values()) {
      for (const p of paths) linked.add(p);
      if (BigInt(paths.size) < nlink) linksOutside = true;
    }
    return { totals: { entries: this.stats.entries, files: this.stats.files, bytes: this.stats.bytes }, linked, linksOutside, incomplete: this.incomplete };
  }

  /** Forgets a journal pass given up on (what it stored stays stored: blobs are deduplicated). */
  private restart(): void {
    Object.assign(this.stats, { entries: 0, files: 0, bytes: 0, filesUnchanged: 0 });
    this.seenInodes.clear();
    this.linkNames.clear();
    this.incomplete.clear();
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

  /** Adds (or, for a node replaced or left out, takes back) a node's share of the stats. */
  private count(node: TreeNode, sign: 1 | -1): void {
    this.stats.entries += sign;
    if (node.type !== 'file') return;
    this.stats.files += sign;
    this.stats.bytes += sign * node.size;
  }

  private async inRepository<T>(call: Promise<T>): Promise<T> {
    try {
      return await call;
    } catch (error) {
      if (typeof error === 'object' && error !== null) this.repositoryErrors.add(error);
      throw error;
    }
  }

  /** The entry is not what was listed (see isChangedError), as opposed to any other failure. */
  private isChange(error: unknown): boolean {
    return isChangedError(error) && !this.repositoryErrors.has(error as object);
  }

  /** A file read whole on this thread as one chunk (see fileContent). */
  private isTiny(size: number): boolean {
    return size <= TINY_FILE && size < this.repo.config.chunker.minSize;
  }

  private isRacy(node: TreeNode): boolean {
    const since = this.options.racySinceNs;
    return since !== undefined && (BigInt(node.mtimeNs) >= since || BigInt(node.ctimeNs) >= since);
  }

  /** The parent tree of a folder walked in full (counted in countVisit). */
  private async loadParentTree(id: string | undefined): Promise<Tree | undefined> {
    const json = await this.loadTreeJson(id);
    return json && (JSON.parse(json.toString('utf8')) as Tree);
  }

  /**
   * A parent tree's JSON: read, authenticated and unpacked on a worker when there are workers and
   * the repository is local (the worker keeps recent pack files open; a walk asks for one tree per
   * folder, and here each would cost this thread an open, a read, a close and the decryption).
   */
  private async loadTreeJson(id: string | undefined): Promise<Buffer | undefined> {
    return id ? this.inRepository(this.repo.loadBlob(id, this.options.pool)) : undefined;
  }

  private async folder(dir: DirHandle, relative: Buffer, parentTree: string | undefined, ahead?: FolderAhead): Promise<string> {
    if (this.walk) return this.listedFolder(this.walk, dir, relative, parentTree, ahead);
    const parent = await this.loadParentTree(parentTree);
    const f: Folder = { dir, relative, parentNodes: new Map(parent?.nodes.map((n) => [n.name, n])), parentTree, parent, keyOrder: new Map() };
    const names = leaveOutOwnFolders(await dir.readdir(), relative.length === 0, this.options.onWarning).sort((a, b) => Buffer.compare(a, b));
    this.countVisit(names.length, parent !== undefined);
    /** One slot per name, in name order; undefined: left out. */
    const slots: (TreeNode | undefined)[] = [];
    /** Files of this folder to read once it is listed, several at once when workers are there. */
    const reads: PendingRead[] = [];
    for (const [index, name] of names.entries()) {
      this.options.signal?.throwIfAborted();
      let node: TreeNode | undefined;
      try {
        // Plain system calls: a lookup costs this thread less than a hop through the thread pool.
        node = await this.entry(f, name, this.handleListed(f, name, f.dir.lookupSync(name)), { linkable: true, defer: (read) => reads.push({ ...read, slot: index }) });
      } catch (error) {
        node = await this.changed(f, name, error);
      }
      slots.push(node);
      this.report();
    }
    return this.finishFolder(f, reads, slots, () => names);
  }

  /** Reads the folder's deferred files, then stores its tree. `names`: the name of each slot. */
  private async finishFolder(f: Folder, reads: PendingRead[], slots: (TreeNode | undefined)[], names: () => Buffer[]): Promise<string> {
    await this.readPending(f, reads, slots);
    if (this.options.tolerateChanges) this.noteIncomplete(f.relative, names(), slots);
    // The tree names its small files' blobs: they must all be sealed and stored first.
    await this.small?.drain();
    const nodes = slots.filter((n): n is TreeNode => n !== undefined);
    // Every node the parent's own, in its order: the tree is the parent's, byte for byte (it is
    // JSON.stringify of what JSON.parse made of it), so it needs neither a stringify nor a hash.
    const parentNodes = f.parent?.nodes;
    if (f.parentTree !== undefined && parentNodes?.length === nodes.length && nodes.every((n, i) => n === parentNodes[i])) return f.parentTree;
    const saved = await this.inRepository(this.repo.saveBlob('tree', Buffer.from(JSON.stringify({ nodes } satisfies Tree))));
    this.stats.bytesAdded += saved.added;
    return saved.id;
  }

  /** An entry looked up through an O_PATH handle (the plain walk, and every second look). */
  private handleListed(f: Folder, name: Buffer, handle: EntryHandle): Listed {
    const st = handle.stat;
    const type = nodeType(st);
    return {
      type,
      node: type && this.baseNode(name, st, type),
      nlink: Number(st.nlink),
      rdev: Number(st.rdev),
      inodeKey: `${st.dev}:${st.ino}`,
      openDir: () => handle.openDirSync(),
      openFile: () => handle.openFileSync(),
      reopenFile: () => f.dir.openFileSync(name, { dev: st.dev, ino: st.ino }).fd,
      close: () => handle.closeSync(),
    };
  }

  /**
   * A folder listed by the native helper: one call lists it (names and lstat of every entry, off
   * this thread), and the next FOLDERS_AHEAD sub-folders are opened and listed, and their parent
   * trees loaded, while this thread builds the nodes; they are still archived one after the
   * other, in tree order, so the trees (and the first name of every hard link) are those of the
   * plain walk.
   *
   * A folder whose listing is its parent tree node for node (sameAsParent: files with one link,
   * not racy, and folders, each at the same place with the same metadata, in the same JSON) is
   * not parsed: its files keep the parent's nodes as they are, only its folders are walked, and if
   * their trees are the parent's too, so is this folder's (the same bytes, so the same id).
   */
  private async listedFolder(walk: NativeWalk, dir: DirHandle, relative: Buffer, parentTree: string | undefined, ahead: FolderAhead | undefined): Promise<string> {
    const atRoot = relative.length === 0;
    const parentJson = await (ahead?.parent ?? this.loadTreeJson(parentTree));
    const listing = await (ahead?.listing ?? this.listWithParent(walk, dir.fd, atRoot ? undefined : parentJson));
    // Offsets of the parent's node texts, when the listing is the parent tree (not at the root,
    // where the tool's own folders are left out).
    const same = parentJson && !atRoot ? listing.same : null;
    const parentText = same ? parentJson!.toString('latin1') : '';
    const parent = same ? undefined : parentJson && (JSON.parse(parentJson.toString('utf8')) as Tree);
    const parentNodes = new Map(parent?.nodes.map((n) => [n.name, n]));
    const { count, names, nameEnds, textEnds, nums } = listing;
    const folders: number[] = [];
    for (let i = 0; i < count; i++) if ((nums[i * NUMS]! & S_IFMT) === 0o040000 && nums[i * NUMS + 6] === 0) folders.push(i);
    // The same as the parent: only the folders' nodes are needed (to walk them).
    if (same) {
      for (const i of folders) {
        const node = JSON.parse(parentText.slice(same[2 * i], same[2 * i + 1])) as TreeNode;
        parentNodes.set(node.name, node);
      }
    }
    const f: Folder = { dir, relative, parentNodes, parentTree, parent, keyOrder: new Map() };
    this.countVisit(count, parentJson !== undefined);
    /** The listing's entry of each slot. */
    const slotEntries: number[] = [];
    // One string for the folder; each field is a slice of it.
    const text = listing.text.toString('latin1');
    const slots: (TreeNode | undefined)[] = [];
    const reads: PendingRead[] = [];
    const started = new Map<number, FolderAhead | { error: unknown }>();
    let nextAhead = 0;
    const startAhead = (upTo: number): void => {
      for (; nextAhead < Math.min(upTo, folders.length); nextAhead++) {
        const i = folders[nextAhead]!;
        const t = i * TEXTS;
        try {
          const fd = walk.openListed(dir.fd, names.subarray(i === 0 ? 0 : nameEnds[i - 1], nameEnds[i]), text.slice(textEnds[t + 3], textEnds[t + 4]), text.slice(textEnds[t + 2], textEnds[t + 3]), true);
          const sub = DirHandle.fromFd(fd);
          const before = f.parentNodes.get(text.slice(t === 0 ? 0 : textEnds[t - 1], textEnds[t]));
          // The tree first: the listing compares itself with it in the same job (sameAsParent).
          const parent = this.loadTreeJson(before?.type === 'dir' ? before.subtree : undefined);
          const a: FolderAhead = {
            dir: sub,
            // Not once the folder is closed: its number may be another folder's by then.
            listing: parent.then((json) => (a.abandoned ? Promise.reject(new Error('closed before its turn')) : this.listWithParent(walk, fd, json))),
            parent,
          };
          // Awaited at its turn; a folder whose turn never comes (a failure before it) must not
          // leave an unhandled rejection.
          a.listing.catch(() => undefined);
          a.parent.catch(() => undefined);
          started.set(i, a);
        } catch (error) {
          started.set(i, { error });
        }
      }
    };
    let foldersDone = 0;
    /** With `same`: every folder's node came back as the parent's. */
    let allSame = true;
    startAhead(FOLDERS_AHEAD);
    try {
      for (let i = 0; i < count; i++) {
        this.options.signal?.throwIfAborted();
        if (same && (nums[i * NUMS]! & S_IFMT) !== 0o040000) {
          // A file the same as in the parent: its node is the parent's (taken below if needed).
          this.stats.entries++;
          this.stats.files++;
          this.stats.bytes += nums[i * NUMS + 3]!;
          this.stats.filesUnchanged++;
          slotEntries.push(i);
          slots.push(undefined);
          this.report();
          continue;
        }
        const name = names.subarray(i === 0 ? 0 : nameEnds[i - 1], nameEnds[i]);
        if (atRoot && leaveOutOwnFolders([name], true, this.options.onWarning).length === 0) continue;
        let a: FolderAhead | { error: unknown } | undefined;
        if (started.has(i)) {
          a = started.get(i);
          started.delete(i);
          startAhead(++foldersDone + FOLDERS_AHEAD);
        }
        const slot = slots.length;
        let node: TreeNode | undefined;
        try {
          const listed = this.nativeListed(walk, f, listing, text, i, name, a);
          node = await this.entry(f, name, listed, { linkable: true, defer: (read) => reads.push({ ...read, slot }) });
        } catch (error) {
          node = await this.changed(f, name, error);
        } finally {
          if (a !== undefined && 'dir' in a) a.dir.closeSync(); // closed already unless entry() failed before opening it
        }
        if (same && (node === undefined || node !== f.parentNodes.get(node.name))) allSame = false;
        slotEntries.push(i);
        slots.push(node);
        this.report();
      }
    } finally {
      for (const a of started.values()) {
        if (!('dir' in a)) continue;
        a.abandoned = true;
        a.dir.closeSync();
      }
    }
    if (same) {
      if (allSame) return parentTree!;
      // A folder below changed: the files' nodes are the parent's, as JSON.parse makes them.
      for (let i = 0; i < count; i++) if (slots[i] === undefined && (nums[i * NUMS]! & S_IFMT) !== 0o040000) slots[i] = JSON.parse(parentText.slice(same[2 * i], same[2 * i + 1])) as TreeNode;
    }
    return this.finishFolder(f, reads, slots, () => slotEntries.map((i) => names.subarray(i === 0 ? 0 : nameEnds[i - 1], nameEnds[i])));
  }

  /** Lists the open folder `fd` and, given its parent tree, compares the two in the same job. */
  private listWithParent(walk: NativeWalk, fd: number, parentJson: Buffer | undefined): Promise<FolderListing> {
    return parentJson ? walk.listFolder(fd, parentJson, this.options.racySinceNs ?? null) : walk.listFolder(fd);
  }

  /** Entry `i` of a native listing; throws its lstat's error (a changed error if it is gone). */
  private nativeListed(walk: NativeWalk, f: Folder, listing: FolderListing, text: string, i: number, name: Buffer, ahead: FolderAhead | { error: unknown } | undefined): Listed {
    const { nums, textEnds } = listing;
    const o = i * NUMS;
    const errno = nums[o + 6]!;
    if (errno !== 0) {
      const code = errnoName(errno);
      const error = Object.assign(new Error(`lstat '${name.toString()}': ${code}`), { code });
      if (isChangedError(error)) throw Object.assign(changedError(`'${name.toString()}'`), { cause: error });
      throw error;
    }
    const t = i * TEXTS;
    const mode = nums[o]!;
    const type = typeOfMode(mode);
    const dev = text.slice(textEnds[t + 3], textEnds[t + 4]);
    const ino = text.slice(textEnds[t + 2], textEnds[t + 3]);
    // Keys in baseNode's order: the tree's bytes are the plain walk's.
    const node: TreeNode | undefined = type && {
      name: text.slice(t === 0 ? 0 : textEnds[t - 1], textEnds[t]),
      type,
      mode: mode & 0o7777,
      uid: nums[o + 1]!,
      gid: nums[o + 2]!,
      mtimeNs: text.slice(textEnds[t], textEnds[t + 1]),
      ctimeNs: text.slice(textEnds[t + 1], textEnds[t + 2]),
      inode: ino,
      size: type === 'file' ? nums[o + 3]! : 0,
    };
    const open = (): number => walk.openListed(f.dir.fd, name, dev, ino, false);
    return {
      type,
      node,
      nlink: nums[o + 4]!,
      rdev: nums[o + 5]!,
      inodeKey: `${dev}:${ino}`,
      openDir: () => {
        if (ahead === undefined) return DirHandle.fromFd(walk.openListed(f.dir.fd, name, dev, ino, true));
        if ('error' in ahead) throw ahead.error;
        return ahead.dir;
      },
      openFile: open,
      reopenFile: open,
      close: () => undefined,
      ahead: ahead && 'dir' in ahead ? ahead : undefined,
    };
  }

  /**
   * The node of the entry `name`, looked up as `listed` (closed here). A folder is archived
   * (recursively), a link's target read; a file's content is read now (small files: through
   * `listed`, so exactly the inode listed), or handed to `defer` to be read with others. Throws a
   * changed error (isChangedError) when the entry is not what `listed` says any more.
   *
   * `linkable`: a file with several links may be recorded as a hard link to a name met before it,
   * or become the first name of its inode. Only while the walk is in tree order (not when a
   * deferred read is repeated): a restore creates the first name before the others.
   */
  private async entry(
    f: Folder,
    name: Buffer,
    listed: Listed,
    how: { linkable: boolean; defer?: (read: Omit<PendingRead, 'slot'>) => void },
  ): Promise<TreeNode | undefined> {
    try {
      const { type, node } = listed;
      if (type === undefined || node === undefined) return undefined; // sockets
      const rel = (): Buffer => (f.relative.length === 0 ? name : Buffer.concat([f.relative, Buffer.from('/'), name]));
      const before = f.parentNodes.get(node.name);
      let result = node;
      if (type === 'dir') {
        const sub = listed.openDir();
        listed.close();
        try {
          node.subtree = await this.folder(sub, rel(), before?.type === 'dir' ? before.subtree : undefined, listed.ahead);
        } finally {
          await sub.close();
        }
        if (before?.type === 'dir' && before.subtree === node.subtree && this.reusable(f, before, node)) result = before;
      } else if (type === 'symlink') {
        node.target = (await f.dir.readListedLink(name)).toString('base64');
      } else if (type === 'chardev' || type === 'blockdev') {
        node.rdev = listed.rdev;
      } else if (type === 'file') {
        const inodeKey = listed.inodeKey;
        if (listed.nlink > 1) this.noteLink(inodeKey, BigInt(listed.nlink), rel());
        const linked = how.linkable && listed.nlink > 1;
        const first = linked ? this.seenInodes.get(inodeKey) : undefined;
        const unchanged =
          before?.type === 'file' &&
          before.content !== undefined &&
          before.size === node.size &&
          before.mtimeNs === node.mtimeNs &&
          before.ctimeNs === node.ctimeNs &&
          before.inode === node.inode &&
          !this.isRacy(node);
        if (first !== undefined) {
          node.hardlink = first;
        } else if (unchanged && before.content) {
          node.content = before.content;
          this.stats.filesUnchanged++;
          if (this.reusable(f, before, node)) result = before;
        } else if (how.defer && !linked && !this.isTiny(node.size)) {
          listed.close(); // not kept open while waiting: a folder may hold millions of files
          how.defer({ name, reopen: () => listed.reopenFile(), node });
        } else {
          // Read now: a tiny file (cheaper than a second lookup later), or the first name of an
          // inode with several (were it left out, the names that follow must not point at it).
          const content = await this.readContent(() => listed.openFile(), node.size);
          if (content !== undefined) node.content = content;
        }
        if (linked && first === undefined) this.seenInodes.set(inodeKey, rel().toString('base64'));
      }
      this.count(result, 1);
      return result;
    } finally {
      listed.close();
    }
  }

  /**
   * True if the parent's node `before` can stand for `node` (the same metadata, content or
   * subtree): it then serialises to the same bytes as long as its keys are in this file's order,
   * checked once per folder and node type (a tree's nodes of a type were all written alike).
   * Reusing it spares an object, and lets an unchanged folder keep its parent's tree as is.
   */
  private reusable(f: Folder, before: TreeNode, node: TreeNode): boolean {
    if (
      before.mode !== node.mode ||
      before.uid !== node.uid ||
      before.gid !== node.gid ||
      before.mtimeNs !== node.mtimeNs ||
      before.ctimeNs !== node.ctimeNs ||
      before.inode !== node.inode ||
      before.size !== node.size
    ) {
      return false;
    }
    let ordered = f.keyOrder.get(node.type);
    if (ordered === undefined) {
      ordered = Object.keys(before).join(',') === NODE_KEYS[node.type];
      f.keyOrder.set(node.type, ordered);
    }
    return ordered;
  }

  /**
   * An entry that changed while it was looked at: a tolerant pass leaves it for the next pass;
   * otherwise it is looked at once more, and left out with a warning if it changed again.
   */
  private async changed(f: Folder, name: Buffer, error: unknown, linkable = true): Promise<TreeNode | undefined> {
    if (!this.isChange(error)) throw error;
    if (this.options.tolerateChanges) return undefined;
    try {
      return await this.entry(f, name, this.handleListed(f, name, f.dir.lookupSync(name)), { linkable });
    } catch (again) {
      if (!this.isChange(again)) throw again;
      const rel = f.relative.length === 0 ? name : Buffer.concat([f.relative, Buffer.from('/'), name]);
      this.options.onWarning?.(`'${rel.toString('utf8')}' changed while it was read, and again when read a second time: left out of this backup`);
      return undefined;
    }
  }

  private countVisit(names: number, treeLoaded: boolean): void {
    this.visits.foldersListed++;
    this.visits.lookups += names;
    if (treeLoaded) this.visits.treesLoaded++;
  }

  private noteLink(inodeKey: string, nlink: bigint, rel: Buffer): void {
    let seen = this.linkNames.get(inodeKey);
    if (!seen) this.linkNames.set(inodeKey, (seen = { nlink, paths: new Set() }));
    if (nlink > seen.nlink) seen.nlink = nlink;
    seen.paths.add(rel.toString('latin1'));
  }

  /** A tolerant pass's names left out, or files left without content: the next pass must look at them. */
  private noteIncomplete(relative: Buffer, names: Buffer[], slots: (TreeNode | undefined)[]): void {
    for (const [index, name] of names.entries()) {
      const node = slots[index];
      if (node !== undefined && (node.type !== 'file' || node.content !== undefined || node.hardlink !== undefined)) continue;
      const key = relative.toString('latin1');
      let set = this.incomplete.get(key);
      if (!set) this.incomplete.set(key, (set = new Set()));
      set.add(name.toString('latin1'));
    }
  }

  private async loadTree(id: string): Promise<Tree> {
    this.visits.treesLoaded++;
    return JSON.parse((await this.inRepository(this.repo.loadBlob(id))).toString('utf8')) as Tree;
  }

  /** Takes a parent node (and, for a folder, everything below it) out of the counts of a journal pass. */
  private async uncount(node: TreeNode, withSubtree: boolean): Promise<void> {
    this.count(node, -1);
    if (node.type === 'file') this.stats.filesUnchanged--;
    if (withSubtree && node.type === 'dir' && node.subtree !== undefined) {
      for (const child of (await this.loadTree(node.subtree)).nodes) await this.uncount(child, true);
    }
  }

  /**
   * The journal's changes merged with what the parent pass left for this one, and what decides
   * between the journal and a full walk before anything is read. Throws FullWalkNeeded.
   */
  private journalPlan(input: ChangesSinceParent): JournalPlan {
    const { changes, parentPass } = input;
    if (parentPass.linksOutside) throw new FullWalkNeeded('a file has hard links outside what the last pass saw');
    const folders = new Map<string, Set<string> | 'all'>();
    const add = (folder: string, names: ReadonlySet<string> | 'all'): void => {
      const had = folders.get(folder);
      if (had === 'all') return;
      if (names === 'all') return void folders.set(folder, 'all');
      if (had === undefined) folders.set(folder, new Set(names));
      else for (const n of names) had.add(n);
    };
    for (const [folder, names] of changes.folders) add(folder, names);
    for (const [folder, names] of parentPass.incomplete) add(folder, names);
    // A changed name that is linked gives up; so does a folder above one that is gone, replaced
    // or listed in full (a folder whose own metadata or listing changed is recursed into).
    const linked = parentPass.linked;
    const linkedOrAbove = new Set<string>();
    for (const path of parentPass.linked) {
      for (let end = path.length; end > 0; end = path.lastIndexOf('/', end - 1)) linkedOrAbove.add(path.slice(0, end));
      linkedOrAbove.add('');
    }
    const onPath = new Map<string, Set<string>>();
    for (const [folder, names] of folders) {
      if (names === 'all' ? linkedOrAbove.has(folder) : [...names].some((n) => linked.has(folder === '' ? n : `${folder}/${n}`))) {
        throw new FullWalkNeeded(`a changed entry in '${Buffer.from(folder, 'latin1').toString('utf8') || '.'}' is, or holds, a file with several hard links`);
      }
      if (names !== 'all') {
        for (const n of names) if (!isComponent(Buffer.from(n, 'latin1'))) throw new FullWalkNeeded(`the change journal named an invalid entry in '${folder}'`);
      }
      // The folders above this one, each with the name of its child on the way down.
      for (let child = folder; child !== ''; ) {
        const cut = child.lastIndexOf('/');
        const above = cut < 0 ? '' : child.slice(0, cut);
        let set = onPath.get(above);
        if (!set) onPath.set(above, (set = new Set()));
        set.add(child.slice(cut + 1));
        child = above;
      }
    }
    return { folders, onPath, linked, linkedOrAbove };
  }

  /**
   * A folder on the way to a change, with the journal (see the file header): the parent pass's
   * tree with only the changed names looked up again. Same trust rules as folder(): everything is
   * reached through `dir`; an entry that changes while it is read is looked at once more, then
   * left out with a warning. Throws FullWalkNeeded for a file with several links.
   */
  private async changedFolder(dir: DirHandle, relative: Buffer, parentTree: string, plan: JournalPlan): Promise<string> {
    const key = relative.toString('latin1');
    const changed = plan.folders.get(key);
    if (changed === 'all') {
      // Listed in full, as without a journal (the parent's nodes are compared by metadata then).
      for (const node of (await this.loadTree(parentTree)).nodes) await this.uncount(node, true);
      return this.folder(dir, relative, parentTree);
    }
    const parent = await this.loadTree(parentTree);
    const before = new Map(parent.nodes.map((n) => [n.name, n]));
    /** base64 name -> name bytes, of every name looked up here. */
    const look = new Map<string, Buffer>();
    // The changed names, and the folders on the way to a change (the same folder: recursed into).
    for (const n of [...(changed ?? []), ...(plan.onPath.get(key) ?? [])]) look.set(Buffer.from(n, 'latin1').toString('base64'), Buffer.from(n, 'latin1'));
    // A file the parent pass left without content is read, whatever the journal says.
    for (const node of parent.nodes) {
      if (node.type === 'file' && node.content === undefined && node.hardlink === undefined && !look.has(node.name)) {
        if (plan.linked.has(childPath(relative, Buffer.from(node.name, 'base64')).toString('latin1'))) throw new FullWalkNeeded('a file left for this pass has several hard links');
        look.set(node.name, Buffer.from(node.name, 'base64'));
      }
    }
    const names = [...look.values()].sort((a, b) => Buffer.compare(a, b));
    // Nothing of the parent's is reused for a name looked up: a changed file is always read.
    const f: Folder = { dir, relative, parentNodes: new Map(), parentTree: undefined, parent: undefined, keyOrder: new Map() };
    const slots: (TreeNode | undefined)[] = [];
    const reads: PendingRead[] = [];
    for (const [index, name] of names.entries()) {
      this.options.signal?.throwIfAborted();
      const b64 = name.toString('base64');
      const old = before.get(b64);
      let node: TreeNode | undefined;
      let listed: EntryHandle;
      this.visits.lookups++;
      try {
        listed = f.dir.lookupSync(name);
      } catch (error) {
        if (!this.isChange(error)) throw error;
        // Gone (a name that is not there now is not in the tree: no warning, as not listed).
        if (old?.type === 'dir' && plan.linkedOrAbove.has(childPath(relative, name).toString('latin1'))) {
          throw new FullWalkNeeded(`'${childPath(relative, name).toString('utf8')}' is gone and held files with several hard links`);
        }
        if (old) await this.uncount(old, true);
        slots.push(undefined);
        continue;
      }
      const st = listed.stat;
      const rel = childPath(relative, name);
      if (st.isFile() && st.nlink > 1n) {
        listed.closeSync();
        throw new FullWalkNeeded(`'${rel.toString('utf8')}' has several hard links`);
      }
      if (relative.length === 0 && isReservedName(name)) {
        listed.closeSync();
        if (old) await this.uncount(old, true);
        leaveOutOwnFolders([name], true, this.options.onWarning);
        slots.push(undefined);
        continue;
      }
      const sameFolder = st.isDirectory() && old?.type === 'dir' && old.subtree !== undefined && old.inode === st.ino.toString();
      if (old?.type === 'dir' && !sameFolder && plan.linkedOrAbove.has(rel.toString('latin1'))) {
        listed.closeSync();
        throw new FullWalkNeeded(`'${rel.toString('utf8')}' was replaced and held files with several hard links`);
      }
      if (sameFolder) {
        // A folder of the parent's (same inode): only what changed in it is looked at.
        let sub: DirHandle | undefined;
        let openError: unknown;
        try {
          sub = listed.openDirSync();
        } catch (error) {
          openError = error;
        } finally {
          listed.closeSync();
        }
        if (sub) {
          node = this.baseNode(name, st, 'dir');
          try {
            node.subtree = await this.changedFolder(sub, rel, old.subtree!, plan);
          } finally {
            await sub.close();
          }
          this.count(old, -1);
          this.count(node, 1);
        } else {
          await this.uncount(old, true);
          node = await this.changed(f, name, openError);
        }
      } else {
        // New here, replaced, or a changed file: read (a folder: walked in full, nothing reused).
        if (old) await this.uncount(old, true);
        try {
          node = await this.entry(f, name, this.handleListed(f, name, listed), { linkable: true, defer: (read) => reads.push({ ...read, slot: index }) });
        } catch (error) {
          node = await this.changed(f, name, error);
        }
      }
      slots.push(node);
      this.report();
    }
    await this.readPending(f, reads, slots);
    await this.small?.drain();
    const fresh = slots.map((n, i) => n && { node: n, name: names[i]! }).filter((n) => n !== undefined);
    const nodes = mergeByName(parent.nodes.filter((n) => !look.has(n.name)), fresh);
    const saved = await this.inRepository(this.repo.saveBlob('tree', Buffer.from(JSON.stringify({ nodes } satisfies Tree))));
    this.stats.bytesAdded += saved.added;
    return saved.id;
  }

  /**
   * Reads the deferred files of a folder: a sliding window, so a new file starts as soon as one
   * finishes and the workers never wait for the slowest file of a batch. Returns only when no
   * read is running any more (the folder's handle is closed after it), also on failure.
   */
  private async readPending(f: Folder, reads: PendingRead[], slots: (TreeNode | undefined)[]): Promise<void> {
    const window = this.options.pool ? 16 : 1;
    let next = 0;
    let failed = false;
    const lane = async (): Promise<void> => {
      while (next < reads.length && !failed) {
        const r = reads[next++]!;
        try {
          this.options.signal?.throwIfAborted();
          // Opened by name again, and checked to be the inode listed.
          const content = await this.readContent(r.reopen, r.node.size);
          // No content (a tolerant pass): it changed while read; the next pass reads it.
          if (content !== undefined) r.node.content = content;
        } catch (error) {
          if (failed || !this.isChange(error)) {
            failed = true;
            throw error;
          }
          this.count(r.node, -1);
          slots[r.slot] = await this.changed(f, r.name, error, false).catch((e: unknown) => {
            failed = true;
            throw e;
          });
        }
        this.report();
      }
    };
    const lanes = await Promise.allSettled(Array.from({ length: Math.min(window, reads.length) }, lane));
    const failure = lanes.find((l) => l.status === 'rejected');
    if (failure) throw failure.reason;
  }

  /** A file's chunk list; undefined in a tolerant pass if it changed while read. */
  private async readContent(open: () => number, size: number): Promise<string[] | undefined> {
    try {
      return await this.fileContent(open, size);
    } catch (error) {
      if (this.options.tolerateChanges && this.isChange(error)) return undefined;
      throw error;
    }
  }

  /** Reads and stores the file `open` opens (a checked open: see fs/beneath.ts); closes it. */
  private async fileContent(open: () => number, size: number): Promise<string[]> {
    this.options.signal?.throwIfAborted();
    const pool = this.options.pool;
    const minSize = this.repo.config.chunker.minSize;
    const fd = open();
    try {
      if (this.isTiny(size)) {
        // One chunk, read on this thread with plain system calls: from the page cache they cost
        // less than the thread-pool hops.
        return await this.storeWhole(readTinyFile(fd, size), size);
      }
      // A file below the chunker's minimum is one chunk: handled here, without a worker round trip.
      if (pool && size >= minSize) {
        const content: string[] = [];
        await pool.processFd(
          fd,
          size,
          async ({ id, rawLength, sealed }) => {
            content.push(id);
            this.stats.bytesRead += rawLength;
            // Not `+= await`: that reads the sum before the wait, and other files add meanwhile.
            const added = sealed ? await this.inRepository(this.repo.saveSealedBlob(id, 'data', sealed, rawLength)) : 0;
            this.stats.bytesAdded += added;
            this.report();
          },
          this.options.signal,
        );
        return content;
      }
      if (size < minSize) return await this.storeWhole(await readSmallFile(fd, size), size);
      return await this.chunkHere(fd, size);
    } finally {
      // Only here, once nothing reads it any more (processFd settles after its worker is done).
      closeSync(fd);
    }
  }

  /**
   * Stores a file read whole as one chunk (or none, or a hole). With workers, the chunk goes into
   * a batch for them to seal, and the list returned gets its id before the folder's tree is saved.
   */
  private async storeWhole(data: Buffer, size: number): Promise<string[]> {
    if (data.length !== size) throw changedSize(size, data.length);
    this.stats.bytesRead += data.length;
    if (data.length === 0) return [];
    if (isAllZero(data)) return [`${ZERO_PREFIX}${data.length}`];
    if (this.small) {
      const content: string[] = [];
      await this.small.add(data, (id) => content.push(id));
      return content;
    }
    const saved = await this.inRepository(this.repo.saveBlob('data', data));
    this.stats.bytesAdded += saved.added;
    return [saved.id];
  }

  /** Chunks an open file on this thread (no worker pool). */
  private async chunkHere(fd: number, size: number): Promise<string[]> {
    const chunker = new Chunker(this.repo.config.chunker);
    const content: string[] = [];
    const store = async (chunk: Buffer): Promise<void> => {
      if (isAllZero(chunk)) {
        content.push(`${ZERO_PREFIX}${chunk.length}`);
        return;
      }
      const saved = await this.inRepository(this.repo.saveBlob('data', chunk));
      this.stats.bytesAdded += saved.added;
      content.push(saved.id);
    };
    let read = 0;
    for (;;) {
      this.options.signal?.throwIfAborted();
      // A fresh buffer per read: the chunker keeps references to the data it was given.
      const buffer = Buffer.allocUnsafe(1 << 20);
      const { bytesRead } = await readFd(fd, buffer, 0, buffer.length, read);
      if (bytesRead === 0) break;
      read += bytesRead;
      this.stats.bytesRead += bytesRead;
      for (const chunk of chunker.push(buffer.subarray(0, bytesRead))) await store(chunk);
      this.report();
    }
    for (const chunk of chunker.finish()) await store(chunk);
    if (read !== size) throw changedSize(size, read);
    return content;
  }
}

