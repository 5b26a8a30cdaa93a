/**
 * Builds a volume's trees from a tar stream (TarItem objects): used by `import` (archive sets,
 * ours or made with the guide's tar) and by repository backups through the engine's archive API.
 * A tar stream carries no ctime or inode, so such snapshots do not make the next backup skip
 * reading; chunks still deduplicate. GNU sparse 1.0 members are expanded, their holes recorded
 * as zero chunks.
 */
import { Writable } from 'node:stream';
import { CorruptArchiveError } from '../errors.js';
import { normaliseMemberName, type TarEntry, type TarItem } from '../archive/tar.js';
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
  sparse: { map: string; segments: { offset: number; length: number }[] | undefined; segment: number; inSegment: number; logical: number; realSize: number } | undefined;
}

export class TarTreeBuilder extends Writable {
  readonly stats: ImportStats = { entries: 0, files: 0, bytes: 0, bytesAdded: 0 };
  private readonly dirs = new Map<string, DirState>();
  private file: OpenFile | undefined;

  constructor(
    private readonly repo: Repository,
    private readonly memberPrefix: string,
    private readonly onProgress?: (stats: ImportStats) => void,
  ) {
    super({ objectMode: true, highWaterMark: 64 });
  }

  override _write(item: TarItem, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    (item.kind === 'entry' ? this.onEntry(item.entry) : this.onData(item.chunk)).then(() => callback(), callback);
  }

  private relative(name: Buffer): string {
    const text = normaliseMemberName(name);
    if (text === this.memberPrefix) return '';
    if (this.memberPrefix !== '' && !text.startsWith(`${this.memberPrefix}/`)) {
      throw new CorruptArchiveError(`member '${text}' is outside '${this.memberPrefix}/'`);
    }
    return this.memberPrefix === '' ? text : text.slice(this.memberPrefix.length + 1);
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
    const type = typeOf(entry);
    const path = this.relative(entry.name);
    this.stats.entries++;
    if (type === undefined) return;
    const name = Buffer.from(path.slice(path.lastIndexOf('/') + 1), 'latin1');
    const meta = { mode: entry.mode & 0o7777, uid: entry.uid, gid: entry.gid, mtimeNs: `${entry.mtime}000000000` };
    if (type === 'dir') {
      const state = this.dir(path);
      Object.assign(state.node, meta);
      return;
    }
    const parent = this.dir(parentOf(path));
    const node: TreeNode = { ...blankNode(name, type === 'hardlink' ? 'file' : type), ...meta };
    parent.children.set(node.name, node);
    if (type === 'symlink') node.target = entry.linkName.toString('base64');
    if (type === 'hardlink') {
      node.hardlink = Buffer.from(this.relative(entry.linkName), 'latin1').toString('base64');
      this.stats.files++;
    }
    if (type === 'chardev' || type === 'blockdev') node.rdev = 0;
    if (type !== 'file') return;
    this.stats.files++;
    const realSize = entry.pax.get('GNU.sparse.realsize');
    const sparse = realSize !== undefined && entry.pax.get('GNU.sparse.major')?.toString('latin1') === '1';
    node.size = sparse ? Number(realSize.toString('latin1')) : entry.size;
    node.content = [];
    this.stats.bytes += node.size;
    this.file = {
      node,
      chunker: new Chunker(this.repo.config.chunker),
      remaining: entry.size,
      sparse: sparse ? { map: '', segments: undefined, segment: 0, inSegment: 0, logical: 0, realSize: node.size } : undefined,
    };
    if (entry.size === 0) await this.closeFile();
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
    let data = chunk;
    if (sparse.segments === undefined) {
      sparse.map += data.toString('latin1');
      const lines = sparse.map.split('\n');
      const count = Number(lines[0]);
      if (lines.length < 2 + count * 2) return;
      const numbers = lines.slice(1, 1 + count * 2).map(Number);
      sparse.segments = [];
      for (let i = 0; i < count; i++) sparse.segments.push({ offset: numbers[2 * i]!, length: numbers[2 * i + 1]! });
      const mapLength = lines.slice(0, 1 + count * 2).join('\n').length + 1;
      data = Buffer.from(sparse.map, 'latin1').subarray(Math.ceil(mapLength / 512) * 512);
    }
    while (data.length > 0) {
      const segment = sparse.segments[sparse.segment];
      if (!segment) throw new CorruptArchiveError('sparse data longer than its map');
      if (sparse.logical < segment.offset) {
        await this.zeros(segment.offset - sparse.logical);
        sparse.logical = segment.offset;
      }
      const piece = data.subarray(0, segment.length - sparse.inSegment);
      await this.logical(piece);
      sparse.inSegment += piece.length;
      sparse.logical += piece.length;
      data = data.subarray(piece.length);
      if (sparse.inSegment === segment.length) {
        sparse.segment++;
        sparse.inSegment = 0;
      }
    }
  }

  private async closeFile(): Promise<void> {
    const file = this.file!;
    if (file.sparse && file.sparse.logical < file.sparse.realSize) await this.zeros(file.sparse.realSize - file.sparse.logical);
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
