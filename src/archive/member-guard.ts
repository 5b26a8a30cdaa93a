/**
 * The rules every member of an archive must follow before a restore writes it into a volume, and
 * the streaming check that applies them: once while the set is verified (before CVAT is stopped,
 * so a hostile set is refused with nothing touched) and again on the stream while it is written
 * (host extraction, and the tar stream sent to the engine).
 *
 * The threat is an archive made by someone else. Whatever it holds, the restore may create,
 * change, link or read nothing outside the volume it restores. The rules, relative to the volume
 * root (the member prefix, i.e. the mount path):
 * - a name is the prefix followed by components that are not empty, '.', '..', hold no NUL and
 *   are at most 255 bytes; the root itself, if it is a member, is a folder;
 * - `.cvat-backup-*` at the volume root is refused: the rollback point lives there;
 * - every parent of a member is a folder this archive made (declared, or implied by a deeper
 *   member); a member under a symbolic link, a file or a device of the archive is refused, so the
 *   order of members cannot route a write through a link;
 * - a path is declared once; only a folder may be declared again, as a folder (no "a later member
 *   replaces an earlier one");
 * - a hard link points at a regular file (or hard link) declared earlier in the same archive;
 * - a symbolic link is data: any target (absolute or relative) of 1 to 4095 bytes without NUL,
 *   made as stored and never followed;
 * - devices, FIFOs and other types are skipped (a warning names them); header values and sparse
 *   maps are checked by TarProcessor and SparseReader.
 * Memory: one small entry per member name (a map per folder), as a tar extractor keeps.
 */
import { CorruptArchiveError } from '../errors.js';
import { SparseReader } from './sparse.js';
import type { TarEntry } from './tar.js';

/** Names of cvat-backup's own folders at the root of a volume (rollback point, retired data). */
export const RESERVED_PREFIX = '.cvat-backup-';
const RESERVED = Buffer.from(RESERVED_PREFIX);
/** Linux NAME_MAX and PATH_MAX (a symbolic link's target). */
const NAME_MAX = 255;
const LINK_MAX = 4095;

/** True for a name cvat-backup keeps for itself at a volume's root. */
export function isReservedName(name: Buffer): boolean {
  return name.length >= RESERVED.length && name.subarray(0, RESERVED.length).equals(RESERVED);
}

/**
 * The names a backup lists at a volume's root, without `.cvat-backup-*`: cvat-backup's own (a
 * restore's rollback point, or old data not deleted yet) is never backed up, and a restore refuses it.
 */
export function leaveOutOwnFolders(names: Buffer[], atRoot: boolean, onWarning: ((message: string) => void) | undefined): Buffer[] {
  if (!atRoot) return names;
  return names.filter((name) => {
    if (!isReservedName(name)) return true;
    onWarning?.(`'${name.toString('utf8')}' at the volume root is cvat-backup's own (left by an interrupted restore): left out of this backup`);
    return false;
  });
}

/** What a checked member asks for. Paths are components below the volume root. */
export type GuardedMember =
  | { action: 'root' }
  | { action: 'dir'; path: Buffer[] }
  | { action: 'file'; path: Buffer[] }
  | { action: 'symlink'; path: Buffer[]; target: Buffer }
  | { action: 'hardlink'; path: Buffer[]; target: Buffer[] }
  /** Left out; `path` is there for a device or FIFO (a snapshot records it). */
  | { action: 'skip'; display: string; reason: string; path?: Buffer[] };

type Kind = 'dir' | 'file' | 'hardlink' | 'symlink' | 'special' | 'unknown';

function kindOf(type: string): Kind {
  switch (type) {
    case '5':
    case 'D': // GNU incremental dump folder: a folder whose data lists its names
      return 'dir';
    case '0':
    case '\0':
    case '7':
    case 'S':
      return 'file';
    case '1':
      return 'hardlink';
    case '2':
      return 'symlink';
    case '3':
    case '4':
    case '6':
      return 'special';
    default:
      return 'unknown';
  }
}

const SPECIAL_NAMES: Record<string, string> = { '3': 'character device', '4': 'block device', '6': 'FIFO' };

/** A non-folder entry of the archive's tree. */
const FILE = 1;
const SYMLINK = 2;
const SPECIAL = 3;
type Leaf = typeof FILE | typeof SYMLINK | typeof SPECIAL;

class Folder {
  readonly children = new Map<string, Folder | Leaf>();
  constructor(public declared: boolean) {}
}

function leafName(leaf: Leaf): string {
  return leaf === FILE ? 'file' : leaf === SYMLINK ? 'symbolic link' : 'device or FIFO';
}

function refuse(message: string): CorruptArchiveError {
  return new CorruptArchiveError(message);
}

function show(bytes: Buffer): string {
  return bytes.toString('utf8');
}

/**
 * Checks members one by one, in archive order. `check` throws CorruptArchiveError for a member
 * that breaks a rule and says what to do with the others.
 */
export class MemberGuard {
  private readonly root = new Folder(false);
  /** The volume root as member-name text (latin1: one character per byte). */
  private readonly prefix: string;
  private lastParentKey: string | undefined;
  private lastParent: Folder | undefined;

  /**
   * `reserved`: what to do with `.cvat-backup-*` at the volume root — refuse the archive (a
   * restore), or leave those members out (a backup through the engine, which must not store
   * cvat-backup's own working folders).
   */
  constructor(
    memberPrefix: string,
    private readonly reserved: 'refuse' | 'leave out' = 'refuse',
  ) {
    this.prefix = Buffer.from(memberPrefix, 'utf8').toString('latin1');
  }

