/**
 * The native folder listing (native/walk.c), typed: a folder's entries with their lstat in one
 * call, off the JavaScript thread, as flat arrays (no object per entry); and the checked open of
 * an entry so listed. Same trust model as beneath.ts: nothing is followed, no device or FIFO is
 * opened, and what is opened is the device and inode that was listed (else code ECHANGED).
 *
 * Undefined when the native helper is not there (or CVAT_BACKUP_NATIVE=off): callers then walk
 * with DirHandle (readdir + lookup per entry), which gives the same result, slower.
 */
import { constants } from 'node:os';
import { nativeHelper } from './native.js';

/** Per entry in `nums`: st_mode, uid, gid, size, nlink, rdev, errno of the entry's lstat (0: listed). */
export const NUMS = 7;
/** Per entry in `text`: name (base64), mtime ns, ctime ns, inode, device (decimal), ends in `textEnds`. */
export const TEXTS = 5;

/** A folder's entries (not '.' and '..'), sorted by name bytes as Buffer.compare sorts. */
export interface FolderListing {
  count: number;
  /** Name bytes of all entries, one after the other; entry i ends at nameEnds[i]. */
  names: Buffer;
  nameEnds: Uint32Array;
  /** Latin-1 text of all entries' fields (TEXTS each), one after the other; ends in textEnds. */
  text: Buffer;
  textEnds: Uint32Array;
  nums: Float64Array;
  /** With a parent tree given to listFolder: sameAsParent's answer for it, worked out on the pool. */
  same: Uint32Array | null;
}

export interface NativeWalk {
  /**
   * Lists the open folder `fd` (it may be closed as soon as this returns: the listing reads its
   * own description). With `parent`, the listing's `same` is sameAsParent(..., parent, racySince),
   * done in the same job off this thread (else null).
   */
  listFolder(fd: number, parent?: Buffer, racySince?: bigint | null): Promise<FolderListing>;
  /**
   * Opens the entry `name` of the open folder `dirfd` for reading if it is still the regular file
   * (`folder` false) or folder (`folder` true) with that device and inode; else code ECHANGED,
   * ENOENT, ELOOP or ENOTDIR (isChangedError). Returns the descriptor; the caller closes it.
   */
  openListed(dirfd: number, name: Buffer, dev: string, ino: string, folder: boolean): number;
  /**
   * Whether the listing is the parent tree `parent` (JSON) node for node, as the archiver would
   * write it again: every entry a file with one link (not racy: mtime and ctime before
   * `racySince`) followed by its content, or a folder followed by its subtree, at the same place
   * with the same metadata, and no other node. Returns the start and end offset of each entry's
   * node in `parent` (two per entry), or null.
   */
  sameAsParent(text: Buffer, textEnds: Uint32Array, nums: Float64Array, parent: Buffer, racySince: bigint | null): Uint32Array | null;
}

/** The native walk, or undefined (then nativeUnavailableReason() says why). */
export function nativeWalk(): NativeWalk | undefined {
  const helper = nativeHelper();
  return helper && typeof helper['listFolder'] === 'function' ? (helper as unknown as NativeWalk) : undefined;
}

const errnoNames = new Map(Object.entries(constants.errno).map(([name, value]) => [value, name]));

/** The name of an errno number (ENOENT for 2), as Node's errors have it in `code`. */
export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `E${errno}`;
}
