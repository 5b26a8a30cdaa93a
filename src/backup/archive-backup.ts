/**
 * `backup --to DIR`: the guide's procedure, automated and made safe.
 *
 * Order: discover → check DIR → lock → (estimate sizes while CVAT still runs) → stop in dependency
 * order → archive every selected volume → start again (always) → write manifest.json last.
 * A failure at any point removes what this run wrote, so DIR never holds a set `verify` accepts
 * unless the backup completed.
 */
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { DockerEngine } from '../docker/engine.js';
import type { ProgressListener } from '../events.js';
import { TargetNotEmptyError, UsageError, VolumeMissingError } from '../errors.js';
import { cvatRecord, discoverDeployment, type Deployment, type DeploymentVolume } from '../deployment/discover.js';
import { withDeploymentStopped } from '../deployment/lifecycle.js';
import { lockDeployment } from '../deployment/lock.js';
import { recoverKilledRestore } from '../restore/volume-rollback.js';
import { writeVolumeArchive, type VolumeSource } from '../archive/archive-set.js';
import { chooseTransport, type ChosenTransport, type TransportChoice } from '../archive/transport.js';
import { writeFileDurably } from '../archive/files.js';
import {
  MANIFEST_FILE,
  MANIFEST_FORMAT,
  archiveFileName,
  type ArchiveSetManifest,
  type VolumeArchiveRecord,
} from '../archive/manifest.js';
import { TOOL_VERSION } from '../version.js';

export interface ArchiveBackupOptions {
  project?: string | undefined;
  to: string;
  includeCache?: boolean;
  compressionLevel?: number;
  via?: TransportChoice;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
  now?: () => number;
}

export interface ArchiveBackupResult {
  dir: string;
  manifest: ArchiveSetManifest;
}

interface SelectedVolumes {
  selected: (DeploymentVolume & { mountPath: string; container: NonNullable<DeploymentVolume['container']> })[];
  skipped: { composeName: string; reason: string }[];
}

export function selectVolumes(deployment: Deployment, includeCache: boolean): SelectedVolumes {
  const selected: SelectedVolumes['selected'] = [];
  const skipped: SelectedVolumes['skipped'] = [];
  for (const v of deployment.volumes) {
    if (!v.backedUpByDefault && !includeCache) {
      skipped.push({ composeName: v.composeName, reason: `${v.description}: add --include-cache to back it up` });
    } else if (v.container === undefined || v.mountPath === undefined) {
      skipped.push({ composeName: v.composeName, reason: 'not mounted by any container of the project' });
    } else {
      selected.push({ ...v, mountPath: v.mountPath, container: v.container });
    }
  }
  return { selected, skipped };
}

async function prepareTarget(dir: string): Promise<void> {
  let entries: string[];
  try {
    entries = await readdir(dir);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') {
      if ((error as NodeJS.ErrnoException).code === 'ENOTDIR') throw new UsageError(`--to ${dir} is a file, not a folder`);
      throw error;
    }
    // The set holds the Django secret key in clear (as the guide's does): keep it private.
    await mkdir(dir, { recursive: true, mode: 0o700 });
    return;
  }
  if (entries.length > 0) {
    throw new TargetNotEmptyError(`${dir} is not empty: give --to a new or empty folder (nothing was stopped)`);
  }
}

export async function backupToArchiveSet(engine: DockerEngine, options: ArchiveBackupOptions): Promise<ArchiveBackupResult> {
  const now = options.now ?? Date.now;
  const onProgress = options.onProgress ?? (() => undefined);
  const startedAt = now();
  const discover = (project: string | undefined): Promise<Deployment> =>
    discoverDeployment(engine, { project, ...(options.signal ? { signal: options.signal } : {}) });
  let deployment = await discover(options.project);
  const { selected, skipped } = selectVolumes(deployment, options.includeCache ?? false);
  if (selected.length === 0) {
    throw new VolumeMissingError(`project '${deployment.project}' has no mounted named volume to back up`);
  }
  await prepareTarget(options.to);
  const transports = new Map<string, ChosenTransport>();
  for (const v of selected) transports.set(v.composeName, await chooseTransport(engine, v.name, options.via ?? 'auto'));
  const locked = await lockDeployment(engine, deployment, 'backup', onProgress, () => discover(deployment.project), recoverKilledRestore);
  const lock = locked.lock;
  deployment = locked.deployment;
  const written: string[] = [];
  try {
    onProgress({ type: 'phase', message: 'measuring volumes' });
    const sizes = await engine.volumeSizes().catch(() => new Map<string, number>());
    const { result: records, window } = await withDeploymentStopped(
      engine,
      deployment.containers,
      onProgress,
      async () => {
        const out: VolumeArchiveRecord[] = [];
        for (const volume of selected) {
          options.signal?.throwIfAborted();
          onProgress({ type: 'volume-start', volume: volume.composeName, action: 'archiving', totalBytes: sizes.get(volume.name) });
          written.push(archiveFileName(volume.composeName));
          const chosen = transports.get(volume.composeName)!;
          const source: VolumeSource =
            chosen.hostPath !== undefined
              ? { kind: 'host', composeName: volume.composeName, hostPath: chosen.hostPath, mountPath: volume.mountPath }
              : { kind: 'engine', composeName: volume.composeName, containerId: volume.container.id, mountPath: volume.mountPath };
          const archive = await writeVolumeArchive(
            engine,
            source,
            options.to,
            {
              ...(options.compressionLevel === undefined ? {} : { level: options.compressionLevel }),
              ...(options.signal ? { signal: options.signal } : {}),
              onProgress: (stats) => onProgress({ type: 'volume-progress', volume: volume.composeName, ...stats }),
              onWarning: (message) => onProgress({ type: 'warning', message: `${volume.composeName}: ${message}` }),
            },
          );
          onProgress({ type: 'volume-done', volume: volume.composeName, bytes: archive.bytes, files: archive.files });
          out.push({
            composeName: volume.composeName,
            name: volume.name,
            role: volume.role,
            mountPath: volume.mountPath,
            archive: archive.archive,
            memberPrefix: archive.memberPrefix,
            entries: archive.entries,
            files: archive.files,
            bytes: archive.bytes,
            archiveBytes: archive.archiveBytes,
            sha256: archive.sha256,
            transport: chosen.transport,
          });
        }
        return out;
      },
      now,
    );
    const finishedAt = now();
    const manifest: ArchiveSetManifest = {
      format: MANIFEST_FORMAT,
      formatVersion: 1,
      tool: { name: 'cvat-backup', version: TOOL_VERSION },
      project: deployment.project,
      cvat: cvatRecord(deployment.version),
      startedAt: new Date(startedAt).toISOString(),
      finishedAt: new Date(finishedAt).toISOString(),
      durationMs: finishedAt - startedAt,
      downtimeMs: window.downtimeMs,
      volumes: records,
      skipped,
      bindMounts: deployment.binds,
    };
    written.push(MANIFEST_FILE);
    await writeFileDurably(join(options.to, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`);
    return { dir: options.to, manifest };
  } catch (error) {
    // Leave DIR as we found it (empty): an incomplete set must never look like a backup.
    await Promise.all(written.map((name) => rm(join(options.to, name), { force: true }).catch(() => undefined)));
    throw error;
  } finally {
    await lock.release().catch(() => undefined);
  }
}