  check(entry: TarEntry): GuardedMember {
    const kind = kindOf(entry.type);
    if (kind === 'unknown') {
      return { action: 'skip', display: show(entry.name), reason: `unsupported tar type '${entry.type.replace('\0', '\\0')}'` };
    }
    const path = this.components(entry.name);
    const display = this.display(path);
    if (path.length === 0) {
      if (kind !== 'dir') throw refuse(`member '${display}' is the volume root, which must be a folder, not a ${kind}`);
      this.root.declared = true;
      return { action: 'root' };
    }
    if (isReservedName(path[0]!) && this.reserved === 'leave out') return { action: 'skip', display, reason: "cvat-backup's own folder" };
    if (isReservedName(path[0]!)) throw refuse(`member '${display}' uses a name cvat-backup keeps for its rollback point (${RESERVED_PREFIX}*)`);
    const parent = this.parentOf(path, display);
    const key = path[path.length - 1]!.toString('latin1');
    const existing = parent.children.get(key);
    if (kind === 'dir') {
      if (existing === undefined) parent.children.set(key, new Folder(true));
      else if (existing instanceof Folder) existing.declared = true;
      else throw refuse(`member '${display}' is declared twice: as a ${leafName(existing)}, then as a folder`);
      return { action: 'dir', path };
    }
    if (existing !== undefined) {
      throw refuse(`member '${display}' is declared twice: as a ${existing instanceof Folder ? 'folder' : leafName(existing)}, then as a ${kind === 'hardlink' ? 'hard link' : kind}`);
    }
    switch (kind) {
      case 'file':
        parent.children.set(key, FILE);
        return { action: 'file', path };
      case 'symlink': {
        const target = entry.linkName;
        if (target.length === 0 || target.length > LINK_MAX || target.includes(0)) {
          throw refuse(`symbolic link '${display}' has an invalid target (${target.length} bytes)`);
        }
        parent.children.set(key, SYMLINK);
        return { action: 'symlink', path, target };
      }
      case 'hardlink': {
        const target = this.components(entry.linkName);
        const targetDisplay = this.display(target);
        if (this.lookup(target) !== FILE) {
          throw refuse(`hard link '${display}' points at '${targetDisplay}', which is not a regular file made earlier by this archive`);
        }
        parent.children.set(key, FILE);
        return { action: 'hardlink', path, target };
      }
      default:
        parent.children.set(key, SPECIAL);
        return { action: 'skip', display, reason: SPECIAL_NAMES[entry.type] ?? 'special file', path };
    }
  }

  /** Member name → components below the volume root ([] for the root). */
  components(name: Buffer): Buffer[] {
    let text = name.toString('latin1');
    while (text.startsWith('./')) text = text.slice(2);
    text = text.replace(/^\/+/, '').replace(/\/+$/, '');
    let rel: string;
    if (text === this.prefix) return [];
    if (this.prefix === '') rel = text === '.' ? '' : text;
    else if (text.startsWith(`${this.prefix}/`)) rel = text.slice(this.prefix.length + 1);
    else throw refuse(`member '${show(name)}' is outside '${show(Buffer.from(this.prefix, 'latin1'))}/'`);
    if (rel === '') return [];
    const parts = rel.split('/');
    for (const part of parts) {
      if (part === '' || part === '.' || part === '..' || part.includes('\0') || part.length > NAME_MAX) {
        throw refuse(`member '${show(name)}' has an invalid path component '${show(Buffer.from(part, 'latin1'))}'`);
      }
    }
    return parts.map((p) => Buffer.from(p, 'latin1'));
  }

  private display(path: Buffer[]): string {
    const prefix = show(Buffer.from(this.prefix, 'latin1'));
    const rel = path.map(show).join('/');
    return prefix === '' ? rel || '.' : rel === '' ? prefix : `${prefix}/${rel}`;
  }

  /** The folder that holds `path`, made implicitly where the archive has not declared it. */
  private parentOf(path: Buffer[], display: string): Folder {
    const parts = path.slice(0, -1);
    const key = parts.map((p) => p.toString('latin1')).join('/');
    if (key === this.lastParentKey && this.lastParent) return this.lastParent;
    let folder = this.root;
    for (const part of parts) {
      const name = part.toString('latin1');
      const child = folder.children.get(name);
      if (child === undefined) {
        const made = new Folder(false);
        folder.children.set(name, made);
        folder = made;
      } else if (child instanceof Folder) {
        folder = child;
      } else {
        throw refuse(`member '${display}' lies under '${show(part)}', which this archive made a ${leafName(child)}, not a folder`);
      }
    }
    this.lastParentKey = key;
    this.lastParent = folder;
    return folder;
  }

  private lookup(path: Buffer[]): Folder | Leaf | undefined {
    let node: Folder | Leaf | undefined = this.root;
    for (const part of path) {
      if (!(node instanceof Folder)) return undefined;
      node = node.children.get(part.toString('latin1'));
    }
    return node;
  }
}

/**
 * Verification of a whole archive stream, member by member (MemberGuard) and through the data of
 * sparse members (SparseReader): what a restore would refuse while writing is refused here first.
 */
export class ArchiveVerifier {
  private readonly guard: MemberGuard;
  private sparse: SparseReader | undefined;

  constructor(memberPrefix: string) {
    this.guard = new MemberGuard(memberPrefix);
  }

  entry(entry: TarEntry): GuardedMember {
    this.sparse?.end();
    const member = this.guard.check(entry);
    this.sparse = member.action === 'file' && entry.sparse ? new SparseReader(entry.sparse, entry.size) : undefined;
    return member;
  }

  data(chunk: Buffer): void {
    this.sparse?.push(chunk);
  }

  end(): void {
    this.sparse?.end();
    this.sparse = undefined;
  }
}
