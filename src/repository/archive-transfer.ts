/**
 * Between the repository and seed-compatible archive sets:
 * - `export latest|ID --to DIR` writes a snapshot as `<volume>.tar.gz` files + manifest.json, the
 *   format `backup --to` writes and the guide's `tar -xvf … --strip N` restores;
 * - `import DIR` stores an archive set (ours, or made by hand with the guide's commands) as a
 *   snapshot, after reading every archive to its end.
 */
import { hostname } from 'node:os';
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createReadStream } from 'node:fs';
import { createGunzip } from 'node:zlib';
import { Writable } from 'node:stream';
import { CorruptArchiveError, TargetNotEmptyError, UsageError } from '../errors.js';
import { readArchiveSet, verifyArchiveSet } from '../archive/archive-set.js';
import { DurableFile, HashingCounter, writeFileDurably } from '../archive/files.js';
import { ParallelGzip } from '../archive/pgzip.js';
import { TarProcessor, normaliseMemberName } from '../archive/tar.js';
import { MANIFEST_FILE, MANIFEST_FORMAT, archiveFileName, memberPrefixOf, type ArchiveSetManifest, type VolumeArchiveRecord } from '../archive/manifest.js';
import type { Repository } from './repository.js';
import { snapshotVolumeTar } from './restorer.js';
import { resolveSnapshot } from './snapshots.js';
import { TarTreeBuilder } from './tar-import.js';
import type { Snapshot, SnapshotVolume } from './tree.js';

export async function exportSnapshot(
  repo: Repository,
  ref: string,
  dir: string,
  options: { project?: string | undefined; toolVersion: string; signal?: AbortSignal; onVolume?: (name: string) => void },
): Promise<{ snapshot: Snapshot & { id: string }; manifest: ArchiveSetManifest }> {
  // The snapshot before the index: one a backup finishes meanwhile has its index files written
  // first, so `latest` never names blobs the loaded index lacks.
  const snapshot = await resolveSnapshot(repo, ref, options.project);
  await repo.loadIndex();
  if (snapshot.database) {
    throw new UsageError(
      `snapshot ${snapshot.id.slice(0, 8)} holds the database as a pg_dump (backup --db dump), which the guide's format cannot carry: restore it with 'cvat-backup restore ${snapshot.id.slice(0, 8)}'`,
    );
  }
  const existing = await readdir(dir).catch(() => undefined);
  if (existing && existing.length > 0) throw new TargetNotEmptyError(`${dir} is not empty: give --to a new or empty folder`);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const records: VolumeArchiveRecord[] = [];
  const written: string[] = [];
  try {
  for (const volume of snapshot.volumes) {
    options.onVolume?.(volume.composeName);
    const archive = archiveFileName(volume.composeName);
    const file = await DurableFile.create(join(dir, archive));
    written.push(archive);
    const counter = new TarProcessor();
    const hasher = new HashingCounter();
    try {
      await pipeline(snapshotVolumeTar(repo, volume, options.signal), counter, new ParallelGzip(), hasher, file.stream, options.signal ? { signal: options.signal } : {});
      await file.commit();
    } catch (error) {
      await file.abort();
      throw error;
    }
    records.push({
      composeName: volume.composeName,
      name: volume.name,
      role: volume.role,
      mountPath: volume.mountPath,
      archive,
      memberPrefix: memberPrefixOf(volume.mountPath),
      ...counter.stats,
      archiveBytes: hasher.bytes,
      sha256: hasher.digest(),
    });
  }
  } catch (error) {
    // Leave DIR as it was: a partial set must never look like a backup.
    await Promise.all(written.map((name) => rm(join(dir, name), { force: true })));
    throw error;
  }
  const finished = new Date(new Date(snapshot.time).getTime() + snapshot.durationMs);
  const manifest: ArchiveSetManifest = {
    format: MANIFEST_FORMAT,
    formatVersion: 1,
    tool: { name: 'cvat-backup', version: options.toolVersion },
    project: snapshot.project,
    cvat: snapshot.cvat,
    startedAt: snapshot.time,
    finishedAt: finished.toISOString(),
    durationMs: snapshot.durationMs,
    downtimeMs: snapshot.downtimeMs,
    volumes: records,
    skipped: snapshot.skipped,
    bindMounts: [],
  };
  await writeFileDurably(join(dir, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`);
  return { snapshot, manifest };
}

/** Mount path of a hand-made archive: its first member is the mount folder itself. */
async function firstMember(path: string): Promise<string> {
  let first: string | undefined;
  const stop = new Error('found');
  try {
    await pipeline(
      createReadStream(path),
      createGunzip(),
      new TarProcessor({
        onEntry: (entry) => {
          first = normaliseMemberName(entry.name);
          throw stop;
        },
      }),
      new Writable({ write: (_c, _e, cb) => cb() }),
    );
  } catch (error) {
    if (error !== stop) throw new CorruptArchiveError(`${path}: ${(error as Error).message}`, { cause: error });
  }
  if (first === undefined || first === '') throw new CorruptArchiveError(`${path}: empty archive`);
  return first;
}

export async function importArchiveSet(
  repo: Repository,
  dir: string,
  options: { project?: string | undefined; cvatVersion?: string | undefined; toolVersion: string; now?: () => Date; signal?: AbortSignal; onVolume?: (name: string) => void },
): Promise<Snapshot & { id: string }> {
  const set = await readArchiveSet(dir);
  const mountPaths = new Map<string, string>();
  for (const v of set.volumes) mountPaths.set(v.composeName, v.mountPath ?? `/${await firstMember(v.path)}`);
  await verifyArchiveSet(set, { prefixFor: (name) => memberPrefixOf(mountPaths.get(name) ?? ''), ...(options.signal ? { signal: options.signal } : {}) });
  const project = options.project ?? set.manifest?.project;
  if (project === undefined) throw new UsageError(`${dir} has no manifest: name the project with --project`);
  await repo.loadIndex();
  const volumes: SnapshotVolume[] = [];
  for (const v of set.volumes) {
    options.onVolume?.(v.composeName);
    const mountPath = mountPaths.get(v.composeName)!;
    const builder = new TarTreeBuilder(repo, memberPrefixOf(mountPath));
    await pipeline(createReadStream(v.path, { highWaterMark: 1 << 20 }), createGunzip(), new TarProcessor({ output: 'entries' }), builder, options.signal ? { signal: options.signal } : {});
    const { tree, root } = await builder.finishTrees();
    const record = set.manifest?.volumes.find((r) => r.composeName === v.composeName);
    volumes.push({
      composeName: v.composeName,
      name: record?.name ?? `${project}_${v.composeName}`,
      role: record?.role ?? 'other',
      mountPath,
      tree,
      root,
      entries: builder.stats.entries,
      files: builder.stats.files,
      bytes: builder.stats.bytes,
    });
  }
  await repo.flush();
  const now = (options.now ?? (() => new Date()))();
  const snapshot: Snapshot = {
    version: 1,
    time: set.manifest?.startedAt ?? now.toISOString(),
    hostname: hostname(),
    tool: `cvat-backup ${options.toolVersion} (import of ${dir})`,
    project,
    cvat: set.manifest?.cvat ?? { version: options.cvatVersion ?? null, versionSource: options.cvatVersion ? 'given' : 'unknown', serverImage: null, serverImageDigest: null },
    downtimeMs: set.manifest?.downtimeMs ?? 0,
    durationMs: set.manifest?.durationMs ?? 0,
    volumes,
    skipped: set.manifest?.skipped ?? [],
  };
  const id = await repo.saveObject('snapshots', snapshot);
  return { ...snapshot, id };
}
