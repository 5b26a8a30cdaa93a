/**
 * `backup` into the snapshot repository (the default destination).
 *
 * Order: discover → lock project → open repository (exclusive lock) → parent snapshot (latest of
 * this project) → stop CVAT → archive every selected volume (only changed files are read; only
 * new chunks are stored) → start CVAT (always) → write the last pack and the index → write the
 * snapshot. A crash before the snapshot leaves no visible snapshot; the next backup reuses
 * whatever packs were already indexed and `prune` removes unreferenced ones.
 */
import { hostname } from 'node:os';
import type { DockerEngine } from '../docker/engine.js';
import type { ProgressListener } from '../events.js';
import { VolumeMissingError } from '../errors.js';
import { cvatRecord, discoverDeployment, type Deployment } from '../deployment/discover.js';
import { withDeploymentStopped } from '../deployment/lifecycle.js';
import { lockDeployment } from '../deployment/lock.js';
import { chooseTransport, type TransportChoice } from '../archive/transport.js';
import { memberPrefixOf } from '../archive/manifest.js';
import { TarProcessor } from '../archive/tar.js';
import { TarTreeBuilder } from '../repository/tar-import.js';
import { posix } from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { Repository } from '../repository/repository.js';
import { Archiver, type ArchiveStats } from '../repository/archiver.js';
import { listSnapshots } from '../repository/snapshots.js';
import type { Snapshot, SnapshotVolume, TreeNode } from '../repository/tree.js';
import { TOOL_VERSION } from '../version.js';
import { selectVolumes } from './archive-backup.js';

export interface RepositoryBackupOptions {
  project?: string | undefined;
  includeCache?: boolean;
  via?: TransportChoice;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
  now?: () => number;
}

export interface RepositoryBackupResult {
  snapshot: Snapshot & { id: string };
  stats: Record<string, ArchiveStats>;
  bytesAdded: number;
}

export async function backupToRepository(engine: DockerEngine, repo: Repository, options: RepositoryBackupOptions): Promise<RepositoryBackupResult> {
  const now = options.now ?? Date.now;
  const onProgress = options.onProgress ?? (() => undefined);
  const signalOption = options.signal ? { signal: options.signal } : {};
  const startedAt = now();
  const discover = (project: string | undefined): Promise<Deployment> =>
    discoverDeployment(engine, { project, ...(options.signal ? { signal: options.signal } : {}) });
  let deployment = await discover(options.project);
  const { selected, skipped } = selectVolumes(deployment, options.includeCache ?? false);
  if (selected.length === 0) throw new VolumeMissingError(`project '${deployment.project}' has no mounted named volume to back up`);
  const folders = new Map<string, string | undefined>();
  for (const v of selected) folders.set(v.composeName, (await chooseTransport(engine, v.name, options.via ?? 'auto')).hostPath);
  const locked = await lockDeployment(engine, deployment, 'backup', onProgress, () => discover(deployment.project));
  const projectLock = locked.lock;
  deployment = locked.deployment;
  try {
    const repoLock = await repo.lock(true, 'backup');
    try {
      await repo.loadIndex();
      const parent = (await listSnapshots(repo)).filter((s) => s.project === deployment.project).pop();
      const stats: Record<string, ArchiveStats> = {};
      const pool = repo.createChunkPool();
      const { result: volumes, window } = await withDeploymentStopped(
        engine,
        deployment.containers,
        onProgress,
        async () => {
          const out: SnapshotVolume[] = [];
          for (const volume of selected) {
            options.signal?.throwIfAborted();
            onProgress({ type: 'volume-start', volume: volume.composeName, action: 'archiving', totalBytes: undefined });
            const folder = folders.get(volume.composeName);
            const progress = (s: { bytes: number; files: number }): void => onProgress({ type: 'volume-progress', volume: volume.composeName, ...s });
            let result: { tree: string; root: TreeNode; stats: ArchiveStats };
            if (folder !== undefined) {
              const archiver = new Archiver(repo, { ...signalOption, pool, onProgress: (s) => progress({ bytes: s.bytesRead, files: s.files }) });
              const parentTree = parent?.volumes.find((p) => p.composeName === volume.composeName && p.mountPath === volume.mountPath)?.tree;
              result = { ...(await archiver.archive(folder, parentTree)), stats: archiver.stats };
              result.stats.entries++;
            } else {
              // Through the engine: no ctime/inode, so every file is read; chunks still deduplicate.
              const prefix = memberPrefixOf(volume.mountPath);
              const parentDir = posix.dirname(prefix);
              const builder = new TarTreeBuilder(repo, prefix, (s) => progress(s));
              await pipeline(
                await engine.readArchive(volume.container.id, volume.mountPath, options.signal),
                new TarProcessor({ output: 'entries', ...(parentDir === '.' ? {} : { renamePrefix: Buffer.from(`${parentDir}/`) }) }),
                builder,
                signalOption,
              );
              const built = await builder.finishTrees();
              const s = builder.stats;
              result = { ...built, stats: { entries: s.entries, files: s.files, bytes: s.bytes, bytesRead: s.bytes, filesUnchanged: 0, bytesAdded: s.bytesAdded } };
            }
            stats[volume.composeName] = result.stats;
            onProgress({ type: 'volume-done', volume: volume.composeName, bytes: result.stats.bytesRead, files: result.stats.files });
            out.push({
              composeName: volume.composeName,
              name: volume.name,
              role: volume.role,
              mountPath: volume.mountPath,
              tree: result.tree,
              root: result.root,
              entries: result.stats.entries,
              files: result.stats.files,
              bytes: result.stats.bytes,
            });
          }
          return out;
        },
        now,
      ).finally(() => pool.close());
      onProgress({ type: 'phase', message: 'writing index' });
      await repo.flush();
      const finishedAt = now();
      const snapshot: Snapshot = {
        version: 1,
        time: new Date(startedAt).toISOString(),
        hostname: hostname(),
        tool: `cvat-backup ${TOOL_VERSION}`,
        project: deployment.project,
        cvat: cvatRecord(deployment.version),
        ...(parent ? { parent: parent.id } : {}),
        downtimeMs: window.downtimeMs,
        durationMs: finishedAt - startedAt,
        volumes,
        skipped,
      };
      const id = await repo.saveObject('snapshots', snapshot);
      const bytesAdded = Object.values(stats).reduce((sum, s) => sum + s.bytesAdded, 0);
      return { snapshot: { ...snapshot, id }, stats, bytesAdded };
    } finally {
      await repoLock.release().catch(() => undefined);
    }
  } finally {
    await projectLock.release().catch(() => undefined);
  }
}
