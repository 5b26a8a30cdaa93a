/**
 * Folder handles: every path component is reached relative to a folder that is already open, and
 * no symbolic link is ever followed, so nothing that a hostile archive, snapshot or container puts
 * into a volume (a folder swapped for a link, a link named like a folder, a FIFO, a device node)
 * can make us create, change or read anything outside that volume, or block.
 *
 * Linux's openat(2) family does this; Node has none of it. Here a component is reached as
 * `/proc/self/fd/<folder fd>/<name>`: the kernel resolves the magic link `/proc/self/fd/<fd>` to
 * the open folder itself (not to its path, which may have been swapped since), then looks `name`
 * up in it; O_NOFOLLOW, and the l-variants of the calls (lstat, lchown, lutimes, readlink, link,
 * unlink, mkdir, symlink never follow a last component), keep that last component from being
 * followed. Without /proc there is no safe way: `DirHandle.openRoot` then fails; there is no
 * unsafe fallback.
 *
 * Files are opened for reading in two steps: first as O_PATH (a handle that opens nothing, so a
 * device node swapped in has no side effect and a FIFO cannot block), checked with fstat to be the
 * regular file that was listed (device and inode), then reopened through `/proc/self/fd/<fd>`,
 * which reaches exactly that inode. A walk can also list through such handles (`lookup`, an
 * EntryHandle): the O_PATH handle's fstat is the listing, and a folder or file opened through it
 * is the one listed, with no second check.
 *
 * Names given to a handle are one path component: '' , '.', '..', and anything with '/' or NUL
 * are refused (code EINVAL).
 */
import {
  close as closeCallback,
  closeSync,
  constants,
  fchmod as fchmodCallback,
  fchown as fchownCallback,
  fstat as fstatCallback,
  fstatSync,
  futimes as futimesCallback,
  lstatSync,
  open as openCallback,
  openSync,
  readdirSync,
  type BigIntStats,
} from 'node:fs';
import { access, lchown, link, lstat, lutimes, mkdir, readdir, readlink, rename, rmdir, symlink, unlink } from 'node:fs/promises';
import { promisify } from 'node:util';

const openFd = promisify(openCallback) as (path: Buffer | string, flags: number, mode?: number) => Promise<number>;
const fstatFd = promisify(fstatCallback) as (fd: number, options: { bigint: true }) => Promise<BigIntStats>;
const fchmodFd = promisify(fchmodCallback);
const fchownFd = promisify(fchownCallback);
const futimesFd = promisify(futimesCallback);
/** Closes a file descriptor that this module (or its caller) opened by number. */
export const closeFd = promisify(closeCallback);

/** Linux's O_PATH (the same value on x86-64 and arm64); Node does not export it. */
export const O_PATH = 0o10000000;

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_DIRECTORY, O_NONBLOCK, O_NOCTTY } = constants;
const DIR_FLAGS = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK;
/** Reopening `/proc/self/fd/<O_PATH fd>`: that magic link must be followed (it is the inode itself). */
const REOPEN_DIR_FLAGS = O_RDONLY | O_DIRECTORY | O_NONBLOCK;
const SLASH = 0x2f;

function invalid(name: Buffer): Error {
  return Object.assign(new Error(`'${name.toString('utf8')}' is not a single path component`), { code: 'EINVAL' });
}

/** True if `name` is one path component that names a child (not '', '.', '..'; no '/' or NUL). */
export function isComponent(name: Buffer): boolean {
  if (name.length === 0 || name.includes(SLASH) || name.includes(0)) return false;
  return !(name.length <= 2 && name[0] === 0x2e && (name.length === 1 || name[1] === 0x2e));
}

function component(name: Buffer | string): Buffer {
  const bytes = typeof name === 'string' ? Buffer.from(name) : name;
  if (!isComponent(bytes)) throw invalid(bytes);
  return bytes;
}

