/**
 * The direct path of a restore: extract an archive into a volume folder on this host (local
 * engine, root). Keeps what the engine's extraction drops: holes of sparse files (GNU sparse 1.0).
 *
 * Contract: `root` is empty (the rollback point moved the old files aside) except for entries
 * starting with `.cvat-backup-`. Member names are already checked to lie under `memberPrefix`
 * with no `..` (checkArchive). Parents are created only as real folders: an existing symlink on
 * the way is refused, so an archive cannot write outside the volume.
 * Owners are set before modes (chown clears setuid/setgid), folder modes and times last, deepest
 * first, so that writing into a read-only folder and its mtime both work.
 */
import { chmod, lchown, link, lstat, lutimes, mkdir, open, symlink, type FileHandle } from 'node:fs/promises';
import { Writable } from 'node:stream';
import { CorruptArchiveError } from '../errors.js';
import { normaliseMemberName, type TarEntry, type TarItem } from './tar.js';

interface PendingDirectory {
  path: Buffer;
  entry: TarEntry;
}

interface OpenFile {
  entry: TarEntry;
  path: Buffer;
  handle: FileHandle;
  /** Bytes of the member's data still to come. */
  remaining: number;
  /** Sparse 1.0: the map is being read (text), then segments are written in order. */
  sparse: { realSize: number; mapText: string; mapBytes: number; segments: { offset: number; length: number }[] | undefined; segment: number; written: number } | undefined;
  position: number;
}

export interface HostExtractResult {
  skipped: string[];
}

export class HostExtractor extends Writable {
  readonly result: HostExtractResult = { skipped: [] };
  private readonly root: Buffer;
  private readonly prefix: string;
  private readonly directories: PendingDirectory[] = [];
  private readonly knownDirectories = new Set<string>();
  private file: OpenFile | undefined;

  constructor(root: string, memberPrefix: string) {
    super({ objectMode: true, highWaterMark: 64 });
    this.root = Buffer.from(root);
    this.prefix = memberPrefix;
    this.knownDirectories.add('');
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
    if (!file) return callback(error);
    file.handle.close().then(() => callback(error), () => callback(error));
  }

  /** Path below root for a member name, '' for the root itself. */
  private relative(name: Buffer): Buffer {
    const text = normaliseMemberName(name);
    if (text === this.prefix) return Buffer.alloc(0);
    if (this.prefix !== '' && !text.startsWith(`${this.prefix}/`)) {
      throw new CorruptArchiveError(`member '${text}' is outside '${this.prefix}/'`);
    }
    return Buffer.from(this.prefix === '' ? text : text.slice(this.prefix.length + 1), 'latin1');
  }

  private absolute(relative: Buffer): Buffer {
    return relative.length === 0 ? this.root : Buffer.concat([this.root, Buffer.from('/'), relative]);
  }

  /** Makes sure every parent of `relative` is a real folder we made or checked. */
  private async ensureParents(relative: Buffer): Promise<void> {
    const parts = relative.toString('latin1').split('/');
    parts.pop();
    let current = '';
    for (const part of parts) {
      current = current === '' ? part : `${current}/${part}`;
      if (this.knownDirectories.has(current)) continue;
      const path = this.absolute(Buffer.from(current, 'latin1'));
      const st = await lstat(path).catch(() => undefined);
      if (st === undefined) await mkdir(path, { mode: 0o700 });
      else if (!st.isDirectory()) throw new CorruptArchiveError(`archive writes through '${current}', which is not a folder`);
      this.knownDirectories.add(current);
    }
  }

