/**
 * The upload spool of a backup's downtime: while CVAT is stopped or frozen, the files a backup
 * writes (packs, index files) land here, on this machine's disk, instead of on the remote; they
 * are uploaded once CVAT runs again (cache.ts, `CachedBackend.deferUploads`). So the downtime
 * never waits on the network.
 *
 * One folder per process, `<cache>/spool/<pid>-<random>/<kind>/<name>`, with an `owner` file
 * naming the process (host, pid). A file is written as the local backend writes one: to a
 * temporary name, fsynced, renamed, the folder fsynced. Nothing here is uploaded by anyone but the
 * process that wrote it: a process that dies (a crash, a kill during the downtime) leaves its
 * folder, and the next command that opens the cache deletes it (`removeStaleSpools`). No snapshot
 * can name what is only in a spool, since the snapshot is written after the upload; so deleting a
 * dead spool loses nothing a snapshot needs, and the remote holds no partial state from it.
 */
import { readRange, writeParts } from './file-range.js';
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { dirname, join } from 'node:path';
import type { FileKind } from './backend.js';

/** A file in the spool. */
export interface SpooledFile {
  kind: FileKind;
  name: string;
  size: number;
  /** Metadata (index, snapshots, tree packs): moved into the cache once uploaded. */
  cacheable: boolean;
}

const OWNER = 'owner';
/** A spool folder with no readable owner is deleted once it is this old (it was never used). */
const ORPHAN_AGE_MS = 24 * 3600_000;

async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}


export class UploadSpool {
  private readonly files = new Map<string, SpooledFile>();

  private constructor(readonly dir: string) {}

  /** A new, empty spool folder of this process under `spoolRoot`. */
  static async create(spoolRoot: string): Promise<UploadSpool> {
    await mkdir(spoolRoot, { recursive: true, mode: 0o700 });
    const dir = join(spoolRoot, `${process.pid}-${randomBytes(6).toString('hex')}`);
    await mkdir(dir, { mode: 0o700 });
    await writeFile(join(dir, OWNER), JSON.stringify({ hostname: hostname(), pid: process.pid }), { mode: 0o600 });
    await fsyncDir(spoolRoot);
    return new UploadSpool(dir);
  }

  private path(kind: FileKind, name: string): string {
    return join(this.dir, kind, name);
  }

  has(kind: FileKind, name: string): boolean {
    return this.files.has(`${kind}/${name}`);
  }

  get(kind: FileKind, name: string): SpooledFile | undefined {
    return this.files.get(`${kind}/${name}`);
  }

  /** What the spool holds, in the order it was written. */
  list(kind?: FileKind): SpooledFile[] {
    return [...this.files.values()].filter((f) => kind === undefined || f.kind === kind);
  }

  /** Stores a file durably (as the local backend does). Idempotent for the same content. */
  async write(kind: FileKind, name: string, parts: Buffer[], cacheable: boolean): Promise<void> {
    const target = this.path(kind, name);
    await mkdir(dirname(target), { recursive: true, mode: 0o700 });
    const temp = `${target}.tmp-${randomBytes(6).toString('hex')}`;
    const handle = await open(temp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
    try {
      await writeParts(handle, parts);
      await handle.sync();
    } catch (error) {
      await handle.close().catch(() => undefined);
      await rm(temp, { force: true });
      throw error;
    }
    await handle.close();
    await rename(temp, target);
    await fsyncDir(dirname(target));
    this.files.set(`${kind}/${name}`, { kind, name, size: parts.reduce((n, p) => n + p.length, 0), cacheable });
  }

  /** A spooled file, whole or a range of it (shorter at its end). */
  async read(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const handle = await open(this.path(kind, name), constants.O_RDONLY | constants.O_NOFOLLOW);
    try {
      if (!range) return await handle.readFile();
      return await readRange(handle, range.offset, range.length);
    } finally {
      await handle.close();
    }
  }

  /** The file's path, for a caller that moves it elsewhere (into the cache) and then calls `forget`. */
  pathOf(file: SpooledFile): string {
    return this.path(file.kind, file.name);
  }

  /** Drops a file from the spool (uploaded, or removed). Idempotent. */
  async remove(kind: FileKind, name: string): Promise<void> {
    this.files.delete(`${kind}/${name}`);
    await rm(this.path(kind, name), { force: true });
  }

  /** Forgets a file already moved out of the spool folder. */
  forget(file: SpooledFile): void {
    this.files.delete(`${file.kind}/${file.name}`);
  }

  /** Deletes the spool folder and everything in it. Idempotent. */
  async discard(): Promise<void> {
    this.files.clear();
    await rm(this.dir, { recursive: true, force: true });
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Deletes the spool folders of processes on this host that are gone (crashed or killed during a
 * downtime), and ownerless ones older than a day. Spools of live processes, and of other hosts
 * sharing the folder, are left alone. Returns the folders deleted.
 */
export async function removeStaleSpools(spoolRoot: string, now: number = Date.now()): Promise<string[]> {
  const removed: string[] = [];
  for (const entry of await readdir(spoolRoot).catch(() => [])) {
    const dir = join(spoolRoot, entry);
    let owner: { hostname?: unknown; pid?: unknown } | undefined;
    try {
      owner = JSON.parse(await readFile(join(dir, OWNER), 'utf8')) as typeof owner;
    } catch {
      owner = undefined;
    }
    let stale: boolean;
    if (owner && typeof owner.pid === 'number' && typeof owner.hostname === 'string') {
      stale = owner.hostname === hostname() && owner.pid !== process.pid && !alive(owner.pid);
    } else {
      const info = await stat(dir).catch(() => undefined);
      stale = info !== undefined && now - info.mtimeMs > ORPHAN_AGE_MS;
    }
    if (!stale) continue;
    await rm(dir, { recursive: true, force: true });
    removed.push(entry);
  }
  return removed;
}
