/**
 * Builds a volume's trees from a tar stream (TarItem objects): used by `import` (archive sets,
 * ours or made with the guide's tar) and by repository backups through the engine's archive API.
 * A tar stream carries no ctime or inode, so such snapshots do not make the next backup skip
 * reading; chunks still deduplicate. GNU sparse members (1.0, 0.x, old GNU) are expanded, their
 * holes recorded as zero chunks. Every member passes MemberGuard (the rules of a restore), so a
 * snapshot imported from a hostile set holds nothing a restore would refuse.
 */
import { Writable } from 'node:stream';
import { CorruptArchiveError } from '../errors.js';
import type { TarEntry, TarItem } from '../archive/tar.js';
import { MemberGuard } from '../archive/member-guard.js';
import { SparseReader } from '../archive/sparse.js';
import { isAllZero } from './zero.js';
import { Chunker } from './chunker.js';
import type { Repository } from './repository.js';
import { ZERO_PREFIX, type NodeType, type Tree, type TreeNode } from './tree.js';

interface DirState {
  node: TreeNode;
  children: Map<string, TreeNode>;
}

const ZEROS = Buffer.alloc(1 << 20);


function typeOf(entry: TarEntry): NodeType | 'hardlink' | undefined {
  switch (entry.type) {
    case '0':
    case '\0':
    case '7':
      return 'file';
    case '1':
      return 'hardlink';
    case '2':
      return 'symlink';
    case '3':
      return 'chardev';
    case '4':
      return 'blockdev';
    case '5':
      return 'dir';
    case '6':
      return 'fifo';
    default:
      return undefined;
  }
}

export interface ImportStats {
  entries: number;
  files: number;
  bytes: number;
  bytesAdded: number;
}

interface OpenFile {
  node: TreeNode;
  chunker: Chunker;
  remaining: number;
  /** Sparse members: the map, and how far the file's logical bytes have been fed. */
  sparse: { reader: SparseReader; logical: number } | undefined;
}

export class TarTreeBuilder extends Writable {
  readonly stats: ImportStats = { entries: 0, files: 0, bytes: 0, bytesAdded: 0 };
  private readonly dirs = new Map<string, DirState>();
  private readonly guard: MemberGuard;
  private file: OpenFile | undefined;

  constructor(
    private readonly repo: Repository,
    memberPrefix: string,
    private readonly onProgress?: (stats: ImportStats) => void,
  ) {
    super({ objectMode: true, highWaterMark: 64 });
    // Imports were verified (reserved names refused); a backup through the engine leaves out
    // cvat-backup's own folders (a rollback point or retired data a backup must not store).
    this.guard = new MemberGuard(memberPrefix, 'leave out');
  }

  override _write(item: TarItem, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    (item.kind === 'entry' ? this.onEntry(item.entry) : this.onData(item.chunk)).then(() => callback(), callback);
  }

  private dir(path: string): DirState {
    let state = this.dirs.get(path);
    if (!state) {
      const name = path.slice(path.lastIndexOf('/') + 1);
      state = { node: blankNode(Buffer.from(name, 'latin1'), 'dir'), children: new Map() };
      this.dirs.set(path, state);
      if (path !== '') this.dir(parentOf(path)).children.set(state.node.name, state.node);
    }
    return state;
  }

  private async onEntry(entry: TarEntry): Promise<void> {
    if (this.file) throw new CorruptArchiveError('tar member ended early');
    const member = this.guard.check(entry);
    const type = typeOf(entry);
    this.stats.entries++;
    if (type === undefined || (member.action === 'skip' && member.path === undefined)) return;
    const parts = member.action === 'root' ? [] : member.path!;
    const path = parts.map((p) => p.toString('latin1')).join('/');
    if (member.action === 'skip') {
      // A device or FIFO: recorded (a restore leaves it out with a warning).
      const node: TreeNode = { ...blankNode(parts[parts.length - 1]!, type as NodeType), ...this.meta(entry) };
      if (type === 'chardev' || type === 'blockdev') node.rdev = 0;
      this.dir(parentOf(path)).children.set(node.name, node);
      return;
    }
    const name = Buffer.from(path.slice(path.lastIndexOf('/') + 1), 'latin1');
    const meta = this.meta(entry);
    if (type === 'dir') {
      const state = this.dir(path);
      Object.assign(state.node, meta);
      return;
    }
    const parent = this.dir(parentOf(path));
    const node: TreeNode = { ...blankNode(name, type === 'hardlink' ? 'file' : type), ...meta };
    parent.children.set(node.name, node);
    if (type === 'symlink') node.target = entry.linkName.toString('base64');
    if (member.action === 'hardlink') {
      node.hardlink = Buffer.from(member.target.map((p) => p.toString('latin1')).join('/'), 'latin1').toString('base64');
      this.stats.files++;
    }
    if (type !== 'file') return;
    this.stats.files++;
    node.size = entry.sparse ? entry.sparse.realSize : entry.size;
    node.content = [];
    this.stats.bytes += node.size;
    this.file = {
      node,
      chunker: new Chunker(this.repo.config.chunker),
      remaining: entry.size,
      sparse: entry.sparse ? { reader: new SparseReader(entry.sparse, entry.size), logical: 0 } : undefined,
    };
    if (entry.size === 0) await this.closeFile();
  }

  private meta(entry: TarEntry): Pick<TreeNode, 'mode' | 'uid' | 'gid' | 'mtimeNs'> {
    return { mode: entry.mode & 0o7777, uid: entry.uid, gid: entry.gid, mtimeNs: `${entry.mtime}000000000` };
  }

