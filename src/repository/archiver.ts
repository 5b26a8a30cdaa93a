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
 */
import { closeSync, read as readCallback, readSync } from 'node:fs';
import type { BigIntStats } from 'node:fs';
import { promisify } from 'node:util';
import { DirHandle, isChangedError, isComponent, type EntryHandle, type ExpectedFile } from '../fs/beneath.js';
import type { VolumeChanges } from '../fs/change-journal.js';
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
}

/** A file of a folder whose content is read after the folder is listed, several at once. */
interface PendingRead {
  slot: number;
  name: Buffer;
  /** The inode listed (not the whole stat: a folder may hold millions of files). */
  listed: ExpectedFile;
  node: TreeNode;
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

  private async folder(dir: DirHandle, relative: Buffer, parentTree: string | undefined): Promise<string> {
    const parent = parentTree ? (JSON.parse((await this.inRepository(this.repo.loadBlob(parentTree))).toString('utf8')) as Tree) : undefined;
    const f: Folder = { dir, relative, parentNodes: new Map(parent?.nodes.map((n) => [n.name, n])) };
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
        node = await this.entry(f, name, f.dir.lookupSync(name), { linkable: true, defer: (read) => reads.push({ ...read, slot: index }) });
      } catch (error) {
        node = await this.changed(f, name, error);
      }
      slots.push(node);
      this.report();
    }
    await this.readPending(f, reads, slots);
    if (this.options.tolerateChanges) this.noteIncomplete(relative, names, slots);
    // The tree names its small files' blobs: they must all be sealed and stored first.
    await this.small?.drain();
    const nodes = slots.filter((n): n is TreeNode => n !== undefined);
    const saved = await this.inRepository(this.repo.saveBlob('tree', Buffer.from(JSON.stringify({ nodes } satisfies Tree))));
    this.stats.bytesAdded += saved.added;
    return saved.id;
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
    listed: EntryHandle,
    how: { linkable: boolean; defer?: (read: Omit<PendingRead, 'slot'>) => void },
  ): Promise<TreeNode | undefined> {
    try {
      const st = listed.stat;
      const type = nodeType(st);
      if (type === undefined) return undefined; // sockets
      const node = this.baseNode(name, st, type);
      const rel = f.relative.length === 0 ? name : Buffer.concat([f.relative, Buffer.from('/'), name]);
      const before = f.parentNodes.get(node.name);
      if (type === 'dir') {
        const sub = listed.openDirSync();
        listed.closeSync();
        try {
          node.subtree = await this.folder(sub, rel, before?.type === 'dir' ? before.subtree : undefined);
        } finally {
          await sub.close();
        }
      } else if (type === 'symlink') {
        node.target = (await f.dir.readListedLink(name)).toString('base64');
      } else if (type === 'chardev' || type === 'blockdev') {
        node.rdev = Number(st.rdev);
      } else if (type === 'file') {
        const inodeKey = `${st.dev}:${st.ino}`;
        if (st.nlink > 1n) this.noteLink(inodeKey, st.nlink, rel);
        const linked = how.linkable && st.nlink > 1n;
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
        } else if (how.defer && !linked && !this.isTiny(node.size)) {
          listed.closeSync(); // not kept open while waiting: a folder may hold millions of files
          how.defer({ name, listed: { dev: st.dev, ino: st.ino }, node });
        } else {
          // Read now: a tiny file (cheaper than a second lookup later), or the first name of an
          // inode with several (were it left out, the names that follow must not point at it).
          const content = await this.readContent(() => listed.openFileSync(), node.size);
          if (content !== undefined) node.content = content;
        }
        if (linked && first === undefined) this.seenInodes.set(inodeKey, rel.toString('base64'));
      }
      this.count(node, 1);
      return node;
    } finally {
      listed.closeSync();
    }
  }

  /**
   * An entry that changed while it was looked at: a tolerant pass leaves it for the next pass;
   * otherwise it is looked at once more, and left out with a warning if it changed again.
   */
  private async changed(f: Folder, name: Buffer, error: unknown, linkable = true): Promise<TreeNode | undefined> {
    if (!this.isChange(error)) throw error;
    if (this.options.tolerateChanges) return undefined;
    try {
      return await this.entry(f, name, f.dir.lookupSync(name), { linkable });
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
    const f: Folder = { dir, relative, parentNodes: new Map() };
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
          node = await this.entry(f, name, listed, { linkable: true, defer: (read) => reads.push({ ...read, slot: index }) });
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
          const content = await this.readContent(() => f.dir.openFileSync(r.name, r.listed).fd, r.node.size);
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

