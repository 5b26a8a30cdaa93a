/**
 * `restore latest|ID`: a repository snapshot as a restore source. The same rules as an archive
 * set: version check, every blob read and authenticated before anything is touched, rollback
 * points, start in order.
 */
import type { DockerEngine } from '../docker/engine.js';
import type { Repository } from '../repository/repository.js';
import { snapshotVolumeTar, verifyBlobs, verifySnapshotVolume } from '../repository/restorer.js';
import { resolveSnapshot, shortId } from '../repository/snapshots.js';
import { restoreVolumeToFolder, restoreVolumeVerifying } from '../repository/folder-restore.js';
import { contentStream } from '../repository/stream-content.js';
import type { TarStats } from '../archive/tar.js';
import { CorruptArchiveError } from '../errors.js';
import { blameLostLock } from '../repository/locks.js';
import { localCopiesOf } from '../backend/cache.js';
import { onlyVolumes, restoreFromSource, type ArchiveRestoreResult, type RestoreOptions, type RestoreSource } from './archive-restore.js';

export interface SnapshotRestoreResult extends ArchiveRestoreResult {
  snapshot: string;
}

export async function restoreFromSnapshot(
  engine: DockerEngine,
  repo: Repository,
  ref: string,
  options: RestoreOptions,
): Promise<SnapshotRestoreResult> {
  const lock = await repo.lock('restore', options.signal ? { signal: options.signal } : {});
  const pool = repo.createChunkPool();
  let kept: { end(): Promise<void> } | undefined;
  try {
    // The snapshot before the index: one a backup finishes meanwhile has its index files written
    // first, so `latest` never names blobs the loaded index lacks.
    const found = await resolveSnapshot(repo, ref, options.project, (damaged) =>
      options.onProgress?.({ type: 'warning', message: `skipped snapshot ${shortId(damaged.id)}: it cannot be read (${damaged.error})` }),
    );
    await repo.loadIndex();
    // With a dump, `--volume cvat_db` names the database.
    const dbName = 'cvat_db';
    const wantsDatabase = found.database !== undefined && (options.volumes === undefined || options.volumes.length === 0 || options.volumes.includes(dbName));
    const volumeNames = found.database ? options.volumes?.filter((v) => v !== dbName) : options.volumes;
    const snapshot = {
      ...found,
      volumes: found.database && volumeNames !== undefined && volumeNames.length === 0 && wantsDatabase ? [] : onlyVolumes(found.volumes, volumeNames, `snapshot ${shortId(found.id)}`),
    };
    const database = wantsDatabase ? found.database : undefined;
    // From a remote repository the verification's reads are kept on this machine, so the writes
    // after it do not download everything a second time (backend/cache.ts, keepReads).
    const restoring = snapshot.volumes.reduce((n, v) => n + v.bytes, 0) + (database?.size ?? 0);
    kept = await localCopiesOf(repo.backend)?.keepReads({ reserveBytes: restoring });
    const source: RestoreSource = {
      cvatVersion: snapshot.cvat.version ?? undefined,
      handMade: false,
      volumes: snapshot.volumes.map((v) => ({ composeName: v.composeName, mountPath: v.mountPath, bytes: v.bytes })),
      verify: async (_prefixFor, signal, onProgress, written) => {
        const out = new Map<string, TarStats>();
        const left = snapshot.volumes.filter((v) => !written.has(v.composeName));
        if (left.length === 0 && !database) return out;
        onProgress({ type: 'phase', message: `verifying snapshot ${shortId(snapshot.id)}` });
        for (const volume of left) {
          onProgress({ type: 'volume-start', volume: volume.composeName, action: 'verifying', totalBytes: volume.bytes });
          try {
            const stats = await verifySnapshotVolume(repo, volume, {
              ...(signal ? { signal } : {}),
              pool,
              onProgress: (s) => onProgress({ type: 'volume-progress', volume: volume.composeName, ...s }),
              onWarning: (message) => onProgress({ type: 'warning', message: `${volume.composeName}: ${message}` }),
            });
            out.set(volume.composeName, stats);
            onProgress({ type: 'volume-done', volume: volume.composeName, bytes: stats.bytes, files: stats.files });
          } catch (error) {
            if (error instanceof CorruptArchiveError) {
              throw new CorruptArchiveError(`snapshot ${shortId(snapshot.id)} is damaged (volume ${volume.composeName}): ${error.message}`, { cause: error });
            }
            throw error;
          }
        }
        if (database) {
          onProgress({ type: 'volume-start', volume: 'database', action: 'verifying', totalBytes: database.size });
          try {
            await verifyBlobs(repo, database.content, pool, signal);
          } catch (error) {
            if (error instanceof CorruptArchiveError) {
              throw new CorruptArchiveError(`snapshot ${shortId(snapshot.id)} is damaged (database dump): ${error.message}`, { cause: error });
            }
            throw error;
          }
          onProgress({ type: 'volume-done', volume: 'database', bytes: database.size, files: 1 });
        }
        return out;
      },
      openTar: (composeName, signal) => snapshotVolumeTar(repo, snapshot.volumes.find((v) => v.composeName === composeName)!, signal, pool),
      ...(database ? { database: { dbname: database.dbname, size: database.size, open: (signal: AbortSignal | undefined) => contentStream(repo, database.content, pool, signal) } } : {}),
      writeFolder: async (composeName, folder, signal, onProgress, writeOptions) => {
        const volume = snapshot.volumes.find((v) => v.composeName === composeName)!;
        const folderOptions = {
          ...(signal ? { signal } : {}),
          pool,
          onProgress,
          leaveRoot: writeOptions?.leaveRoot ?? false,
          ...(writeOptions?.onWarning ? { onWarning: writeOptions.onWarning } : {}),
          ...(writeOptions?.reuseFrom !== undefined ? { reuseFrom: writeOptions.reuseFrom } : {}),
        };
        try {
          // Not verified before: one pass (from a remote, by pack, the workers writing the files).
          if (writeOptions?.verifying) return await restoreVolumeVerifying(repo, volume, folder, folderOptions);
          return await restoreVolumeToFolder(repo, volume, folder, folderOptions);
        } catch (error) {
          if (writeOptions?.verifying && error instanceof CorruptArchiveError) {
            throw new CorruptArchiveError(`snapshot ${shortId(snapshot.id)} is damaged (volume ${composeName}): ${error.message}`, { cause: error });
          }
          throw error;
        }
      },
      // The kept reads go before the volumes' sync: deleted (and closed everywhere) first, their
      // hundreds of MiB of dirty pages are dropped, not written to the disk the sync waits for.
      written: async () => {
        if (!kept) return;
        await pool.closeFiles();
        await kept.end();
        kept = undefined;
      },
    };
    const result = await restoreFromSource(engine, source, options);
    return { ...result, snapshot: snapshot.id };
  } catch (error) {
    // Data that vanished under a restore whose lock was lost is the lost lock's doing, not damage.
    throw error instanceof CorruptArchiveError || (error as NodeJS.ErrnoException).code === 'ENOENT' ? await blameLostLock(lock, error) : error;
  } finally {
    await kept?.end();
    await pool.close();
    await lock.release().catch(() => undefined);
  }
}