  private async store(chunks: Buffer[]): Promise<void> {
    const file = this.file!;
    for (const chunk of chunks) {
      if (isAllZero(chunk)) {
        file.node.content!.push(`${ZERO_PREFIX}${chunk.length}`);
        continue;
      }
      const saved = await this.repo.saveBlob('data', chunk);
      this.stats.bytesAdded += saved.added;
      file.node.content!.push(saved.id);
    }
  }

  /** Feeds logical file bytes (holes as zeros) to the chunker. */
  private async logical(data: Buffer): Promise<void> {
    await this.store(this.file!.chunker.push(data));
  }

  private async zeros(length: number): Promise<void> {
    for (let left = length; left > 0; left -= ZEROS.length) await this.logical(ZEROS.subarray(0, Math.min(left, ZEROS.length)));
  }

  private async onData(chunk: Buffer): Promise<void> {
    const file = this.file;
    if (!file) return;
    file.remaining -= chunk.length;
    if (!file.sparse) await this.logical(chunk);
    else await this.onSparse(file, chunk);
    if (file.remaining === 0) await this.closeFile();
    this.onProgress?.({ ...this.stats });
  }

  private async onSparse(file: OpenFile, chunk: Buffer): Promise<void> {
    const sparse = file.sparse!;
    for (const piece of sparse.reader.push(chunk)) {
      if (sparse.logical < piece.offset) await this.zeros(piece.offset - sparse.logical);
      await this.logical(piece.data);
      sparse.logical = piece.offset + piece.data.length;
    }
  }

  private async closeFile(): Promise<void> {
    const file = this.file!;
    if (file.sparse) {
      file.sparse.reader.end();
      if (file.sparse.logical < file.sparse.reader.realSize) await this.zeros(file.sparse.reader.realSize - file.sparse.logical);
    }
    await this.store(file.chunker.finish());
    this.file = undefined;
  }

  /**
   * A restore writes entries in sorted pre-order, and a hard link can only be made to a file that
   * already exists: in every group of links, the one first in that order holds the content and the
   * others link to it (tar archives may name any member of the group first).
   */
  private orderHardLinks(): void {
    const nodeAt = (path: string): TreeNode | undefined => {
      const parent = this.dirs.get(parentOf(path));
      return parent?.children.get(Buffer.from(path.slice(path.lastIndexOf('/') + 1), 'latin1').toString('base64'));
    };
    const groups = new Map<string, string[]>();
    for (const [dirPath, state] of this.dirs) {
      for (const node of state.children.values()) {
        if (node.hardlink === undefined) continue;
        const target = Buffer.from(node.hardlink, 'base64').toString('latin1');
        const path = `${dirPath === '' ? '' : `${dirPath}/`}${Buffer.from(node.name, 'base64').toString('latin1')}`;
        groups.set(target, [...(groups.get(target) ?? []), path]);
      }
    }
    for (const [target, links] of groups) {
      const holder = nodeAt(target);
      if (!holder) throw new CorruptArchiveError(`hard link to '${target}', which the archive does not hold`);
      const first = [target, ...links].sort(comparePreOrder)[0]!;
      const { size, content } = holder;
      for (const path of [target, ...links]) {
        const node = nodeAt(path)!;
        if (path === first) {
          node.size = size;
          if (content) node.content = content;
          delete node.hardlink;
        } else {
          node.hardlink = Buffer.from(first, 'latin1').toString('base64');
          delete node.content;
        }
      }
    }
  }

  /** Saves every folder's tree, deepest first; returns the root tree id and the root's metadata. */
  async finishTrees(): Promise<{ tree: string; root: TreeNode }> {
    if (this.file) throw new CorruptArchiveError('tar member ended early');
    this.orderHardLinks();
    const root = this.dir('');
    // Folders implied by deeper members are entries of the trees too: the count bounds a restore's walk.
    let nodes = 0;
    for (const state of this.dirs.values()) nodes += state.children.size;
    this.stats.entries = Math.max(this.stats.entries, nodes);
    const paths = [...this.dirs.keys()].sort((a, b) => depth(b) - depth(a));
    for (const path of paths) {
      const state = this.dirs.get(path)!;
      const nodes = [...state.children.values()].sort((a, b) => Buffer.compare(Buffer.from(a.name, 'base64'), Buffer.from(b.name, 'base64')));
      const saved = await this.repo.saveBlob('tree', Buffer.from(JSON.stringify({ nodes } satisfies Tree)));
      this.stats.bytesAdded += saved.added;
      state.node.subtree = saved.id;
    }
    const { subtree, ...rootNode } = root.node;
    return { tree: subtree!, root: rootNode };
  }
}

function blankNode(name: Buffer, type: NodeType): TreeNode {
  return { name: name.toString('base64'), type, mode: 0o755, uid: 0, gid: 0, mtimeNs: '0', ctimeNs: '0', inode: '0', size: 0 };
}

function parentOf(path: string): string {
  const slash = path.lastIndexOf('/');
  return slash === -1 ? '' : path.slice(0, slash);
}

/** Order of a pre-order walk with children sorted by name bytes. */
function comparePreOrder(a: string, b: string): number {
  const pa = a.split('/');
  const pb = b.split('/');
  for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
    const c = Buffer.compare(Buffer.from(pa[i]!, 'latin1'), Buffer.from(pb[i]!, 'latin1'));
    if (c !== 0) return c;
  }
  return pa.length - pb.length;
}

function depth(path: string): number {
  return path === '' ? 0 : path.split('/').length;
}
