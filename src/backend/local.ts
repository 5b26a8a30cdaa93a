/**
 * A repository in a local folder. Layout (as restic's): `config`, `keys/`, `data/<2 hex>/`,
 * `index/`, `snapshots/`, `locks/`, `state/`. Writes go to a temporary file (`.tmp-<random>`) in
 * the same folder, are fsynced, renamed into place, and the folder is fsynced; removals fsync the
 * folder too, so a crash never brings back a deleted file (a pack prune believed gone, a lock).
 */
import { readRange, writeParts } from './file-range.js';
import { randomBytes } from 'node:crypto';
import { lstat, mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { TargetNotEmptyError } from '../errors.js';
import type { Backend, FileInfo, FileKind, StagedFile, TemporaryFile } from './backend.js';

const KINDS: FileKind[] = ['keys', 'data', 'index', 'snapshots', 'locks', 'state'];
const TEMPORARY = '.tmp-';

async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * Whether `dir` holds only what an interrupted `create` leaves: our empty layout folders (and a
 * file system's `lost+found`, when the repository is the root of its own file system).
 */
async function onlyEmptyLayout(dir: string): Promise<boolean> {
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (entry.name === 'lost+found' && entry.isDirectory()) continue;
    if (!entry.isDirectory() || !(KINDS as string[]).includes(entry.name)) return false;
    const inside = await readdir(join(dir, entry.name), { withFileTypes: true });
    if (entry.name !== 'data') {
      if (inside.length > 0) return false;
      continue;
    }
    for (const sub of inside) {
      if (!sub.isDirectory() || !/^[0-9a-f]{2}$/.test(sub.name)) return false;
      if ((await readdir(join(dir, 'data', sub.name))).length > 0) return false;
    }
  }
  return true;
}

export class LocalBackend implements Backend {
  constructor(readonly location: string) {}

  localPath(kind: FileKind, name: string): string {
    return this.path(kind, name);
  }

  private path(kind: FileKind, name: string): string {
    if (kind === 'config') return join(this.location, 'config');
    if (kind === 'data') return join(this.location, 'data', name.slice(0, 2), name);
    return join(this.location, kind, name);
  }

  async exists(): Promise<boolean> {
    return (await stat(join(this.location, 'config')).catch(() => undefined)) !== undefined;
  }

  async create(): Promise<void> {
    const existing = await lstat(this.location).catch(() => undefined);
    if (existing !== undefined && !existing.isDirectory()) {
      throw new TargetNotEmptyError(`${this.location} exists and is not a folder: give the repository a new or empty folder`);
    }
    if (existing !== undefined && !(await onlyEmptyLayout(this.location))) {
      throw new TargetNotEmptyError(`${this.location} is not empty and holds no repository: give the repository a new or empty folder`);
    }
    await mkdir(this.location, { recursive: true, mode: 0o700 });
    for (const kind of KINDS) await mkdir(join(this.location, kind), { recursive: true, mode: 0o700 });
    for (let i = 0; i < 256; i++) await mkdir(join(this.location, 'data', i.toString(16).padStart(2, '0')), { recursive: true, mode: 0o700 });
    await fsyncDir(this.location);
    await fsyncDir(dirname(this.location));
  }

  async save(kind: FileKind, name: string, data: Buffer | Buffer[]): Promise<void> {
    const target = this.path(kind, name);
    const temp = join(dirname(target), `${TEMPORARY}${randomBytes(8).toString('hex')}`);
    const handle = await open(temp, 'wx', 0o600).catch(async (error: NodeJS.ErrnoException) => {
      // Repositories made before `state/` existed get the folder on first use.
      if (error.code !== 'ENOENT' || kind !== 'state') throw error;
      await mkdir(dirname(target), { recursive: true, mode: 0o700 });
      return open(temp, 'wx', 0o600);
    });
    try {
      await writeParts(handle, Array.isArray(data) ? data : [data]);
      await handle.sync();
    } catch (error) {
      await handle.close().catch(() => undefined);
      await rm(temp, { force: true });
      throw error;
    }
    await handle.close();
    await rename(temp, target);
    await fsyncDir(dirname(target));
  }

  /**
   * A staged file is a `.tmp-*` file in the folder of its kind (for packs, a random one of the 256
   * data folders: the final name is known only at commit); commit fsyncs it, renames it into its
   * folder (one file system, so atomic) and fsyncs both folders.
   */
  async stage(kind: FileKind): Promise<StagedFile> {
    const dir = kind === 'data' ? join(this.location, 'data', randomBytes(1).toString('hex')) : join(this.location, kind);
    const temp = join(dir, `${TEMPORARY}${randomBytes(8).toString('hex')}`);
    const handle = await open(temp, 'wx', 0o600);
    let size = 0;
    let done = false;
    const abort = async (): Promise<void> => {
      if (done) return;
      done = true;
      await handle.close().catch(() => undefined);
      await rm(temp, { force: true });
    };
    return {
      get size() {
        return size;
      },
      append: async (parts) => {
        await writeParts(handle, parts, size);
        size += parts.reduce((n, p) => n + p.length, 0);
      },
      commit: async (name) => {
        if (done) throw new Error('staged file already committed or aborted');
        const target = this.path(kind, name);
        try {
          await handle.sync();
          await handle.close();
          done = true;
          await rename(temp, target);
        } catch (error) {
          done = false;
          await abort();
          throw error;
        }
        await fsyncDir(dirname(target));
        if (dirname(target) !== dir) await fsyncDir(dir);
      },
      abort,
    };
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const handle = await open(this.path(kind, name), 'r');
    try {
      if (!range) return await handle.readFile();
      return await readRange(handle, range.offset, range.length);
    } finally {
      await handle.close();
    }
  }

  async list(kind: FileKind): Promise<FileInfo[]> {
    if (kind === 'config') {
      const info = await stat(join(this.location, 'config')).catch(() => undefined);
      return info ? [{ name: 'config', size: info.size, modifiedMs: info.mtimeMs }] : [];
    }
    const out: FileInfo[] = [];
    for (const dir of await this.folders(kind)) {
      for (const name of await readdir(dir).catch(() => [])) {
        if (name.startsWith('.')) continue;
        const info = await stat(join(dir, name)).catch(() => undefined);
        if (info?.isFile()) out.push({ name, size: info.size, modifiedMs: info.mtimeMs });
      }
    }
    return out;
  }

  async stat(kind: FileKind, name: string): Promise<number | undefined> {
    const info = await stat(this.path(kind, name)).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT' || error.code === 'ENOTDIR') return undefined;
      throw error;
    });
    return info?.size;
  }

  async remove(kind: FileKind, name: string): Promise<void> {
    const path = this.path(kind, name);
    await rm(path, { force: true });
    await fsyncDir(dirname(path));
  }

  async listTemporary(): Promise<TemporaryFile[]> {
    const out: TemporaryFile[] = [];
    for (const kind of KINDS) {
      for (const dir of await this.folders(kind)) {
        for (const name of await readdir(dir).catch(() => [])) {
          if (!name.startsWith(TEMPORARY)) continue;
          const info = await stat(join(dir, name)).catch(() => undefined);
          // The folder is named in the name: a temporary file of data/ab/ is `ab/.tmp-…`.
          if (info?.isFile()) out.push({ kind, name: kind === 'data' ? `${basename(dir)}/${name}` : name, size: info.size, modifiedMs: info.mtimeMs });
        }
      }
    }
    const top = await readdir(this.location).catch(() => []);
    for (const name of top.filter((n) => n.startsWith(TEMPORARY))) {
      const info = await stat(join(this.location, name)).catch(() => undefined);
      if (info?.isFile()) out.push({ kind: 'config', name, size: info.size, modifiedMs: info.mtimeMs });
    }
    return out;
  }

  async removeTemporary(file: TemporaryFile): Promise<void> {
    const base = file.name.slice(file.name.lastIndexOf('/') + 1);
    if (!base.startsWith(TEMPORARY) || base.includes('..')) throw new Error(`not a temporary file: ${file.name}`);
    const dir = file.kind === 'config' ? this.location : file.kind === 'data' ? join(this.location, 'data', file.name.slice(0, 2)) : join(this.location, file.kind);
    await rm(join(dir, base), { force: true });
    await fsyncDir(dir);
  }

  /** The folders that hold files of a kind (data: its 256 subfolders). */
  private async folders(kind: FileKind): Promise<string[]> {
    if (kind !== 'data') return [join(this.location, kind)];
    const subs = await readdir(join(this.location, 'data')).catch(() => []);
    return subs.filter((s) => /^[0-9a-f]{2}$/.test(s)).map((s) => join(this.location, 'data', s));
  }
}