/** The error a read gets when what it opened is not what was listed: the caller reads it again later. */
export function changedError(what: string): Error {
  return Object.assign(new Error(`${what} changed while it was read`), { code: 'ECHANGED' });
}

/** What was listed (lstat) and must still be there when a file is opened. */
export interface ExpectedFile {
  dev: bigint;
  ino: bigint;
}

/** An open regular file for reading, checked to be the inode that was listed. */
export interface OpenedFile {
  fd: number;
  stat: BigIntStats;
}

let procChecked: Promise<void> | undefined;

async function requireProc(): Promise<void> {
  procChecked ??= access('/proc/self/fd').catch((error: unknown) => {
    procChecked = undefined;
    throw Object.assign(new Error('safe access to volume folders needs /proc (Linux): /proc/self/fd is not available'), { code: 'ENOPROC', cause: error });
  });
  return procChecked;
}

export class DirHandle {
  private closed = false;

  private constructor(readonly fd: number) {}

  /**
   * Opens a folder given by a trusted path (a volume's mount point from the engine). The folder
   * itself must not be a symbolic link.
   */
  static async openRoot(path: string): Promise<DirHandle> {
    await requireProc();
    return new DirHandle(await openFd(path, DIR_FLAGS));
  }

  static openRootSync(path: string): DirHandle {
    return new DirHandle(openSync(path, DIR_FLAGS));
  }

  /** Takes over an open folder's descriptor (EntryHandle.openDir). */
  static fromFd(fd: number): DirHandle {
    return new DirHandle(fd);
  }

  /** `/proc/self/fd/<fd>/<name>`: the child `name` of this open folder, for one system call. */
  entry(name: Buffer | string): Buffer {
    return Buffer.concat([Buffer.from(`/proc/self/fd/${this.fd}/`), component(name)]);
  }

  /** This folder itself, as a path the kernel resolves to the open folder. */
  get self(): string {
    return `/proc/self/fd/${this.fd}`;
  }

  async openDir(name: Buffer | string): Promise<DirHandle> {
    return new DirHandle(await openFd(this.entry(name), DIR_FLAGS));
  }

  openDirSync(name: Buffer | string): DirHandle {
    return new DirHandle(openSync(this.entry(name), DIR_FLAGS));
  }

  /** Creates a folder (never through a link: an existing entry of that name fails with EEXIST). */
  async mkdir(name: Buffer | string, mode = 0o700): Promise<void> {
    await mkdir(this.entry(name), { mode });
  }

  /** Creates a new regular file for writing; fails if anything of that name exists. Returns its fd. */
  async createFile(name: Buffer | string, mode = 0o600): Promise<number> {
    return openFd(this.entry(name), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_NONBLOCK, mode);
  }

  async symlink(target: Buffer, name: Buffer | string): Promise<void> {
    await symlink(target, this.entry(name));
  }

  /** A hard link `name` here to `fromName` in `from` (linkat without following: a link to a symlink is a symlink). */
  async link(from: DirHandle, fromName: Buffer | string, name: Buffer | string): Promise<void> {
    await link(from.entry(fromName), this.entry(name));
  }

  async lstat(name: Buffer | string): Promise<BigIntStats> {
    return lstat(this.entry(name), { bigint: true });
  }

  lstatSync(name: Buffer | string): BigIntStats {
    return lstatSync(this.entry(name), { bigint: true });
  }

  async readdir(): Promise<Buffer[]> {
    return readdir(this.self, { encoding: 'buffer' });
  }

  readdirSync(): Buffer[] {
    return readdirSync(this.self, { encoding: 'buffer' });
  }

  async readlink(name: Buffer | string): Promise<Buffer> {
    return readlink(this.entry(name), { encoding: 'buffer' });
  }