  private async onEntry(entry: TarEntry): Promise<void> {
    if (this.file) throw new CorruptArchiveError('tar member ended early');
    const relative = this.relative(entry.name);
    const path = this.absolute(relative);
    const key = relative.toString('latin1');
    if (relative.length > 0) await this.ensureParents(relative);
    switch (entry.type) {
      case '5': {
        if (relative.length > 0) {
          const st = await lstat(path).catch(() => undefined);
          if (st === undefined) await mkdir(path, { mode: 0o700 });
          else if (!st.isDirectory()) throw new CorruptArchiveError(`'${key}' exists and is not a folder`);
          this.knownDirectories.add(key);
        }
        this.directories.push({ path, entry });
        return;
      }
      case '2':
        await symlink(entry.linkName, path);
        await lchown(path, entry.uid, entry.gid);
        await lutimes(path, entry.mtime, entry.mtime);
        return;
      case '1': {
        const target = this.absolute(this.relative(entry.linkName));
        await link(target, path);
        return;
      }
      case '0':
      case '\0':
      case '7': {
        const handle = await open(path, 'wx', 0o600);
        const realSize = entry.pax.get('GNU.sparse.realsize');
        const major = entry.pax.get('GNU.sparse.major')?.toString('latin1');
        this.file = {
          entry,
          path,
          handle,
          remaining: entry.size,
          position: 0,
          sparse:
            realSize !== undefined && major === '1'
              ? { realSize: Number(realSize.toString('latin1')), mapText: '', mapBytes: 0, segments: undefined, segment: 0, written: 0 }
              : undefined,
        };
        if (entry.size === 0) await this.closeFile();
        return;
      }
      default:
        // Devices, FIFOs and old-style GNU sparse members cannot be made from Node here.
        this.result.skipped.push(`${key} (type ${entry.type})`);
        return;
    }
  }

  private async onData(chunk: Buffer): Promise<void> {
    const file = this.file;
    if (!file) return; // data of a skipped member
    file.remaining -= chunk.length;
    if (!file.sparse) {
      await writeAll(file.handle, chunk, file.position);
      file.position += chunk.length;
    } else {
      await this.onSparseData(file, chunk);
    }
    if (file.remaining === 0) await this.closeFile();
  }

  private async onSparseData(file: OpenFile, chunk: Buffer): Promise<void> {
    const sparse = file.sparse!;
    let data = chunk;
    if (sparse.segments === undefined) {
      // The map is decimal lines padded to 512 bytes: read until it is complete.
      const take = Math.min(data.length, 1 << 20);
      sparse.mapText += data.subarray(0, take).toString('latin1');
      sparse.mapBytes += take;
      data = data.subarray(take);
      const lines = sparse.mapText.split('\n');
      const count = Number(lines[0]);
      if (lines.length < 2 + count * 2) {
        if (sparse.mapBytes > 1 << 24) throw new CorruptArchiveError('sparse map too large');
        return;
      }
      const numbers = lines.slice(1, 1 + count * 2).map(Number);
      if (numbers.some((n) => !Number.isFinite(n) || n < 0)) throw new CorruptArchiveError('bad sparse map');
      sparse.segments = [];
      for (let i = 0; i < count; i++) sparse.segments.push({ offset: numbers[2 * i]!, length: numbers[2 * i + 1]! });
      const mapLength = lines.slice(0, 1 + count * 2).join('\n').length + 1;
      const padded = Math.ceil(mapLength / 512) * 512;
      // Whatever of the consumed text lies past the padded map is file data.
      const consumedText = Buffer.from(sparse.mapText, 'latin1');
      data = Buffer.concat([consumedText.subarray(padded), data]);
    }
    while (data.length > 0) {
      const segment = sparse.segments[sparse.segment];
      if (!segment) throw new CorruptArchiveError('sparse data longer than its map');
      const room = segment.length - sparse.written;
      if (room === 0) {
        sparse.segment++;
        sparse.written = 0;
        continue;
      }
      const piece = data.subarray(0, room);
      await writeAll(file.handle, piece, segment.offset + sparse.written);
      sparse.written += piece.length;
      data = data.subarray(piece.length);
    }
  }

  private async closeFile(): Promise<void> {
    const file = this.file!;
    this.file = undefined;
    try {
      if (file.sparse) await file.handle.truncate(file.sparse.realSize);
    } finally {
      await file.handle.close();
    }
    await lchown(file.path, file.entry.uid, file.entry.gid);
    await chmod(file.path, file.entry.mode & 0o7777);
    await lutimes(file.path, file.entry.mtime, file.entry.mtime);
  }

  private async finish(): Promise<void> {
    if (this.file) throw new CorruptArchiveError('tar member ended early');
    // Deepest first, so setting a folder's mtime is not undone by its children.
    for (const { path, entry } of [...this.directories].reverse()) {
      await lchown(path, entry.uid, entry.gid);
      await chmod(path, entry.mode & 0o7777);
      await lutimes(path, entry.mtime, entry.mtime);
    }
  }
}

async function writeAll(handle: FileHandle, data: Buffer, position: number): Promise<void> {
  let offset = 0;
  while (offset < data.length) {
    const { bytesWritten } = await handle.write(data, offset, data.length - offset, position + offset);
    offset += bytesWritten;
  }
}
