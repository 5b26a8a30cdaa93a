/**
 * Seed-compatible archive sets: one `<volume>.tar.gz` per volume whose members are named after the
 * mount path (`var/lib/postgresql/data/…`), exactly what the guide's `tar -czvf` makes, so the
 * guide's `tar -xvf … --strip 4` restores ours and we restore the guide's. Plus `manifest.json`.
 */
import { createReadStream } from 'node:fs';
import { readFile, readdir, stat } from 'node:fs/promises';
import { join, posix } from 'node:path';
import { Writable, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import type { DockerEngine } from '../docker/engine.js';
import { CorruptArchiveError, InterruptedError } from '../errors.js';
import { DurableFile, HashingCounter } from './files.js';
import { ParallelGzip } from './pgzip.js';
import { hostTarStream } from './host-tar.js';
import { TarProcessor, type TarEntry, type TarStats } from './tar.js';
import { ArchiveVerifier } from './member-guard.js';
import {
  MANIFEST_FILE,
  manifestSchema,
  archiveFileName,
  memberPrefixOf,
  type ArchiveSetManifest,
} from './manifest.js';

export type VolumeSource =
  | { kind: 'engine'; composeName: string; containerId: string; mountPath: string }
  | { kind: 'host'; composeName: string; hostPath: string; mountPath: string };

export interface WrittenArchive extends TarStats {
  archive: string;
  archiveBytes: number;
  sha256: string;
  memberPrefix: string;
}

export type ByteProgress = (stats: TarStats) => void;

/** Calls `report` at most every `intervalMs` (or when forced). */
export function throttled(report: ByteProgress | undefined, intervalMs = 200): (stats: TarStats, force?: boolean) => void {
  let last = 0;
  return (stats, force = false) => {
    if (!report) return;
    const now = Date.now();
    if (force || now - last >= intervalMs) {
      last = now;
      report({ ...stats });
    }
  };
}

/**
 * Streams one volume into `<dir>/<composeName>.tar.gz` with members named `mount-path/…`: from the
 * engine (renaming its `basename(mount)/…` members) or from the volume's folder on this host.
 * Durable: the archive appears only when complete.
 */
export async function writeVolumeArchive(
  engine: DockerEngine,
  source: VolumeSource,
  dir: string,
  options: { level?: number; signal?: AbortSignal; onProgress?: ByteProgress; onWarning?: (message: string) => void } = {},
): Promise<WrittenArchive> {
  const memberPrefix = memberPrefixOf(source.mountPath);
  const parent = posix.dirname(memberPrefix);
  const renamePrefix = parent === '.' ? undefined : Buffer.from(`${parent}/`);
  const archive = archiveFileName(source.composeName);
  const file = await DurableFile.create(join(dir, archive));
  try {
    const report = throttled(options.onProgress);
    let tarStream: Readable;
    let stats: () => TarStats;
    if (source.kind === 'engine') {
      const engineStream = await engine.readArchive(source.containerId, source.mountPath, options.signal);
      const processor: TarProcessor = new TarProcessor({
        ...(renamePrefix ? { renamePrefix } : {}),
        onEntry: () => report(processor.stats),
        onData: () => report(processor.stats),
      });
      tarStream = engineStream.pipe(processor);
      engineStream.on('error', (error) => processor.destroy(error));
      stats = () => processor.stats;
    } else {
      const host = hostTarStream(source.hostPath, {
        memberPrefix,
        ...(options.signal ? { signal: options.signal } : {}),
        ...(options.onWarning ? { onWarning: options.onWarning } : {}),
        onProgress: (s) => report(s),
      });
      tarStream = host.stream;
      stats = () => host.stats;
    }
    const hasher = new HashingCounter();
    await pipeline(
      tarStream,
      new ParallelGzip(options.level === undefined ? {} : { level: options.level }),
      hasher,
      file.stream,
      options.signal ? { signal: options.signal } : {},
    );
    await file.commit();
    report(stats(), true);
    return { ...stats(), archive, archiveBytes: hasher.bytes, sha256: hasher.digest(), memberPrefix };
  } catch (error) {
    await file.abort();
    throw error;
  }
}

export interface ArchiveCheck extends TarStats {
  sha256: string;
  archiveBytes: number;
}

/**
 * Reads an archive to its end: gzip framing, every tar header checksum and value, every member
 * name and type against the rules of a restore into `memberPrefix` (MemberGuard: nothing outside
 * the volume, no path through a link, no duplicates, hard links only to files made earlier), every
 * sparse map, and the SHA-256 of the file. Throws CorruptArchiveError naming the file.
 */
export async function checkArchive(
  path: string,
  memberPrefix: string,
  options: { signal?: AbortSignal; onProgress?: ByteProgress; onEntry?: (entry: TarEntry) => void } = {},
): Promise<ArchiveCheck> {
  const hasher = new HashingCounter();
  const report = throttled(options.onProgress);
  const verifier = new ArchiveVerifier(memberPrefix);
  const processor: TarProcessor = new TarProcessor({
    onEntry: (entry) => {
      try {
        verifier.entry(entry);
      } catch (error) {
        if (error instanceof CorruptArchiveError) throw new CorruptArchiveError(`${path}: ${error.message}`, { cause: error });
        throw error;
      }
      options.onEntry?.(entry);
      report(processor.stats);
    },
    onData: (_entry, chunk) => {
      verifier.data(chunk);
      report(processor.stats);
    },
  });
  const sink = new Writable({ highWaterMark: 1 << 20, write: (_chunk, _encoding, callback) => callback() });
  try {
    await pipeline(
      createReadStream(path, { highWaterMark: 1 << 20 }),
      hasher,
      createGunzip(),
      processor,
      sink,
      options.signal ? { signal: options.signal } : {},
    );
    verifier.end();
  } catch (error) {
    if ((error as { name?: string }).name === 'AbortError') throw new InterruptedError('interrupted', { cause: error });
    if (error instanceof CorruptArchiveError && error.message.startsWith(path)) throw error;
    const reason = (error as Error).message;
    throw new CorruptArchiveError(`${path}: corrupt or truncated archive (${reason})`, { cause: error });
  }
  report(processor.stats, true);
  return { ...processor.stats, sha256: hasher.digest(), archiveBytes: hasher.bytes };
}

export interface ArchiveSetVolume {
  composeName: string;
  path: string;
  /** From the manifest; undefined for hand-made sets (then the deployment's mount path decides). */
  mountPath: string | undefined;
  expected: { sha256: string; files: number; bytes: number; entries: number } | undefined;
}

export interface ArchiveSet {
  dir: string;
  manifest: ArchiveSetManifest | undefined;
  volumes: ArchiveSetVolume[];
}

/** Reads a set: ours (with manifest.json) or hand-made with the guide's commands (volume = file name). */
export async function readArchiveSet(dir: string): Promise<ArchiveSet> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (error) {
    throw new CorruptArchiveError(`cannot read backup folder ${dir}: ${(error as Error).message}`, { cause: error });
  }
  if (names.includes(MANIFEST_FILE)) {
    const manifest = await readManifest(dir);
    for (const v of manifest.volumes) {
      if (!names.includes(v.archive)) throw new CorruptArchiveError(`${join(dir, v.archive)}: listed in the manifest but missing`);
    }
    return {
      dir,
      manifest,
      volumes: manifest.volumes.map((v) => ({
        composeName: v.composeName,
        path: join(dir, v.archive),
        mountPath: v.mountPath,
        expected: { sha256: v.sha256, files: v.files, bytes: v.bytes, entries: v.entries },
      })),
    };
  }
  const archives = names.filter((n) => n.endsWith('.tar.gz') && !n.startsWith('.')).sort();
  if (archives.length === 0) {
    throw new CorruptArchiveError(`${dir} holds no backup: no ${MANIFEST_FILE} and no *.tar.gz archives`);
  }
  const volumes: ArchiveSetVolume[] = [];
  for (const name of archives) {
    const path = join(dir, name);
    if (!(await stat(path)).isFile()) continue;
    volumes.push({ composeName: name.slice(0, -'.tar.gz'.length), path, mountPath: undefined, expected: undefined });
  }
  return { dir, manifest: undefined, volumes };
}

