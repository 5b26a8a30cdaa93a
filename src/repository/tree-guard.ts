/**
 * The rules a snapshot's trees must follow before a restore writes them into a volume: the
 * counterpart of MemberGuard for archives, for a snapshot made by someone else (a repository
 * written on a compromised host, or by hand: whoever holds the key can store any tree).
 *
 * - A tree is `{ nodes: [...] }`; every node has a known type and sane values (owner within 32
 *   bits, size a safe integer, times decimal nanoseconds, content as blob ids or `zero:<n>`).
 * - Names are one path component (not empty, '.', '..', no '/' or NUL, at most 255 bytes, base64
 *   as written), sorted by their bytes and unique, so a path is declared once.
 * - A symbolic link's target is 1 to 4095 bytes without NUL (data: never followed). A hard link
 *   names a regular file that comes earlier in the walk (pre-order, names sorted), whose path is
 *   folders of this tree (checked when the whole volume is verified).
 * - `.cvat-backup-*` at the volume root is cvat-backup's own (a rollback point a backup caught):
 *   never restored.
 * - The walk is bounded: a tree that contains itself on its path (a cycle) is refused, the depth
 *   is bounded, and so is the number of entries (by the count the snapshot records), so a hostile
 *   snapshot cannot make verification or a restore run for ever.
 */
import { CorruptArchiveError } from '../errors.js';
import { isReservedName } from '../archive/member-guard.js';
import type { Repository } from './repository.js';
import { ZERO_PREFIX, type SnapshotVolume, type Tree, type TreeNode } from './tree.js';

/** Folders deeper than this are refused (real volumes are a few dozen deep; each level holds an open folder). */
export const MAX_TREE_DEPTH = 512;
const NAME_MAX = 255;
const LINK_MAX = 4095;
const MAX_ID = 0xffffffff;
const NODE_TYPES = new Set(['file', 'dir', 'symlink', 'fifo', 'chardev', 'blockdev']);
const BLOB_ID = /^[0-9a-f]{64}$/;
const NANOSECONDS = /^-?[0-9]{1,25}$/;
const ZERO_LENGTH = /^[1-9][0-9]{0,15}$/;

function damaged(message: string): CorruptArchiveError {
  return new CorruptArchiveError(message);
}

function decode(value: unknown, what: string): Buffer {
  if (typeof value !== 'string') throw damaged(`${what} is not a string`);
  // Bytes as decoded are what is compared and written; a non-canonical spelling changes nothing.
  return Buffer.from(value, 'base64');
}

function isComponent(name: Buffer): boolean {
  if (name.length === 0 || name.length > NAME_MAX || name.includes(0x2f) || name.includes(0)) return false;
  return !(name.length <= 2 && name[0] === 0x2e && (name.length === 1 || name[1] === 0x2e));
}

/** The components of a hard link's target path (relative to the volume root). */
export function hardLinkTarget(node: TreeNode): Buffer[] {
  const path = decode(node.hardlink, 'hard link target');
  const parts: Buffer[] = [];
  let start = 0;
  for (let i = 0; i <= path.length; i++) {
    if (i < path.length && path[i] !== 0x2f) continue;
    const part = path.subarray(start, i);
    if (!isComponent(part)) throw damaged(`hard link target '${path.toString('utf8')}' is not a path of names below the volume root`);
    parts.push(part);
    start = i + 1;
  }
  if (isReservedName(parts[0]!)) throw damaged(`hard link target '${path.toString('utf8')}' is cvat-backup's own folder`);
  return parts;
}

/** Owner, mode, size and times: what a restore hands to the system calls. */
function checkValues(n: Record<string, unknown>, where: string): void {
  const int = (key: string, max: number): void => {
    const v = n[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v > max) throw damaged(`${where}: absurd ${key} ${String(v)}`);
  };
  int('mode', 0o177777);
  int('uid', MAX_ID);
  int('gid', MAX_ID);
  int('size', Number.MAX_SAFE_INTEGER);
  if (typeof n['mtimeNs'] !== 'string' || !NANOSECONDS.test(n['mtimeNs'])) throw damaged(`${where}: bad mtime`);
  if (n['ctimeNs'] !== undefined && (typeof n['ctimeNs'] !== 'string' || !NANOSECONDS.test(n['ctimeNs']))) throw damaged(`${where}: bad ctime`);
}

