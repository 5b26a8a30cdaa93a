/**
 * A repository in a local folder. Layout (as restic's): `config`, `keys/`, `data/<2 hex>/`,
 * `index/`, `snapshots/`, `locks/`. Writes go to a temporary file in the same folder, are fsynced,
 * renamed into place, and the folder is fsynced.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Backend, FileKind } from './backend.js';

const KINDS: FileKind[] = ['keys', 'data', 'index', 'snapshots', 'locks'];

async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
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
    await mkdir(this.location, { recursive: true, mode: 0o700 });
    for (const kind of KINDS) await mkdir(join(this.location, kind), { mode: 0o700 });
    for (let i = 0; i < 256; i++) await mkdir(join(this.location, 'data', i.toString(16).padStart(2, '0')), { mode: 0o700 });
    await fsyncDir(this.location);
  }

  async save(kind: FileKind, name: string, data: Buffer | Buffer[]): Promise<void> {
    const target = this.path(kind, name);
    const temp = join(dirname(target), `.tmp-${randomBytes(8).toString('hex')}`);
    const handle = await open(temp, 'wx', 0o600);
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

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const handle = await open(this.path(kind, name), 'r');
    try {
      if (!range) return await handle.readFile();
      const buffer = Buffer.alloc(range.length);
      let read = 0;
      while (read < range.length) {
        const { bytesRead } = await handle.read(buffer, read, range.length - read, range.offset + read);
        if (bytesRead === 0) break;
        read += bytesRead;
      }
      return buffer.subarray(0, read);
    } finally {
      await handle.close();
    }
  }

  async list(kind: FileKind): Promise<string[]> {
    if (kind === 'config') return (await this.exists()) ? ['config'] : [];
    const visible = (names: string[]): string[] => names.filter((n) => !n.startsWith('.'));
    if (kind !== 'data') return visible(await readdir(join(this.location, kind)).catch(() => []));
    const out: string[] = [];
    for (const sub of await readdir(join(this.location, 'data')).catch(() => [])) {
      out.push(...visible(await readdir(join(this.location, 'data', sub)).catch(() => [])));
    }
    return out;
  }

  async stat(kind: FileKind, name: string): Promise<number | undefined> {
    return (await stat(this.path(kind, name)).catch(() => undefined))?.size;
  }

  async remove(kind: FileKind, name: string): Promise<void> {
    await rm(this.path(kind, name), { force: true });
  }
}

/**
 * Writes the parts in order with writev, up to 1024 at a time (a pack of tiny blobs has thousands
 * of parts: one write call each would cost more than the data). A short write continues where it
 * stopped.
 */
async function writeParts(handle: FileHandle, parts: Buffer[]): Promise<void> {
  for (let first = 0; first < parts.length; first += 1024) {
    let batch = parts.slice(first, first + 1024);
    while (batch.length > 0) {
      const total = batch.reduce((sum, b) => sum + b.length, 0);
      let { bytesWritten } = await handle.writev(batch);
      if (bytesWritten === total) break;
      const rest: Buffer[] = [];
      for (const b of batch) {
        if (bytesWritten >= b.length) bytesWritten -= b.length;
        else {
          rest.push(b.subarray(bytesWritten));
          bytesWritten = 0;
        }
      }
      batch = rest;
    }
  }
}
