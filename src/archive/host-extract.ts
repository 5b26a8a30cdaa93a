/**
 * The direct path of a restore: extract an archive into a volume folder on this host (local
 * engine, root). Keeps what the engine's extraction drops: holes of sparse files (GNU sparse 1.0,
 * 0.x and old GNU 'S').
 *
 * Contract: `root` is empty (the rollback point moved the old files aside) except for entries
 * starting with `.cvat-backup-`. Every member passes MemberGuard (the same rules the set was
 * verified with before CVAT stopped); a member it refuses fails the stream, and the restore puts
 * the previous data back.
 *
 * Whatever the guard lets through, nothing is written outside the volume: every path component is
 * created and opened relative to an open folder handle (DirHandle), never following a link, so a
 * link the archive made (or anything else) cannot redirect a later member, whatever the order of
 * members. Files are created new (O_EXCL, O_NOFOLLOW) and their owner, mode and times are set on
 * the open descriptor (fchown, fchmod, futimes), symbolic links' with lchown/lutimes; hard links
 * are made with linkat semantics (no link is followed) to a regular file this extraction made.
 * Owners are set before modes (chown clears setuid/setgid); folders' owners, modes and times are
 * set last, once nothing more is created in them.
 *
 * Members come in any order, so open folder handles are kept in a small cache (most recently used).
 */
import { write as writeCallback, ftruncate as ftruncateCallback } from 'node:fs';
import { promisify } from 'node:util';
import { Writable } from 'node:stream';
import { CorruptArchiveError } from '../errors.js';
import { DirHandle, closeFd, setFileMeta } from '../fs/beneath.js';
import { MemberGuard, isReservedName } from './member-guard.js';
import { SparseReader } from './sparse.js';
import type { TarEntry, TarItem } from './tar.js';

const writeFd = promisify(writeCallback);
const ftruncateFd = promisify(ftruncateCallback);

/** Folder handles kept open; members are usually grouped by folder, so a few dozen is plenty. */
const FOLDER_CACHE = 64;

interface OpenFile {
  entry: TarEntry;
  display: string;
  fd: number;
  /** Bytes of the member's data still to come. */
  remaining: number;
  sparse: SparseReader | undefined;
  position: number;
}

export interface HostExtractResult {
  skipped: string[];
  /** The archive's volume root (`./`): owner, mode, modification time; undefined when it has none. */
  root?: { uid: number; gid: number; mode: number | undefined; mtime: number | undefined } | undefined;
}

function keyOf(path: Buffer[]): string {
  return path.map((p) => p.toString('latin1')).join('/');
}

async function writeFully(fd: number, data: Buffer, position: number): Promise<void> {
  let offset = 0;
  while (offset < data.length) {
    offset += (await writeFd(fd, data, offset, data.length - offset, position + offset)).bytesWritten;
  }
}

export class HostExtractor extends Writable {
  readonly result: HostExtractResult = { skipped: [] };
  private readonly guard: MemberGuard;
  private root: DirHandle | undefined;
  private readonly folders = new Map<string, DirHandle>();
  /** Declared folders and their last header: owner, mode and times are set at the end. */
  private readonly directories = new Map<string, { path: Buffer[]; entry: TarEntry }>();
  private rootEntry: TarEntry | undefined;
  private file: OpenFile | undefined;

  /**
   * `leaveRoot`: the folder is a staged one whose entries move into the volume later: its own
   * owner, mode and times are left as they are, and `result.root` says what they should be.
   */
  constructor(
    private readonly rootPath: string,
    memberPrefix: string,
    private readonly leaveRoot = false,
  ) {
    super({ objectMode: true, highWaterMark: 64 });
    this.guard = new MemberGuard(memberPrefix);
  }

  override _construct(callback: (error?: Error | null) => void): void {
    DirHandle.openRoot(this.rootPath).then(
      (handle) => {
        this.root = handle;
        callback();
      },
      (error: Error) => callback(error),
    );
  }

  override _write(item: TarItem, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    (item.kind === 'entry' ? this.onEntry(item.entry) : this.onData(item.chunk)).then(() => callback(), callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.finish().then(() => callback(), callback);
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    const file = this.file;
    this.file = undefined;
    const closing: Promise<unknown>[] = [...this.folders.values()].map((h) => h.close());
    this.folders.clear();
    if (file) closing.push(closeFd(file.fd));
    if (this.root) closing.push(this.root.close());
    Promise.allSettled(closing).then(() => callback(error), () => callback(error));
  }

  private get rootHandle(): DirHandle {
    if (!this.root) throw new Error('volume folder is not open');
    return this.root;
  }

  /**
   * The open folder at `path` (components below the root), made when `create` and missing. A
   * component that is not a folder (a link, a file) fails: it is never followed.
   */
  private async folder(path: Buffer[], create: boolean): Promise<DirHandle> {
    if (path.length === 0) return this.rootHandle;
    const key = keyOf(path);
    const cached = this.folders.get(key);
    if (cached) {
      this.folders.delete(key);
      this.folders.set(key, cached);
      return cached;
    }
    const parent = await this.folder(path.slice(0, -1), create);
    const name = path[path.length - 1]!;
    if (path.length === 1 && isReservedName(name)) throw new CorruptArchiveError(`'${name.toString('utf8')}' is cvat-backup's own folder`);
    let handle: DirHandle;
    try {
      handle = await parent.openDir(name);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' || !create) {
        throw new CorruptArchiveError(`'${keyOf(path)}' is not a folder this restore made (${code ?? 'error'})`, { cause: error });
      }
      await parent.mkdir(name, 0o700);
      handle = await parent.openDir(name);
    }
    this.folders.set(key, handle);
    if (this.folders.size > FOLDER_CACHE) {
      const [oldestKey, oldest] = this.folders.entries().next().value as [string, DirHandle];
      this.folders.delete(oldestKey);
      await oldest.close();
    }
    return handle;
  }

