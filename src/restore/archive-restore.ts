/**
 * `restore DIR|latest|ID`: plan → lock → verify → stage → rollback point → write or move in → start.
 *
 * 1. Plan: map every archive of the set (ours, or hand-made with the guide's commands) or volume
 *    of the snapshot to a volume of the deployment and its mount path; refuse when the containers
 *    are gone (`compose down`), a volume is missing, or the CVAT versions differ (the guide's rule).
 * 2. Take the project lock (a killed restore is put right first). Every archive or snapshot volume
 *    is read and authenticated to its end before anything of the volumes is touched.
 * 3. Volumes whose folders are on this host are written into staged folders inside them while
 *    CVAT still runs, and synced to disk: an archive after its verification; a snapshot's volume
 *    in one pass that authenticates every blob as it writes it (from a remote, the download by
 *    pack runs alongside). A failure deletes the staged data: nothing was touched.
 * 4. Stop the project; in every target volume move the old files aside (rollback point); move
 *    the staged data in (renames), or extract the archive into the emptied volume (on this host,
 *    or through the engine; owners and modes kept).
 * 5. Success: retire the rollback points (a rename). Failure: put the old files back. Then start
 *    CVAT, and only then delete the retired old data.
 */
import { createReadStream } from 'node:fs';
import { createGunzip } from 'node:zlib';
import { PassThrough, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { DockerEngine } from '../docker/engine.js';
import type { ProgressListener } from '../events.js';
import {
  ContainersMissingError,
  CvatBackupError,
  CorruptArchiveError,
  RestoreFailedError,
  UsageError,
  VersionMismatchError,
  VolumeMissingError,
  classifyError,
} from '../errors.js';
import { discoverDeployment, type Deployment } from '../deployment/discover.js';
import { keptOnRestore, recreateContainersHint, volumeRole } from '../deployment/cvat.js';
import { startContainers, withDeploymentStopped } from '../deployment/lifecycle.js';
import { lockDeployment } from '../deployment/lock.js';
import { dropRetiredDatabase, loadDatabase, openDatabase, waitUntilReady, type DatabaseHandle } from '../deployment/database.js';
import { readArchiveSet, throttled, verifyArchiveSet } from '../archive/archive-set.js';
import { memberPrefixOf } from '../archive/manifest.js';
import { TarProcessor, type TarStats } from '../archive/tar.js';
import { HostExtractor, type HostExtractResult } from '../archive/host-extract.js';
import { GuardedTarStream } from '../archive/guarded-tar.js';
import { chooseTransport, type TransportChoice } from '../archive/transport.js';
import { syncFilesystem } from '../host.js';
import {
  RETIRED_DIR,
  commitVolume,
  prepareRollback,
  recoverKilledRestore,
  removeRetired,
  removeStaged,
  rollbackVolume,
  stageVolume,
  swapInStaged,
  type RootMeta,
  type VolumeTarget,
} from './volume-rollback.js';

/**
 * Where a restore's data comes from: an archive set, or a repository snapshot. Everything else
 * (version rule, plan, rollback points, start order) is the same for both.
 */
export interface RestoreSource {
  /** CVAT version recorded by the backup (undefined: unknown). */
  cvatVersion: string | undefined;
  /** No recorded version by design (an archive set made by hand): --cvat-version applies. */
  handMade: boolean;
  volumes: { composeName: string; mountPath: string | undefined; bytes?: number | undefined }[];
  /**
   * Reads everything once, end to end, before anything is touched; counts per volume. The volumes
   * in `written` were written into staged folders already (`writeFolder` verified them as it wrote).
   */
  verify(
    memberPrefixFor: (composeName: string) => string,
    signal: AbortSignal | undefined,
    onProgress: ProgressListener,
    written: ReadonlySet<string>,
  ): Promise<Map<string, TarStats>>;
  /** The volume's data as an uncompressed tar stream, members under its mount path. */
  openTar(composeName: string, signal: AbortSignal | undefined): Readable;
  /**
   * Optional direct path: writes the volume into its (emptied) folder on this host without a tar
   * stream. Returns what it wrote and the entries it could not make.
   */
  /** A logical dump of the database (snapshots taken with `--db dump`), loaded after the volumes. */
  database?: { dbname: string; size: number; open(signal: AbortSignal | undefined): Readable };
  writeFolder?(
    composeName: string,
    folder: string,
    signal: AbortSignal | undefined,
    onProgress: (stats: TarStats) => void,
    options?: {
      /** The folder is a staged one: its own owner, mode and times are left as they are (see `root`). */
      leaveRoot?: boolean;
      /** Not verified before: every blob is authenticated as it is written, the first failure thrown. */
      verifying?: boolean;
      onWarning?: (message: string) => void;
      /**
       * The volume's current data (`folder` is staged inside it): files it holds unchanged are
       * linked, not written; the result's `recheck` then runs once CVAT is stopped.
       */
      reuseFrom?: string;
    },
  ): Promise<WrittenFolder & { root: RootMeta }>;
  /**
   * Called once everything is written, before the volumes are synced and committed: the source
   * lets go of what it held for the writes (a remote repository's kept reads, whose dirty pages
   * the sync would otherwise write to disk while CVAT is down).
   */
  written?(): Promise<void>;
}

/** What a volume's staged write gave: counts, entries it could not make, the root's metadata, kept files. */
interface WrittenFolder {
  stats: TarStats;
  skipped: string[];
  root: RootMeta | undefined;
  /** Files (and bytes) kept from the current data (`writeFolder`'s reuseFrom), not written. */
  reused?: { files: number; bytes: number };
  /** Checks the kept files again once CVAT is stopped; resolves with how many were written again. */
  recheck?: () => Promise<number>;
}

export interface RestoreOptions {
  project?: string | undefined;
  allowVersionMismatch?: boolean;
  /** The CVAT version of a hand-made set (no manifest). */
  cvatVersion?: string | undefined;
  via?: TransportChoice;
  /** Restore only these volumes (compose names); all when undefined. */
  volumes?: string[] | undefined;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
  now?: () => number;
}

/** Keeps the volumes named in `only` (all if undefined); an unknown name is a usage error. */
export function onlyVolumes<T extends { composeName: string }>(volumes: T[], only: string[] | undefined, where: string): T[] {
  if (only === undefined || only.length === 0) return volumes;
  for (const name of only) {
    if (!volumes.some((v) => v.composeName === name)) {
      throw new UsageError(`${where} holds no volume '${name}' (it holds ${volumes.map((v) => v.composeName).join(', ')})`);
    }
  }
  return volumes.filter((v) => only.includes(v.composeName));
}

export interface RestoredVolume {
  composeName: string;
  files: number;
  bytes: number;
  /** Of those, files (and bytes) the volume held unchanged: kept (linked), not written again. */
  keptFiles?: number;
  keptBytes?: number;
}

export interface ArchiveRestoreOptions extends RestoreOptions {
  from: string;
}

export interface ArchiveRestoreResult {
  project: string;
  /** Loaded from a pg_dump (snapshots taken with --db dump). */
  database?: { dbname: string; bytes: number };
  backupVersion: string | undefined;
  deploymentVersion: string | undefined;
  volumes: RestoredVolume[];
  downtimeMs: number;
  durationMs: number;
}

interface PlannedVolume {
  target: VolumeTarget;
  volumeName: string;
}

function normaliseVersion(v: string | undefined): string | undefined {
  return v?.replace(/^v/, '');
}

export function checkVersions(
  backupVersion: string | undefined,
  deploymentVersion: string | undefined,
  options: { allowVersionMismatch?: boolean; handMade: boolean },
): string | undefined {
  if (options.allowVersionMismatch) {
    return backupVersion !== deploymentVersion
      ? `restoring a CVAT ${backupVersion ?? 'unknown'} backup into CVAT ${deploymentVersion ?? 'unknown'} (--allow-version-mismatch)`
      : undefined;
  }
  if (backupVersion === undefined) {
    throw new VersionMismatchError(
      options.handMade
        ? `this backup has no manifest, so its CVAT version is unknown: name it with --cvat-version X (it must match the deployment's ${deploymentVersion ?? 'unknown'}), or accept the risk with --allow-version-mismatch`
        : 'the backup does not record its CVAT version: pass --allow-version-mismatch to restore it anyway',
    );
  }
  if (deploymentVersion === undefined) {
    throw new VersionMismatchError(
      `the deployment's CVAT version cannot be determined (dev/latest image?) and the backup is CVAT ${backupVersion}: run CVAT_VERSION=v${backupVersion}, or pass --allow-version-mismatch`,
    );
  }
  if (backupVersion !== deploymentVersion) {
    throw new VersionMismatchError(
      `the backup is CVAT ${backupVersion} but the deployment runs CVAT ${deploymentVersion}: in the CVAT folder run 'CVAT_VERSION=v${backupVersion} docker compose up -d', restore, then upgrade (or pass --allow-version-mismatch)`,
    );
  }
  return undefined;
}

function plan(source: RestoreSource, deployment: Deployment): PlannedVolume[] {
  const planned: PlannedVolume[] = [];
  for (const archive of source.volumes) {
    const volume = deployment.volumes.find((v) => v.composeName === archive.composeName);
    if (!volume) {
      throw new VolumeMissingError(
        `the backup holds volume '${archive.composeName}' but project '${deployment.project}' has no such volume: create the deployment with the same compose files first`,
      );
    }
    if (!volume.container || volume.mountPath === undefined) {
      throw new VolumeMissingError(`volume '${archive.composeName}' is not mounted by any container of project '${deployment.project}'`);
    }
    if (archive.mountPath !== undefined && archive.mountPath !== volume.mountPath) {
      throw new CorruptArchiveError(
        `volume '${archive.composeName}' was backed up from ${archive.mountPath} but is mounted at ${volume.mountPath} now: restore under the backup's CVAT version`,
      );
    }
    planned.push({
      volumeName: volume.name,
      target: {
        composeName: volume.composeName,
        containerId: volume.container.id,
        image: volume.container.image,
        mountPath: volume.mountPath,
      },
    });
  }
  return planned;
}

/**
 * Loads a dump into the deployment's database (CVAT stopped): the bundled container is started
 * alone first. Returns the renamed old database, to drop once CVAT runs.
 */
async function loadDump(
  engine: DockerEngine,
  deployment: Deployment,
  dump: NonNullable<RestoreSource['database']>,
  signal: AbortSignal | undefined,
  onProgress: ProgressListener,
): Promise<{ db: DatabaseHandle; retired: string | undefined }> {
  const db = await openDatabase(engine, deployment, signal);
  onProgress({ type: 'phase', message: `loading the database dump into ${db.where}` });
  if (db.container) {
    await engine.startContainer(db.container.id);
    onProgress({ type: 'container-started', service: db.container.service, name: db.container.name });
  }
  await waitUntilReady(db, signal);
  onProgress({ type: 'volume-start', volume: 'database', action: 'loading', totalBytes: dump.size });
  const { retired } = await loadDatabase(db, dump.open(signal), signal);
  onProgress({ type: 'volume-done', volume: 'database', bytes: dump.size, files: 1 });
  return { db, retired };
}

/** An archive set as a restore source. */
export async function archiveSetSource(dir: string, cvatVersionFlag: string | undefined, only?: string[]): Promise<RestoreSource> {
  const full = await readArchiveSet(dir);
  const set = { ...full, volumes: onlyVolumes(full.volumes, only, dir) };
  return {
    cvatVersion: set.manifest?.cvat.version ?? cvatVersionFlag,
    handMade: set.manifest === undefined,
    volumes: set.volumes.map((v) => ({ composeName: v.composeName, mountPath: v.mountPath })),
    verify: async (memberPrefixFor, signal, onProgress) => {
      onProgress({ type: 'phase', message: 'verifying archives' });
      const verified = await verifyArchiveSet(set, {
        prefixFor: memberPrefixFor,
        ...(signal ? { signal } : {}),
        onVolume: (volume, phase, stats) => {
          if (phase === 'start') onProgress({ type: 'volume-start', volume, action: 'verifying', totalBytes: undefined });
          else onProgress({ type: 'volume-done', volume, bytes: stats?.bytes ?? 0, files: stats?.files ?? 0 });
        },
        onProgress: (volume, stats) => onProgress({ type: 'volume-progress', volume, ...stats }),
      });
      return new Map(verified.map((v) => [v.composeName, v.check]));
    },
    openTar: (composeName) => {
      const path = set.volumes.find((v) => v.composeName === composeName)!.path;
      return createReadStream(path, { highWaterMark: 1 << 20 }).pipe(createGunzip());
    },
  };
}

/**
 * Sends a volume's tar stream to the engine, rebuilt from checked members (GuardedTarStream): the
 * engine extracts into the container's root, so nothing unchecked may reach it. Returns the
 * members left out.
 */
async function writeThroughEngine(
  engine: DockerEngine,
  containerId: string,
  tar: Readable,
  processor: TarProcessor,
  memberPrefix: string,
  signal: AbortSignal | undefined,
): Promise<string[]> {
  const guarded = new GuardedTarStream(memberPrefix);
  // The engine extracts while it reads the request body and answers once it has written what it
  // read. Aborting the request on a refused member (or Ctrl-C) would return at once while the
  // engine may still write the members before it, after the rollback put the old files back. So
  // the body is never aborted: it ends where the checked stream stopped, and the rollback waits
  // for the engine's answer.
  const body = new PassThrough({ highWaterMark: 1 << 20 });
  // On success the pipe ends the body after the last byte the stream pushed (the pipeline settles
  // when the stream's writable side finishes, maybe before its output is all read).
  guarded.pipe(body);
  let streamFailure: { error: unknown } | undefined;
  const piped = pipeline(tar, processor, guarded, signal ? { signal } : {}).catch((error: unknown) => {
    streamFailure = { error };
    guarded.unpipe(body);
    body.end();
  });
  try {
    await engine.writeArchive(containerId, '/', body);
  } catch (error) {
    // A stream that failed first is the cause (the engine's complaint about a body that ended
    // early is its consequence); otherwise the engine failed: stop reading and report that.
    const cause = streamFailure ?? { error };
    guarded.destroy();
    await piped;
    throw cause.error;
  }
  await piped;
  if (streamFailure) throw streamFailure.error;
  return guarded.skipped;
}

/** Extracts a volume's tar stream into its folder on this host (HostExtractor). */
async function writeOnHost(
  tar: Readable,
  processor: TarProcessor,
  hostPath: string,
  memberPrefix: string,
  signal: AbortSignal | undefined,
  leaveRoot = false,
): Promise<HostExtractResult> {
  const extractor = new HostExtractor(hostPath, memberPrefix, leaveRoot);
  await pipeline(tar, processor, extractor, signal ? { signal } : {});
  return extractor.result;
}

/**
 * Flushes the staged data to disk while it is being written (a `syncfs` in the background after
 * every 64 MiB, one at a time): with much memory the kernel would hold it all in its cache, and
 * the sync before CVAT stops would write it all then, while the writes could have overlapped it.
 */
class BackgroundFlush {
  private running: Promise<void> | undefined;
  private readonly flushedAt = new Map<string, number>();

  written(hostPath: string, bytes: number): void {
    const at = this.flushedAt.get(hostPath) ?? 0;
    if (bytes < at) this.flushedAt.set(hostPath, 0); // the next volume's count
    if (this.running || bytes - (this.flushedAt.get(hostPath) ?? 0) < 64 << 20) return;
    this.flushedAt.set(hostPath, bytes);
    this.running = syncFilesystem(hostPath)
      .catch(() => undefined) // only an economy: the sync after the writes is the one that counts
      .finally(() => (this.running = undefined));
  }

  async settle(): Promise<void> {
    await this.running;
  }
}

/** Deletes the staged data not moved in (a failure before or while CVAT was stopped): it never was the volumes'. */
async function discardStaged(planned: PlannedVolume[], staged: Map<string, StagedVolume>): Promise<void> {
  for (const { target } of planned) if (staged.has(target.composeName)) await removeStaged(target.hostPath!).catch(() => undefined);
}

interface StagedVolume {
  /** What the volume's root gets when the staged data moves in (nothing: left as it is). */
  root: RootMeta | undefined;
  stats: TarStats;
  /** Files linked from the current data (see `writeFolder`'s reuseFrom): checked again once CVAT is stopped. */
  recheck?: () => Promise<number>;
  reused?: WrittenFolder['reused'];
}

/**
 * Writes every volume the source can write on this host into its staged folder while CVAT still
 * runs (volume-rollback.ts, `stageVolume`), verifying it as it writes, and syncs it to disk: CVAT
 * is then stopped only for renames. Returns each staged volume's root owner, mode and time and
 * what was written. On failure the staged folders are deleted (nothing of the volumes was
 * touched) and the error thrown.
 */
async function stageWhileRunning(
  source: RestoreSource,
  planned: PlannedVolume[],
  signal: AbortSignal | undefined,
  onProgress: ProgressListener,
): Promise<Map<string, StagedVolume>> {
  const staged = new Map<string, StagedVolume>();
  const stageable = planned.filter((p) => p.target.hostPath !== undefined);
  const made: string[] = [];
  const flusher = new BackgroundFlush();
  try {
    for (const { target } of stageable) {
      signal?.throwIfAborted();
      made.push(target.hostPath!);
      const folder = await stageVolume(target.hostPath!);
      const bytes = source.volumes.find((v) => v.composeName === target.composeName)?.bytes;
      onProgress({ type: 'volume-start', volume: target.composeName, action: 'restoring while CVAT runs', totalBytes: bytes });
      const progress = throttled((stats: TarStats) => onProgress({ type: 'volume-progress', volume: target.composeName, ...stats }));
      const report = (stats: TarStats): void => {
        progress(stats);
        flusher.written(target.hostPath!, stats.bytes);
      };
      let written: WrittenFolder;
      if (source.writeFolder) {
        written = await source.writeFolder(target.composeName, folder, signal, report, {
          leaveRoot: true,
          verifying: true,
          ...(keptOnRestore(volumeRole(target.composeName)) ? { reuseFrom: target.hostPath! } : {}),
          onWarning: (message) => onProgress({ type: 'warning', message: `${target.composeName}: ${message}` }),
        });
      } else {
        // An archive (verified before): extracted with every member checked again.
        const processor: TarProcessor = new TarProcessor({ onData: () => report(processor.stats), output: 'entries' });
        const result = await writeOnHost(source.openTar(target.composeName, signal), processor, folder, memberPrefixOf(target.mountPath), signal, true);
        written = { stats: processor.stats, skipped: result.skipped, root: result.root };
      }
      for (const skipped of written.skipped) onProgress({ type: 'warning', message: `not restored (unsupported type): ${skipped}` });
      onProgress({ type: 'volume-done', volume: target.composeName, bytes: written.stats.bytes, files: written.stats.files });
      if (written.reused && written.reused.files > 0) {
        onProgress({ type: 'phase', message: `${target.composeName}: ${written.reused.files} unchanged files (${(written.reused.bytes / 1048576).toFixed(0)} MiB) kept from the current data, not written again` });
      }
      staged.set(target.composeName, {
        root: written.root,
        stats: written.stats,
        ...(written.recheck ? { recheck: written.recheck } : {}),
        ...(written.reused ? { reused: written.reused } : {}),
      });
    }
    if (staged.size > 0) {
      // Nothing else to write: the kept reads go (at the same time as the sync: the background
      // flushes have already written most of their pages, if they share the volumes' disk).
      const released = staged.size === planned.length && !source.database ? source.written?.().catch(() => undefined) : undefined;
      onProgress({ type: 'phase', message: 'syncing the restored data to disk' });
      await flusher.settle();
      for (const path of new Set(stageable.map((p) => p.target.hostPath!))) await syncFilesystem(path);
      await released;
    }
  } catch (error) {
    await flusher.settle();
    for (const path of made) await removeStaged(path).catch(() => undefined);
    // Nothing was touched: the staged data is deleted, CVAT ran all along.
    const cause = classifyError(error, "a volume's disk is full (the Docker data folder; a restore needs room for the old and the new data until it is done): free space there and restore again");
    if (cause instanceof CvatBackupError) throw cause;
    throw new RestoreFailedError(`restore failed while writing the new data beside the old (CVAT running): ${(cause as Error).message}; nothing was touched`, { cause });
  }
  return staged;
}

export async function restoreFromArchiveSet(engine: DockerEngine, options: ArchiveRestoreOptions): Promise<ArchiveRestoreResult> {
  return restoreFromSource(engine, await archiveSetSource(options.from, options.cvatVersion, options.volumes), options);
}

export async function restoreFromSource(engine: DockerEngine, source: RestoreSource, options: RestoreOptions): Promise<ArchiveRestoreResult> {
  const now = options.now ?? Date.now;
  const onProgress = options.onProgress ?? (() => undefined);
  const signalOption = options.signal ? { signal: options.signal } : {};
  const startedAt = now();
  const discover = (project: string | undefined): Promise<Deployment> => discoverDeployment(engine, { project, ...signalOption });
  let deployment = await discover(options.project);
  const backupVersion = normaliseVersion(source.cvatVersion);
  if (deployment.containers.length === 0) {
    throw new ContainersMissingError(
      `project '${deployment.project}' has volumes but no containers (after 'docker compose down'?): ${recreateContainersHint(backupVersion)}`,
    );
  }
  const deploymentVersion = deployment.version.version;
  const warning = checkVersions(backupVersion, deploymentVersion, {
    allowVersionMismatch: options.allowVersionMismatch ?? false,
    handMade: source.handMade,
  });
  if (warning) onProgress({ type: 'warning', message: warning });
  const locked = await lockDeployment(engine, deployment, 'restore', onProgress, () => discover(deployment.project), recoverKilledRestore);
  const lock = locked.lock;
  deployment = locked.deployment;
  try {
    const planned = plan(source, deployment);
    for (const p of planned) p.target.hostPath = (await chooseTransport(engine, p.volumeName, options.via ?? 'auto')).hostPath;
    // Volumes whose folders are on this host are written into staged folders while CVAT runs. A
    // snapshot's first (its writes verify them), then everything else is verified before anything
    // is touched; an archive set's after its verification.
    const verify = (written: ReadonlySet<string>): Promise<Map<string, TarStats>> =>
      source.verify((name) => memberPrefixOf(deployment.volumes.find((v) => v.composeName === name)?.mountPath ?? ''), options.signal, onProgress, written);
    let staged: Map<string, StagedVolume>;
    let verified: Map<string, TarStats>;
    if (source.writeFolder) {
      staged = await stageWhileRunning(source, planned, options.signal, onProgress);
      try {
        verified = await verify(new Set(staged.keys()));
      } catch (error) {
        await discardStaged(planned, staged);
        throw error;
      }
    } else {
      verified = await verify(new Set());
      staged = await stageWhileRunning(source, planned, options.signal, onProgress);
    }
    for (const [name, { stats }] of staged) if (!verified.has(name)) verified.set(name, stats);
    async function restoreStopped(staged: Map<string, StagedVolume>): Promise<ArchiveRestoreResult> {
      const wasRunning = deployment.containers.some((c) => c.state === 'running' || c.state === 'restarting');
      let removal: Promise<void> = Promise.resolve();
      let retiredDatabase: { db: DatabaseHandle; retired: string | undefined } | undefined;
      const { window } = await withDeploymentStopped(
        engine,
        deployment.containers,
        onProgress,
        async () => {
          const prepared: VolumeTarget[] = [];
          try {
            // Files kept from the current data: any CVAT wrote to before it stopped are written
            // again (before the rollback points: their renames would change the ctimes compared).
            for (const [name, stagedVolume] of staged) {
              const rewritten = await stagedVolume.recheck?.();
              if (rewritten) onProgress({ type: 'warning', message: `${name}: ${rewritten} kept files changed while the restore ran: written again from the snapshot` });
            }
            onProgress({ type: 'phase', message: 'setting rollback points' });
            for (const { target } of planned) {
              prepared.push(target);
              await prepareRollback(engine, target);
            }
            if (staged.size > 0) onProgress({ type: 'phase', message: 'moving the restored data in' });
            for (const { target } of planned) {
              options.signal?.throwIfAborted();
              const expected = verified.get(target.composeName);
              const stagedVolume = staged.get(target.composeName);
              if (stagedVolume !== undefined) {
                // Written while CVAT ran: moved in (renames).
                await swapInStaged(target.hostPath!, stagedVolume.root);
                continue;
              }
              onProgress({ type: 'volume-start', volume: target.composeName, action: 'restoring', totalBytes: expected?.bytes });
              const report = throttled((stats: TarStats) => onProgress({ type: 'volume-progress', volume: target.composeName, ...stats }));
              const hostPath = target.hostPath;
              const prefix = memberPrefixOf(target.mountPath);
              const processor: TarProcessor = new TarProcessor({ onData: () => report(processor.stats), output: 'entries' });
              // Both paths check every member again while writing (the set was checked before CVAT
              // stopped; this is what is written): nothing outside the volume, no path through a link.
              const skipped =
                hostPath === undefined
                  ? await writeThroughEngine(engine, target.containerId, source.openTar(target.composeName, options.signal), processor, prefix, options.signal)
                  : (await writeOnHost(source.openTar(target.composeName, options.signal), processor, hostPath, prefix, options.signal)).skipped;
              for (const s of skipped) onProgress({ type: 'warning', message: `not restored (unsupported type): ${s}` });
              onProgress({ type: 'volume-done', volume: target.composeName, bytes: processor.stats.bytes, files: processor.stats.files });
            }
            // A failed load leaves the old database as it was (the dump goes into a fresh one).
            if (source.database) retiredDatabase = await loadDump(engine, deployment, source.database, options.signal, onProgress);
          } catch (error) {
            onProgress({ type: 'phase', message: 'restore failed: putting the previous data back' });
            const rollbackErrors: unknown[] = [];
            for (const target of prepared) {
              await rollbackVolume(engine, target).catch((e: unknown) => rollbackErrors.push(e));
            }
            const cause = classifyError(error, "a volume's disk is full (the Docker data folder): free space there and restore again");
            const suffix =
              rollbackErrors.length === 0
                ? 'the previous data was put back'
                : `AND putting the previous data back failed (${rollbackErrors.map((e) => (e as Error).message).join('; ')}): the old files are in .cvat-backup-rollback/ inside the volumes`;
            if ((cause as { name?: string }).name === 'InterruptedError') throw cause;
            throw new RestoreFailedError(`restore failed: ${(cause as Error).message}; ${suffix}`, { cause });
          }
          // Only an economy: a failure there must not fail a restore whose data is all written.
          await source.written?.().catch(() => undefined);
          for (const { target } of planned) await commitVolume(engine, target, lock.id);
          // The old data goes while CVAT starts: it is no longer needed, and deleting it is slow.
          removal = Promise.all(
            planned.map(({ target }) =>
              removeRetired(engine, target).catch((error: unknown) =>
                onProgress({ type: 'warning', message: `${(error as Error).message}: delete ${RETIRED_DIR}/ inside volume ${target.composeName} by hand` }),
              ),
            ),
          ).then(() => undefined);
        },
        now,
      );
      if (!wasRunning) {
        // Containers made with `docker compose up --no-start`: a restore brings CVAT up.
        onProgress({ type: 'phase', message: 'starting CVAT' });
        await startContainers(engine, deployment.containers, onProgress);
      }
      await removal;
      if (retiredDatabase?.retired !== undefined) {
        const { db, retired } = retiredDatabase;
        await dropRetiredDatabase(db, retired).catch((error: unknown) =>
          onProgress({ type: 'warning', message: `could not drop the previous database '${retired}' (${(error as Error).message}): drop it by hand` }),
        );
      }
      return {
        project: deployment.project,
        backupVersion,
        deploymentVersion,
        volumes: [...verified].map(([composeName, check]) => {
          const kept = staged.get(composeName)?.reused;
          return { composeName, files: check.files, bytes: check.bytes, ...(kept ? { keptFiles: kept.files, keptBytes: kept.bytes } : {}) };
        }),
        ...(source.database ? { database: { dbname: source.database.dbname, bytes: source.database.size } } : {}),
        downtimeMs: window.downtimeMs,
        durationMs: now() - startedAt,
      };
    }
    try {
      return await restoreStopped(staged);
    } catch (error) {
      // Staged data not moved in (a failure before or while CVAT was stopped) never was the volume's.
      await discardStaged(planned, staged);
      throw error;
    }
  } finally {
    await lock.release().catch(() => undefined);
  }

}