function checkNode(node: unknown, where: string): asserts node is TreeNode {
  if (typeof node !== 'object' || node === null) throw damaged(`${where}: an entry is not an object`);
  const n = node as Record<string, unknown>;
  if (typeof n['type'] !== 'string' || !NODE_TYPES.has(n['type'])) throw damaged(`${where}: unknown entry type '${String(n['type'])}'`);
  checkValues(n, where);
  switch (n['type']) {
    case 'dir':
      if (typeof n['subtree'] !== 'string' || !BLOB_ID.test(n['subtree'])) throw damaged(`${where}: a folder without a valid subtree`);
      break;
    case 'symlink': {
      const target = decode(n['target'], `${where}: symbolic link target`);
      if (target.length === 0 || target.length > LINK_MAX || target.includes(0)) throw damaged(`${where}: invalid symbolic link target (${target.length} bytes)`);
      break;
    }
    case 'file': {
      if (n['hardlink'] !== undefined) break; // checked with the whole volume (hardLinkTarget)
      const content = n['content'] ?? [];
      if (!Array.isArray(content)) throw damaged(`${where}: content is not a list`);
      for (const ref of content as unknown[]) {
        if (typeof ref !== 'string') throw damaged(`${where}: a chunk reference is not a string`);
        if (ref.startsWith(ZERO_PREFIX) ? !ZERO_LENGTH.test(ref.slice(ZERO_PREFIX.length)) : !BLOB_ID.test(ref)) {
          throw damaged(`${where}: bad chunk reference '${ref.slice(0, 80)}'`);
        }
      }
      break;
    }
  }
}

/**
 * Checks a parsed tree blob: shape, every node, names single components, sorted and unique.
 * Returns the nodes' decoded names beside them.
 */
export function checkTree(value: unknown, id: string): { tree: Tree; names: Buffer[] } {
  const where = `tree ${id.slice(0, 12)}`;
  if (typeof value !== 'object' || value === null || !Array.isArray((value as { nodes?: unknown }).nodes)) throw damaged(`${where} is not a tree`);
  const nodes = (value as { nodes: unknown[] }).nodes;
  const names: Buffer[] = [];
  let previous: Buffer | undefined;
  for (const node of nodes) {
    checkNode(node, where);
    const name = decode(node.name, `${where}: a name`);
    if (!isComponent(name)) throw damaged(`${where} holds an invalid name '${name.toString('utf8')}'`);
    if (previous !== undefined && Buffer.compare(previous, name) >= 0) {
      throw damaged(`${where}: names are not sorted and unique ('${previous.toString('utf8')}', then '${name.toString('utf8')}')`);
    }
    previous = name;
    names.push(name);
  }
  return { tree: value as Tree, names };
}

/** Loads a tree blob and checks it (checkTree). */
export async function loadCheckedTree(repo: Repository, id: string): Promise<{ tree: Tree; names: Buffer[] }> {
  if (!BLOB_ID.test(id)) throw damaged(`bad tree id '${id.slice(0, 80)}'`);
  let parsed: unknown;
  try {
    parsed = JSON.parse((await repo.loadBlob(id)).toString('utf8'));
  } catch (error) {
    if (error instanceof SyntaxError) throw damaged(`tree ${id.slice(0, 12)} is not JSON`);
    throw error;
  }
  return checkTree(parsed, id);
}

/** The volume root's own owner, mode and times, as the snapshot records them. */
export function checkRootNode(root: unknown): void {
  if (typeof root !== 'object' || root === null) throw damaged('the volume root is not recorded');
  checkValues(root as Record<string, unknown>, 'the volume root');
}

/** True for a root entry that is cvat-backup's own folder (never restored). */
export function isReservedEntry(depth: number, name: Buffer): boolean {
  return depth === 0 && isReservedName(name);
}

/**
 * Bounds one walk of a volume's trees: no tree inside itself, at most MAX_TREE_DEPTH deep, at
 * most as many entries as the snapshot records.
 */
export class TreeWalkBounds {
  private readonly path: string[] = [];
  private readonly onPath = new Set<string>();
  private entries = 0;
  private readonly limit: number;

  constructor(volume: SnapshotVolume) {
    this.limit = typeof volume.entries === 'number' && Number.isSafeInteger(volume.entries) && volume.entries >= 0 ? volume.entries : 0;
  }

  enter(treeId: string): void {
    if (this.onPath.has(treeId)) throw damaged(`tree ${treeId.slice(0, 12)} contains itself (a cycle)`);
    if (this.path.length >= MAX_TREE_DEPTH) throw damaged(`folders nested deeper than ${MAX_TREE_DEPTH} levels`);
    this.path.push(treeId);
    this.onPath.add(treeId);
  }

  leave(): void {
    const id = this.path.pop();
    if (id !== undefined) this.onPath.delete(id);
  }

  get depth(): number {
    return this.path.length;
  }

  /** One more entry walked. */
  count(): void {
    this.entries++;
    if (this.entries > this.limit) throw damaged(`the trees hold more entries than the ${this.limit} the snapshot records`);
  }
}

/** Order of a pre-order walk with names sorted by bytes: negative if `a` comes before `b`. */
export function comparePreOrder(a: Buffer[], b: Buffer[]): number {
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    const c = Buffer.compare(a[i]!, b[i]!);
    if (c !== 0) return c;
  }
  return a.length - b.length;
}