export async function readManifest(dir: string): Promise<ArchiveSetManifest> {
  const path = join(dir, MANIFEST_FILE);
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(path, 'utf8'));
  } catch (error) {
    throw new CorruptArchiveError(`${path}: not readable JSON (${(error as Error).message})`, { cause: error });
  }
  const result = manifestSchema.safeParse(parsed);
  if (!result.success) {
    const issue = result.error.issues[0];
    throw new CorruptArchiveError(`${path}: invalid manifest (${issue?.path.join('.') ?? ''}: ${issue?.message ?? ''})`);
  }
  for (const v of result.data.volumes) {
    if (v.memberPrefix !== memberPrefixOf(v.mountPath) || v.archive !== archiveFileName(v.composeName)) {
      throw new CorruptArchiveError(`${path}: inconsistent record for volume ${v.composeName}`);
    }
  }
  return result.data;
}

export interface VerifiedVolume {
  composeName: string;
  path: string;
  check: ArchiveCheck;
}

/**
 * Verifies a set against its manifest (or, for hand-made sets, just reads every archive).
 * `prefixFor` gives the member prefix of a volume of a hand-made set.
 */
export async function verifyArchiveSet(
  set: ArchiveSet,
  options: {
    prefixFor?: (composeName: string) => string | undefined;
    signal?: AbortSignal;
    onVolume?: (composeName: string, phase: 'start' | 'done', stats?: TarStats) => void;
    onProgress?: (composeName: string, stats: TarStats) => void;
  } = {},
): Promise<VerifiedVolume[]> {
  const verified: VerifiedVolume[] = [];
  for (const volume of set.volumes) {
    const prefix = volume.mountPath !== undefined ? memberPrefixOf(volume.mountPath) : options.prefixFor?.(volume.composeName);
    options.onVolume?.(volume.composeName, 'start');
    const check = await checkArchive(volume.path, prefix ?? '', {
      ...(options.signal ? { signal: options.signal } : {}),
      onProgress: (stats) => options.onProgress?.(volume.composeName, stats),
    });
    const expected = volume.expected;
    if (expected) {
      if (check.sha256 !== expected.sha256) {
        throw new CorruptArchiveError(`${volume.path}: checksum mismatch (manifest ${expected.sha256.slice(0, 12)}…, file ${check.sha256.slice(0, 12)}…)`);
      }
      if (check.files !== expected.files || check.bytes !== expected.bytes || check.entries !== expected.entries) {
        throw new CorruptArchiveError(`${volume.path}: content differs from the manifest (files, bytes or entries)`);
      }
    }
    if (check.entries === 0) throw new CorruptArchiveError(`${volume.path}: archive is empty`);
    options.onVolume?.(volume.composeName, 'done', check);
    verified.push({ composeName: volume.composeName, path: volume.path, check });
  }
  return verified;
}