  /**
   * Opens the folder at `path` without the cache and without making anything (hard link targets);
   * `release` closes what was opened.
   */
  private async openExisting(path: Buffer[]): Promise<{ dir: DirHandle; release: () => Promise<void> }> {
    let handle: DirHandle | undefined;
    try {
      for (const [i, name] of path.entries()) {
        if (i === 0 && isReservedName(name)) throw new CorruptArchiveError(`'${name.toString('utf8')}' is cvat-backup's own folder`);
        const next: DirHandle = await (handle ?? this.rootHandle).openDir(name);
        await handle?.close();
        handle = next;
      }
    } catch (error) {
      await handle?.close();
      if (error instanceof CorruptArchiveError) throw error;
      throw new CorruptArchiveError(`'${keyOf(path)}' is not a folder this restore made`, { cause: error });
    }
    const opened = handle;
    return opened ? { dir: opened, release: () => opened.close() } : { dir: this.rootHandle, release: () => Promise.resolve() };
  }

  private async onEntry(entry: TarEntry): Promise<void> {
    if (this.file) throw new CorruptArchiveError('tar member ended early');
    const member = this.guard.check(entry);
    switch (member.action) {
      case 'skip':
        this.result.skipped.push(`${member.display} (${member.reason})`);
        return;
      case 'root':
        this.rootEntry = entry;
        return;
      case 'dir': {
        const parent = await this.folder(member.path.slice(0, -1), true);
        const name = member.path[member.path.length - 1]!;
        const key = keyOf(member.path);
        if (!this.folders.has(key)) {
          try {
            await parent.mkdir(name, 0o700);
          } catch (error) {
            if ((error as NodeJS.ErrnoException).code !== 'EEXIST' || !(await parent.lstat(name)).isDirectory()) throw error;
          }
        }
        this.directories.delete(key);
        this.directories.set(key, { path: member.path, entry });
        return;
      }
      case 'symlink': {
        const parent = await this.folder(member.path.slice(0, -1), true);
        const name = member.path[member.path.length - 1]!;
        await parent.symlink(member.target, name);
        await parent.lchown(name, entry.uid, entry.gid);
        await parent.lutimes(name, entry.mtime, entry.mtime);
        return;
      }
      case 'hardlink': {
        const parent = await this.folder(member.path.slice(0, -1), true);
        const from = await this.openExisting(member.target.slice(0, -1));
        try {
          const fromName = member.target[member.target.length - 1]!;
          // The guard says it is a file this archive made; the folder handles make sure of it.
          if (!(await from.dir.lstat(fromName)).isFile()) throw new CorruptArchiveError(`hard link target '${keyOf(member.target)}' is not a regular file`);
          await parent.link(from.dir, fromName, member.path[member.path.length - 1]!);
        } finally {
          await from.release();
        }
        return;
      }
      case 'file': {
        const parent = await this.folder(member.path.slice(0, -1), true);
        const fd = await parent.createFile(member.path[member.path.length - 1]!, 0o600);
        this.file = {
          entry,
          display: keyOf(member.path),
          fd,
          remaining: entry.size,
          position: 0,
          sparse: entry.sparse ? new SparseReader(entry.sparse, entry.size) : undefined,
        };
        if (entry.size === 0) await this.closeFile();
        return;
      }
    }
  }

  private async onData(chunk: Buffer): Promise<void> {
    const file = this.file;
    if (!file) return; // data of a skipped member
    file.remaining -= chunk.length;
    if (!file.sparse) {
      await writeFully(file.fd, chunk, file.position);
      file.position += chunk.length;
    } else {
      for (const piece of file.sparse.push(chunk)) await writeFully(file.fd, piece.data, piece.offset);
    }
    if (file.remaining === 0) await this.closeFile();
  }

  private async closeFile(): Promise<void> {
    const file = this.file!;
    this.file = undefined;
    try {
      if (file.sparse) {
        file.sparse.end();
        await ftruncateFd(file.fd, file.sparse.realSize);
      }
      await setFileMeta(file.fd, file.entry.uid, file.entry.gid, file.entry.mode, file.entry.mtime);
    } finally {
      await closeFd(file.fd);
    }
  }

  private async finish(): Promise<void> {
    if (this.file) throw new CorruptArchiveError('tar member ended early');
    // Nothing more is created: owners, modes and times of folders stay as set.
    for (const { path, entry } of this.directories.values()) {
      const dir = await this.folder(path, false);
      await dir.setMeta(entry.uid, entry.gid, entry.mode, entry.mtime);
    }
    if (this.rootEntry) {
      const { uid, gid, mode, mtime } = this.rootEntry;
      this.result.root = { uid, gid, mode, mtime };
      if (!this.leaveRoot) await this.rootHandle.setMeta(uid, gid, mode, mtime);
    }
    for (const handle of this.folders.values()) await handle.close();
    this.folders.clear();
  }
}