  /**
   * The target of the symbolic link `name`; code ECHANGED if `name` is no longer a link (or is
   * gone). A link's target cannot change in place, and reading another link of this folder reads
   * nothing outside it, so no inode check is needed.
   */
  async readListedLink(name: Buffer | string): Promise<Buffer> {
    return this.readlink(name).catch((error: unknown) => {
      if ((error as NodeJS.ErrnoException).code === 'EINVAL') throw Object.assign(changedError(`'${name.toString()}'`), { cause: error });
      return rethrowChanged(name)(error);
    });
  }

  /**
   * Looks the child `name` up without following it or opening it (O_PATH): what it is now, held
   * so that whatever is done next reaches exactly that inode. Code ECHANGED if it is gone. The
   * caller closes the handle.
   */
  lookupSync(name: Buffer | string): EntryHandle {
    let pathFd: number;
    try {
      pathFd = openSync(this.entry(name), O_PATH | O_NOFOLLOW);
    } catch (error) {
      return rethrowChanged(name)(error);
    }
    try {
      return new EntryHandle(pathFd, fstatSync(pathFd, { bigint: true }), name);
    } catch (error) {
      closeSync(pathFd);
      throw error;
    }
  }

  async lookup(name: Buffer | string): Promise<EntryHandle> {
    const pathFd = await openFd(this.entry(name), O_PATH | O_NOFOLLOW).catch(rethrowChanged(name));
    try {
      return new EntryHandle(pathFd, await fstatFd(pathFd, { bigint: true }), name);
    } catch (error) {
      await closeFd(pathFd);
      throw error;
    }
  }

  /** Owner and times of a child without following it (for symbolic links). */
  async lchown(name: Buffer | string, uid: number, gid: number): Promise<void> {
    await lchown(this.entry(name), uid, gid);
  }

  async lutimes(name: Buffer | string, atime: number, mtime: number): Promise<void> {
    await lutimes(this.entry(name), atime, mtime);
  }

  async unlink(name: Buffer | string): Promise<void> {
    await unlink(this.entry(name));
  }

  async rmdir(name: Buffer | string): Promise<void> {
    await rmdir(this.entry(name));
  }

  /**
   * Moves the child `name` to `toName` in the open folder `to` (renameat: neither name is
   * followed; a link moves as a link). An existing file or empty folder at `toName` is replaced,
   * as rename(2) does: callers move into folders they made empty.
   */
  async rename(name: Buffer | string, to: DirHandle, toName: Buffer | string = name): Promise<void> {
    await rename(this.entry(name), to.entry(toName));
  }

  async stat(): Promise<BigIntStats> {
    return fstatFd(this.fd, { bigint: true });
  }

  /** Owner, mode and times of this folder itself. */
  async setMeta(uid: number, gid: number, mode: number | undefined, mtime: number | undefined): Promise<void> {
    await setFileMeta(this.fd, uid, gid, mode, mtime);
  }

  /**
   * Opens the regular file `name` for reading without following a link and without opening
   * anything else: a FIFO, device, socket, folder or link of that name, or an inode other than
   * `expected`, fails with code ECHANGED (the caller treats it as changed and reads it again).
   */
  async openFile(name: Buffer | string, expected?: ExpectedFile): Promise<OpenedFile> {
    const listed = await this.lookup(name);
    try {
      checkOpened(listed.stat, expected, name);
      return { fd: await listed.openFile(), stat: listed.stat };
    } finally {
      await listed.close();
    }
  }

  openFileSync(name: Buffer | string, expected?: ExpectedFile): OpenedFile {
    const listed = this.lookupSync(name);
    try {
      checkOpened(listed.stat, expected, name);
      return { fd: listed.openFileSync(), stat: listed.stat };
    } finally {
      listed.closeSync();
    }
  }

  /**
   * Deletes the child `name` and everything below it, never following a link (a folder swapped
   * for a link meanwhile is unlinked, not entered). Missing is fine.
   */
  async removeTree(name: Buffer | string): Promise<void> {
    let st: BigIntStats;
    try {
      st = await this.lstat(name);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw error;
    }
    if (!st.isDirectory()) {
      await this.unlink(name).catch(ignoreMissing);
      return;
    }
    let child: DirHandle;
    try {
      child = await this.openDir(name);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      // Swapped for something that is not a folder since the lstat: remove that instead.
      if (code === 'ENOTDIR' || code === 'ELOOP') return this.removeTree(name);
      throw error;
    }
    try {
      for (const entry of await child.readdir()) await child.removeTree(entry);
    } finally {
      await child.close();
    }
    await this.rmdir(name).catch(ignoreMissing);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await closeFd(this.fd);
  }

  closeSync(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.fd);
  }
}

/**
 * A folder's entry as looked up (DirHandle.lookup): an O_PATH handle, which opened nothing (no
 * device was opened, no FIFO can block), and its fstat — an lstat that cannot go stale: opening
 * the file or folder through it (`/proc/self/fd/<fd>`) reaches exactly that inode, whatever was
 * renamed or swapped in under its name since. Only a regular file or a folder is ever opened.
 */
export class EntryHandle {
  private closed = false;

  constructor(
    readonly fd: number,
    readonly stat: BigIntStats,
    private readonly name: Buffer | string,
  ) {}

  private reopenPath(check: boolean): string {
    // Closed, its number may already name another file: never reopened then.
    if (this.closed) throw new Error(`the handle of '${this.name.toString()}' is closed`);
    if (!check) throw changedError(`'${this.name.toString()}'`);
    return `/proc/self/fd/${this.fd}`;
  }

  /** Opens it for reading if it is a regular file (else code ECHANGED); returns the descriptor. */
  openFileSync(): number {
    return openSync(this.reopenPath(this.stat.isFile()), O_RDONLY | O_NONBLOCK | O_NOCTTY);
  }

  async openFile(): Promise<number> {
    return openFd(this.reopenPath(this.stat.isFile()), O_RDONLY | O_NONBLOCK | O_NOCTTY);
  }

  /** A handle on it if it is a folder (else code ECHANGED). */
  openDirSync(): DirHandle {
    return DirHandle.fromFd(openSync(this.reopenPath(this.stat.isDirectory()), REOPEN_DIR_FLAGS));
  }

  async openDir(): Promise<DirHandle> {
    return DirHandle.fromFd(await openFd(this.reopenPath(this.stat.isDirectory()), REOPEN_DIR_FLAGS));
  }

  closeSync(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.fd);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await closeFd(this.fd);
  }
}

/**
 * True for the errors that mean "this entry is not what was listed any more": gone (ENOENT), a
 * folder or file swapped for a link (ELOOP, ENOTDIR), another inode or type (ECHANGED).
 */
export function isChangedError(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ECHANGED' || code === 'ENOENT' || code === 'ELOOP' || code === 'ENOTDIR';
}

function ignoreMissing(error: unknown): void {
  if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
}

function checkOpened(st: BigIntStats, expected: ExpectedFile | undefined, name: Buffer | string): void {
  if (!st.isFile() || (expected !== undefined && (st.dev !== expected.dev || st.ino !== expected.ino))) {
    throw changedError(`'${name.toString()}'`);
  }
}

function rethrowChanged(name: Buffer | string): (error: unknown) => never {
  return (error: unknown) => {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ELOOP' || code === 'ENOTDIR') throw Object.assign(changedError(`'${name.toString()}'`), { cause: error });
    throw error;
  };
}

/** Owner, then mode (chown clears setuid/setgid), then times, of an open file or folder. */
export async function setFileMeta(fd: number, uid: number, gid: number, mode: number | undefined, mtime: number | undefined): Promise<void> {
  await fchownFd(fd, uid, gid);
  if (mode !== undefined) await fchmodFd(fd, mode & 0o7777);
  if (mtime !== undefined) await futimesFd(fd, mtime, mtime);
}
