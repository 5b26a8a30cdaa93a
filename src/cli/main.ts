/**
 * The command line: parsing, rendering and exit codes. The only module that touches
 * process.stdout, process.stderr, signals and the exit code.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { resolve } from 'node:path';
import { createDockerEngine, type DockerEngine } from '../docker/engine.js';
import { CorruptArchiveError, CvatBackupError, ExitCode, InterruptedError, UsageError, WrongPasswordError, classifyError } from '../errors.js';
import { blameLostLock, describeHolder, type LockOperation } from '../repository/locks.js';
import { repairIndex } from '../repository/repair.js';
import { discoverDeployment, type Deployment } from '../deployment/discover.js';
import { backupToArchiveSet, selectVolumes } from '../backup/archive-backup.js';
import { readArchiveSet, verifyArchiveSet } from '../archive/archive-set.js';
import { restoreFromArchiveSet, type ArchiveRestoreResult } from '../restore/archive-restore.js';
import { TOOL_VERSION } from '../version.js';
import type { ProgressListener } from '../events.js';
import { stat } from 'node:fs/promises';
import type { Backend } from '../backend/backend.js';
import { openBackend, type BackendSettings } from '../backend/open.js';
import { assertRemovable, extendSnapshotRetention } from '../repository/object-lock.js';
import { Repository } from '../repository/repository.js';
import { readSnapshots, shortId, type SnapshotListing } from '../repository/snapshots.js';
import { checkRepository } from '../repository/check.js';
import { exportSnapshot, importArchiveSet } from '../repository/archive-transfer.js';
import { DEFAULT_GRACE_MS, DEFAULT_MAX_UNUSED, pruneRepository, type PruneResult } from '../repository/prune.js';
import { applyRetention, isEmptyPolicy, type RetentionPolicy } from '../repository/retention.js';
import { backupToRepository, type BackupMode } from '../backup/repository-backup.js';
import { restoreFromSnapshot } from '../restore/snapshot-restore.js';
import { describeDatabase } from '../deployment/database.js';
import type { DatabaseSettings } from '../deployment/cvat.js';
import { repositoryLocation, readPassword, readSourcePassword, sourceRepositoryLocation } from './secrets.js';
import { copySnapshots, type CopyEvent, type CopyResult } from '../repository/copy.js';
import type { ChunkerParams } from '../repository/chunker.js';
import type { TransportChoice } from '../archive/transport.js';
import { createProgressRenderer, formatBytes, formatDuration, table } from './render.js';

interface GlobalOptions {
  project?: string;
  json?: boolean;
  repo?: string;
  passwordFile?: string;
  retryLock?: number;
  cacheDir?: string;
  /** false with --no-cache. */
  cache?: boolean;
  sftpCommand?: string;
  sftpArgs?: string;
}

function out(text: string): void {
  process.stdout.write(`${text}\n`);
}

/** Names every snapshot that cannot be read; the rest of the listing goes on. */
function warnDamaged(listing: SnapshotListing): SnapshotListing {
  for (const d of listing.damaged) warn(`snapshot ${shortId(d.id)} cannot be read (${d.error}): skipped; run 'cvat-backup check'`);
  return listing;
}

/** A warning outside a progress display (stderr, one line). */
function warn(message: string): void {
  process.stderr.write(`warning: ${message}\n`);
}

function transportChoice(value: string): TransportChoice {
  if (value !== 'auto' && value !== 'engine' && value !== 'host') throw new InvalidArgumentError('auto, engine or host');
  return value;
}

const viaOption = (): Option =>
  new Option('--via <transport>', 'how volume data moves: engine (Docker archive API), host (volume folders, needs root on the Docker host; keeps sparse files), auto')
    .argParser(transportChoice)
    .default('auto');

function compressionLevel(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 9) throw new InvalidArgumentError('a whole number from 1 to 9');
  return n;
}

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** "5m", "30s", "1h30m", "24h", "0": milliseconds. */
export function parseDuration(value: string): number {
  if (value.trim() === '0') return 0;
  const parts = [...value.trim().matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g)];
  if (parts.length === 0 || parts.map((p) => p[0]).join('') !== value.trim()) throw new InvalidArgumentError('a duration such as 30s, 5m, 2h or 1h30m');
  return Math.round(parts.reduce((sum, p) => sum + Number(p[1]) * DURATION_UNITS[p[2]!]!, 0));
}

/** "30" (days), "30d", "12h", "90s": seconds of Object Lock retention. */
function retentionSeconds(value: string): number {
  const seconds = /^\d+$/.test(value.trim()) ? Number(value) * 86_400 : Math.round(parseDuration(value) / 1000);
  if (!Number.isInteger(seconds) || seconds < 1) throw new InvalidArgumentError('a number of days (e.g. 30), or a duration such as 12h');
  return seconds;
}

/** "5%", "5", "unlimited": a share from 0 to 1. */
function unusedShare(value: string): number {
  if (value === 'unlimited') return 1;
  const n = Number(value.replace(/%$/, ''));
  if (!Number.isFinite(n) || n < 0 || n > 100) throw new InvalidArgumentError('a percentage from 0% to 100%, or unlimited');
  return n / 100;
}

/**
 * Aborted at the first Ctrl-C: remote backends then stop waiting to retry (a pause can last a
 * minute) and give up on a failing call at once; the calls of the cleanup still run.
 */
const retriesInterrupted = new AbortController();

/**
 * Set once the command has failed: requests still in flight beside the one that failed (a store
 * that refused our credentials resets the other connections) retry silently; the error is the
 * command's last word.
 */
let commandFailed = false;

/** Ctrl-C aborts the operation; the operation itself restarts CVAT before it returns. */
function interruptible(): { signal: AbortSignal; dispose: () => void } {
  const controller = new AbortController();
  let count = 0;
  const onSignal = (name: NodeJS.Signals): void => {
    count++;
    if (count === 1) {
      process.stderr.write(`\n${name}: stopping; CVAT is being started again, please wait…\n`);
      controller.abort(new InterruptedError(`interrupted by ${name}`));
      retriesInterrupted.abort(new InterruptedError(`interrupted by ${name}`));
    } else {
      process.stderr.write('still bringing CVAT back up; wait a few seconds more\n');
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return {
    signal: controller.signal,
    dispose: () => {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}

/**
 * Runs a long operation with progress on stderr and Ctrl-C turned into an abort; the bars are
 * gone and the signal handlers removed before the caller prints the result.
 */
async function withProgress<T>(work: (signal: AbortSignal, onProgress: ProgressListener) => Promise<T>): Promise<T> {
  const progress = createProgressRenderer(process.stderr);
  const { signal, dispose } = interruptible();
  try {
    return await work(signal, progress.listener);
  } finally {
    progress.stop();
    dispose();
  }
}

function renderStatus(d: Deployment, endpoint: string, db: DatabaseSettings | undefined): string {
  const lines: string[] = [];
  const v = d.version;
  const versionText =
    v.version === undefined
      ? `unknown (${v.serverImage ? `image ${v.serverImage} has no version tag and no readable cvat/__init__.py` : 'no cvat_server container'})`
      : `${v.version} (from ${v.source === 'image-tag' ? `image tag ${v.serverImage ?? ''}` : 'cvat/__init__.py in the server image'})`;
  lines.push(`Project  ${d.project}  (Docker engine ${endpoint})`);
  lines.push(`CVAT     ${versionText}`);
  if (v.serverImageDigest) lines.push(`Image    ${v.serverImageDigest}`);
  if (db) {
    lines.push(
      db.kind === 'bundled'
        ? `Database PostgreSQL in the cvat_db container, database '${db.dbname}' (its volume is backed up; or a pg_dump with --db dump)`
        : `Database external PostgreSQL at ${db.host}:${db.port}, database '${db.dbname}', user '${db.user}' (backed up with pg_dump from this host)`,
    );
  }
  lines.push('');
  lines.push(
    d.containers.length === 0
      ? 'Containers: none (removed by docker compose down?)'
      : table([['SERVICE', 'CONTAINER', 'STATE', 'IMAGE'], ...d.containers.map((c) => [c.service, c.name, c.state, c.image])]),
  );
  lines.push('');
  const { selected } = selectVolumes(d, false);
  const selectedNames = new Set(selected.map((s) => s.composeName));
  lines.push(
    table([
      ['VOLUME', 'NAME', 'MOUNT', 'USED BY', 'BACKED UP'],
      ...d.volumes.map((vol) => [
        vol.composeName,
        vol.name,
        vol.mountPath ?? '-',
        vol.mountedBy.join(',') || '-',
        selectedNames.has(vol.composeName)
          ? 'yes'
          : vol.backedUpByDefault
            ? 'no: not mounted by any container'
            : `no: ${vol.description} (--include-cache)`,
      ]),
    ]),
  );
  if (d.binds.length > 0) {
    lines.push('');
    lines.push('Bind mounts (never backed up):');
    lines.push(table(d.binds.map((b) => [`  ${b.service}`, `${b.source} -> ${b.destination}`, b.reason])));
  }
  return lines.join('\n');
}

/** What a command opened that must be closed when it ends, whatever the outcome (remote connections). */
export class OpenedBackends {
  private readonly backends: Backend[] = [];
  /** What backends get from the command line and the environment (set before the command runs). */
  settings: BackendSettings = { env: process.env };

  async open(location: string, settings: BackendSettings = {}): Promise<Backend> {
    // A remote backend retries what fails for a moment; the user hears of each retry.
    const backend = await openBackend(location, { ...this.settings, ...settings, retry: { onRetry: (event) => commandFailed || warn(event.message), signal: retriesInterrupted.signal } });
    this.backends.push(backend);
    return backend;
  }

  async closeAll(): Promise<void> {
    const all = this.backends.splice(0);
    await Promise.allSettled(all.map((b) => (b.close ? b.close() : Promise.resolve())));
  }
}

export function buildProgram(engineFactory: () => DockerEngine = () => createDockerEngine(), backends = new OpenedBackends()): Command {
  const program = new Command();
  program
    .name('cvat-backup')
    .description('Back up and restore a whole self-hosted CVAT (Docker Compose) deployment')
    .version(TOOL_VERSION)
    .option('-p, --project <name>', 'compose project of the CVAT deployment (default: the only one running cvat/server, else "cvat")')
    .option('--json', 'print the result as one JSON object on stdout')
    .option('-r, --repo <path>', 'snapshot repository (default: $CVAT_BACKUP_REPO, else /var/backups/cvat-backup as root)')
    .option('--password-file <file>', 'read the repository password from FILE (else $CVAT_BACKUP_PASSWORD, else a prompt)')
    .addOption(new Option('--retry-lock <duration>', 'when the repository is locked, wait up to this long for it (e.g. 5m, 30s) instead of failing').argParser(parseDuration))
    // The local cache of a remote repository (index, snapshots, tree packs) and the spool that
    // keeps a backup's downtime off the network; local repositories have neither.
    .option('--cache-dir <dir>', 'cache of remote repositories (default: $CVAT_BACKUP_CACHE_DIR, else $XDG_CACHE_HOME/cvat-backup, else ~/.cache/cvat-backup)')
    .option('--no-cache', 'remote repositories: read and write everything through the network, also during the downtime')
    .option('--sftp-command <command>', 'sftp: repositories: the command that starts an SFTP session instead of ssh (default: $CVAT_BACKUP_SFTP_COMMAND, else "ssh [-p PORT] [-l USER] HOST -s sftp")')
    .option('--sftp-args <args>', 'sftp: repositories: extra ssh arguments, e.g. "-i ~/.ssh/backup_key" (default: $CVAT_BACKUP_SFTP_ARGS)')
    .showHelpAfterError()
    .exitOverride();

  const globals = (): GlobalOptions => program.opts<GlobalOptions>();
  program.hook('preAction', () => {
    backends.settings = { env: process.env, sftpCommand: globals().sftpCommand, sftpArgs: globals().sftpArgs };
  });

  const printRestore = (result: ArchiveRestoreResult, what: string): void => {
    if (globals().json) {
      out(JSON.stringify(result));
      return;
    }
    const db = result.database ? ` and the database '${result.database.dbname}' (pg_restore of a ${formatBytes(result.database.bytes)} dump)` : '';
    out(`Restored ${what}${result.volumes.length} volumes${db} of CVAT ${result.backupVersion ?? '(unknown)'} into project ${result.project}; CVAT is running.`);
    const kept = result.volumes.reduce((n, v) => n + (v.keptFiles ?? 0), 0);
    if (kept > 0) out(`Kept ${kept} unchanged files (${formatBytes(result.volumes.reduce((n, v) => n + (v.keptBytes ?? 0), 0))}) of the volumes as they were: not written again`);
    out(`Downtime ${formatDuration(result.downtimeMs)}, total ${formatDuration(result.durationMs)}`);
  };

  program
    .command('status')
    .description('show the deployment: containers, volumes and mounts, bind mounts, CVAT version')
    .action(async () => {
      const engine = engineFactory();
      const deployment = await discoverDeployment(engine, { project: globals().project });
      const db = await describeDatabase(engine, deployment);
      const database = db ? { kind: db.kind, host: db.host, port: db.port, dbname: db.dbname, user: db.user } : null;
      if (globals().json) out(JSON.stringify({ endpoint: engine.endpoint, ...deployment, database }, null, 2));
      else out(renderStatus(deployment, engine.endpoint, db));
    });

  program
    .command('backup')
    .description(
      'back up every volume into the repository: copy while CVAT runs, then stop it only to copy what changed (or with --to DIR: stop CVAT, write seed-compatible .tar.gz files)',
    )
    .option('--to <dir>', 'write a seed-compatible archive set into this new or empty folder instead of the repository')
    .addOption(
      new Option('--mode <mode>', 'two-phase: copy while running, stop only for the changes; offline: stop CVAT for the whole copy')
        .choices(['two-phase', 'offline'])
        .default('two-phase'),
    )
    .option('--freeze', 'phase 2 freezes the containers (docker pause) instead of stopping them: no restart, a crash-consistent copy')
    .addOption(
      new Option('--db <how>', "files: copy the database volume like the others; dump: store a pg_dump of the running database instead (an external database is always dumped)")
        .choices(['files', 'dump'])
        .default('files'),
    )
    .option('--repeat-precopy', 'repeat the copy while CVAT runs (up to 3 passes) while a pass takes over 10 s, so less is left for the stop')
    .option('--include-cache', 'also archive cvat_cache_db (a regenerable cache)')
    .addOption(new Option('--compression-level <n>', 'gzip level 1-9').argParser(compressionLevel).default(3))
    .addOption(viaOption())
    .action(
      async (options: {
        to?: string;
        includeCache?: boolean;
        compressionLevel: number;
        via: TransportChoice;
        mode: 'two-phase' | 'offline';
        db: 'files' | 'dump';
        freeze?: boolean;
        repeatPrecopy?: boolean;
      }) => {
      const engine = engineFactory();
      const to = options.to;
      if (options.freeze && options.mode === 'offline') throw new UsageError('--freeze and --mode offline exclude each other');
      if (to === undefined) {
        await backupIntoRepository(engine, {
          includeCache: options.includeCache ?? false,
          via: options.via,
          mode: options.freeze ? 'freeze' : options.mode,
          db: options.db,
          repeatPrecopyAfterMs: options.repeatPrecopy ? 10_000 : undefined,
        });
        return;
      }
      if (options.db === 'dump') throw new UsageError('--db dump applies to repository backups; an archive set holds the database files (cvat_db.tar.gz)');
      if (options.freeze || options.repeatPrecopy) throw new UsageError('--freeze and --repeat-precopy apply to repository backups, not to --to DIR (which stops CVAT)');
      const { manifest, dir } = await withProgress((signal, onProgress) =>
        backupToArchiveSet(engine, {
          project: globals().project,
          to: resolve(to),
          includeCache: options.includeCache ?? false,
          compressionLevel: options.compressionLevel,
          via: options.via,
          signal,
          onProgress,
        }),
      );
      if (globals().json) {
        out(
          JSON.stringify({
            dir,
            project: manifest.project,
            cvatVersion: manifest.cvat.version,
            serverImageDigest: manifest.cvat.serverImageDigest,
            volumes: manifest.volumes.map((v) => ({
              name: v.composeName,
              volume: v.name,
              mountPath: v.mountPath,
              archive: v.archive,
              files: v.files,
              bytes: v.bytes,
              archiveBytes: v.archiveBytes,
              sha256: v.sha256,
            })),
            skipped: manifest.skipped,
            downtimeMs: manifest.downtimeMs,
            durationMs: manifest.durationMs,
          }),
        );
      } else {
        out(table([['VOLUME', 'FILES', 'DATA', 'ARCHIVE'], ...manifest.volumes.map((v) => [v.composeName, String(v.files), formatBytes(v.bytes), `${v.archive} (${formatBytes(v.archiveBytes)})`])]));
        for (const s of manifest.skipped) out(`skipped ${s.composeName}: ${s.reason}`);
        out(`Backup of CVAT ${manifest.cvat.version ?? '(version unknown)'} written to ${dir}`);
        out(`Downtime ${formatDuration(manifest.downtimeMs)}, total ${formatDuration(manifest.durationMs)}`);
      }
    });

  program
    .command('verify')
    .description('check an archive set: manifest, every checksum, every archive read to its end')
    .argument('<dir>', 'folder written by backup --to')
    .action(async (dir: string) => {
      const set = await readArchiveSet(resolve(dir));
      if (!set.manifest) {
        throw new UsageError(`${dir} has no manifest.json (made by hand?): 'restore' checks such archives, 'verify' needs a cvat-backup set`);
      }
      const verified = await withProgress((signal, onProgress) =>
        verifyArchiveSet(set, {
          signal,
          onVolume: (volume, phase, stats) =>
            phase === 'start'
              ? onProgress({ type: 'volume-start', volume, action: 'verifying', totalBytes: undefined })
              : onProgress({ type: 'volume-done', volume, bytes: stats?.bytes ?? 0, files: stats?.files ?? 0 }),
          onProgress: (volume, stats) => onProgress({ type: 'volume-progress', volume, ...stats }),
        }),
      );
      if (globals().json) {
        out(JSON.stringify({ ok: true, dir: set.dir, cvatVersion: set.manifest.cvat.version, volumes: verified.map((v) => ({ name: v.composeName, files: v.check.files, bytes: v.check.bytes, sha256: v.check.sha256 })) }));
      } else {
        out(`OK: ${verified.length} archives of CVAT ${set.manifest.cvat.version ?? '(unknown)'} verified in ${set.dir}`);
      }
    });

  program
    .command('restore')
    .description('verify a snapshot (latest or ID) or an archive set (DIR, ours or made with the guide), then replace the volumes with it and start CVAT')
    .argument('<snapshot-or-dir>', "'latest', a snapshot id (prefix), or a folder with archives")
    .option('--allow-version-mismatch', 'restore even if the CVAT versions differ (risky: see README)')
    .option('--cvat-version <version>', 'CVAT version of a hand-made archive set (no manifest)')
    .option('--volume <name...>', 'restore only these volumes (e.g. cvat_data)')
    .addOption(viaOption())
    .action(async (dir: string, options: { allowVersionMismatch?: boolean; cvatVersion?: string; volume?: string[]; via: TransportChoice }) => {
      const engine = engineFactory();
      if (await isSnapshotRef(dir)) {
        await restoreSnapshot(engine, dir, options);
        return;
      }
      const result = await withProgress((signal, onProgress) =>
        restoreFromArchiveSet(engine, {
          project: globals().project,
          from: resolve(dir),
          allowVersionMismatch: options.allowVersionMismatch ?? false,
          cvatVersion: options.cvatVersion,
          via: options.via,
          volumes: options.volume,
          signal,
          onProgress,
        }),
      );
      printRestore(result, '');
    });

  /** How remote repositories are cached (check reads what the storage holds, never a local copy: `cached` false). */
  const backendSettings = (cached = true): BackendSettings => {
    const { cache, cacheDir } = globals();
    return { cache: { disabled: !cached || cache === false, dir: cacheDir === undefined ? undefined : resolve(cacheDir), onWarning: warn } };
  };

  const openRepository = async (cached = true): Promise<Repository> =>
    Repository.open(await backends.open(repositoryLocation(globals().repo), backendSettings(cached)), await readPassword(globals().passwordFile, false, warn), {
      onWarning: warn,
      locks: {
        retryForMs: globals().retryLock ?? 0,
        onWait: (holder, waitMs) => process.stderr.write(`repository is locked by ${describeHolder(holder)}: waiting up to ${formatDuration(waitMs)} for it…\n`),
      },
    });

  /**
   * Opens the repository and runs `work` holding its lock for `operation`, with Ctrl-C and a lost
   * lock turned into an abort; the lock is always released. A failure met while the lock was lost
   * (a prune that judged it stale may have deleted what was being read) is reported as the lost
   * lock (exit 16), not as damage.
   */
  async function withRepositoryLock<T>(operation: LockOperation, work: (repo: Repository, signal: AbortSignal) => Promise<T>): Promise<T> {
    const repo = await openRepository(operation !== 'check');
    const { signal: interrupt, dispose } = interruptible();
    try {
      const lock = await repo.lock(operation, { signal: interrupt });
      try {
        return await work(repo, AbortSignal.any([interrupt, lock.signal]));
      } catch (error) {
        throw await blameLostLock(lock, error);
      } finally {
        await lock.release().catch(() => undefined);
      }
    } finally {
      dispose();
    }
  }

  async function backupIntoRepository(
    engine: DockerEngine,
    choice: { includeCache: boolean; via: TransportChoice; mode: BackupMode; db: 'files' | 'dump'; repeatPrecopyAfterMs: number | undefined },
  ): Promise<void> {
    const repo = await openRepository();
    const { snapshot, bytesAdded, stats, mode, passes, retained } = await withProgress(async (signal, onProgress) => {
      const result = await backupToRepository(engine, repo, {
        project: globals().project,
        ...choice,
        signal,
        onProgress,
      });
      // Object Lock: what this snapshot shares with older ones stays retained as long as it.
      return { ...result, retained: await extendSnapshotRetention(repo, result.snapshot, signal) };
    });
    if (globals().json) {
      out(
        JSON.stringify({
          snapshot: snapshot.id,
          repository: repo.backend.location,
          project: snapshot.project,
          cvatVersion: snapshot.cvat.version,
          parent: snapshot.parent ?? null,
          volumes: snapshot.volumes.map((v) => ({
            name: v.composeName,
            files: v.files,
            bytes: v.bytes,
            filesUnchanged: stats[v.composeName]?.filesUnchanged ?? 0,
            bytesRead: stats[v.composeName]?.bytesRead ?? 0,
          })),
          bytesAdded,
          mode,
          passes,
          retentionExtended: retained,
          database: snapshot.database ? { location: snapshot.database.location, dbname: snapshot.database.dbname, bytes: snapshot.database.size } : null,
          downtimeMs: snapshot.downtimeMs,
          durationMs: snapshot.durationMs,
        }),
      );
    } else {
      out(table([['VOLUME', 'FILES', 'DATA', 'UNCHANGED FILES', 'READ'], ...snapshot.volumes.map((v) => [v.composeName, String(v.files), formatBytes(v.bytes), String(stats[v.composeName]?.filesUnchanged ?? 0), formatBytes(stats[v.composeName]?.bytesRead ?? 0)])]));
      out(`Snapshot ${shortId(snapshot.id)} of CVAT ${snapshot.cvat.version ?? '(version unknown)'} saved in ${repo.backend.location}; ${formatBytes(bytesAdded)} added`);
      for (const p of passes) {
        if (p.name === 'dump') out(`Dumped the database while CVAT ran: ${formatBytes(p.bytesRead)} in ${formatDuration(p.durationMs)}`);
        else out(`${p.name === 'precopy' ? 'Copied while CVAT ran' : `Copied with CVAT ${p.cvat}`}: ${p.filesRead} files, ${formatBytes(p.bytesRead)} read in ${formatDuration(p.durationMs)}`);
      }
      const held = mode === 'freeze' ? 'Frozen' : 'Downtime';
      out(`${held} ${formatDuration(snapshot.downtimeMs)} (${mode}), total ${formatDuration(snapshot.durationMs)}`);
    }
  }

  async function restoreSnapshot(engine: DockerEngine, ref: string, options: { allowVersionMismatch?: boolean; via: TransportChoice; volume?: string[] }): Promise<void> {
    const repo = await openRepository();
    const result = await withProgress((signal, onProgress) =>
      restoreFromSnapshot(engine, repo, ref, {
        project: globals().project,
        allowVersionMismatch: options.allowVersionMismatch ?? false,
        via: options.via,
        volumes: options.volume,
        signal,
        onProgress,
      }),
    );
    printRestore(result, `snapshot ${shortId(result.snapshot)}: `);
  }

  program
    .command('init')
    .description('create a snapshot repository (location: --repo, $CVAT_BACKUP_REPO or the default)')
    .addOption(fromRepoOption())
    .addOption(fromPasswordFileOption())
    .option('--copy-chunker-params', "cut files like the --from-repo repository does (its chunker parameters), so data copied from it deduplicates with later backups here")
    .addOption(new Option('--object-lock <days>', 'S3 only: create the bucket with Object Lock; every file is kept this many days after the last backup that uses it (or a duration: 12h, 90s)').argParser(retentionSeconds))
    .addOption(new Option('--object-lock-mode <mode>', 'governance: the bucket owner can still lift it; compliance: nobody can before it ends').choices(['governance', 'compliance']).default('governance'))
    .action(async (options: InitFromOptions & { objectLock?: number; objectLockMode: 'governance' | 'compliance' }) => {
      checkInitFrom(options);
      const backend = await backends.open(repositoryLocation(globals().repo), {
        ...backendSettings(),
        ...(options.objectLock !== undefined ? { objectLock: { mode: options.objectLockMode, seconds: options.objectLock } } : {}),
      });
      const password = await readPassword(globals().passwordFile, true, warn);
      const from = await chunkerOfSource(options, password);
      const repo = await Repository.init(backend, password, from ? { chunker: from.chunker } : {});
      if (globals().json) out(JSON.stringify({ repository: backend.location, id: repo.config.id, chunkerParamsFrom: from?.location ?? null }));
      else {
        out(`Created repository ${repo.config.id.slice(0, 10)} at ${backend.location}. Keep the password safe: without it the backups cannot be read.`);
        if (from) out(`It cuts files like ${from.location} (same chunker parameters): snapshots copied from there deduplicate with backups made here.`);
      }
    });

  program
    .command('snapshots')
    .description('list the snapshots in the repository')
    .action(async () => {
      const repo = await openRepository();
      const { snapshots } = warnDamaged(await readSnapshots(repo));
      const shown = globals().project === undefined ? snapshots : snapshots.filter((s) => s.project === globals().project);
      if (globals().json) {
        out(JSON.stringify(shown.map((s) => ({ id: s.id, time: s.time, project: s.project, cvatVersion: s.cvat.version, hostname: s.hostname, parent: s.parent ?? null, mode: s.mode ?? null, downtimeMs: s.downtimeMs, volumes: s.volumes.map((v) => ({ name: v.composeName, files: v.files, bytes: v.bytes })), database: s.database ? { location: s.database.location, dbname: s.database.dbname, bytes: s.database.size } : null }))));
        return;
      }
      if (shown.length === 0) {
        out(`no snapshots in ${repo.backend.location}`);
        return;
      }
      out(
        table([
          ['ID', 'TIME', 'PROJECT', 'CVAT', 'VOLUMES', 'DATA', 'DATABASE', 'DOWNTIME'],
          ...shown.map((s) => [
            shortId(s.id),
            s.time.replace('T', ' ').slice(0, 19),
            s.project,
            s.cvat.version ?? '?',
            String(s.volumes.length),
            formatBytes(s.volumes.reduce((sum, v) => sum + v.bytes, 0)),
            s.database ? `pg_dump ${formatBytes(s.database.size)}` : s.volumes.some((v) => v.role === 'database') ? 'files' : '-',
            `${formatDuration(s.downtimeMs)}${s.mode ? ` (${s.mode})` : ''}`,
          ]),
        ]),
      );
    });

  program
    .command('check')
    .description('check the repository structure (every pack header against the index); --read-data also reads and authenticates every byte')
    .option('--read-data', 'read every pack and verify every blob')
    .action(async (options: { readData?: boolean }) => {
      await withRepositoryLock('check', async (repo, signal) => {
        const result = await checkRepository(repo, { readData: options.readData ?? false, signal, onPhase: (m) => process.stderr.write(`${m}…\n`) });
        // Object Lock: files someone deleted (a delete marker) or overwrote are hidden, not gone.
        const hidden = (await repo.backend.listHidden?.()) ?? [];
        if (hidden.length > 0) {
          result.errors.push(
            `${hidden.length} repository files are hidden by a delete or an overwrite but still stored (${hidden.slice(0, 3).map((h) => h.key).join(', ')}${hidden.length > 3 ? ', …' : ''}): run 'cvat-backup repair undelete' with the bucket owner's credentials`,
          );
        }
        if (globals().json) out(JSON.stringify({ ok: result.errors.length === 0, ...result }));
        else {
          for (const e of result.errors) process.stderr.write(`error: ${e}\n`);
          if (result.unindexed.length > 0) {
            const bytes = result.unindexed.reduce((n, p) => n + p.size, 0);
            const old = result.unindexed.filter((p) => (p.ageMs ?? 0) > DEFAULT_GRACE_MS).length;
            process.stderr.write(
              `note: ${result.unindexed.length} packs (${formatBytes(bytes)}) are named by no index: written by a backup that is running or was interrupted; prune deletes them once they are older than ${formatDuration(DEFAULT_GRACE_MS)}${old > 0 ? ` (${old} already are)` : ''}\n`,
            );
          }
          if (result.errors.length === 0) out(`OK: ${result.snapshots} snapshots, ${result.packs} packs${result.readData ? `, ${result.blobs} blobs read and verified` : ''}`);
        }
        if (result.errors.length > 0) {
          throw new CorruptArchiveError(`repository ${repo.backend.location} has ${result.errors.length} problem(s)${result.errors[0] ? `, first: ${result.errors[0]}` : ''}`);
        }
      });
    });

  const count = (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError('a whole number');
    return n;
  };

  interface PruneChoice {
    maxUnused: number;
    unusedGrace: number;
    dryRun?: boolean;
  }
  const maxUnusedOption = (): Option =>
    new Option('--max-unused <share>', 'repack partly used packs only while unused data exceeds this share of the repository (e.g. 5%, 0%, unlimited)')
      .argParser(unusedShare)
      .default(DEFAULT_MAX_UNUSED, '5%');
  const graceOption = (): Option =>
    new Option('--unused-grace <duration>', 'keep packs no index names (a running or killed backup may still need them) and temporary files until this old')
      .argParser(parseDuration)
      .default(DEFAULT_GRACE_MS, '24h');

  async function prune(repo: Repository, signal: AbortSignal, choice: PruneChoice): Promise<PruneResult> {
    const result = await pruneRepository(repo, {
      signal,
      maxUnused: choice.maxUnused,
      graceMs: choice.unusedGrace,
      dryRun: choice.dryRun ?? false,
      onPhase: (m) => process.stderr.write(`${m}…\n`),
    });
    if (!globals().json) {
      const share = (unused: number, total: number): string => `${formatBytes(unused)} unused (${total === 0 ? 0 : ((100 * unused) / total).toFixed(1)}% of ${formatBytes(total)})`;
      const would = result.dryRun ? 'would be ' : '';
      out(
        `pruned${result.dryRun ? ' (dry run)' : ''}: ${result.packsDeleted} packs ${would}deleted (${result.packsRepacked} repacked, ${result.unindexedDeleted} left by interrupted backups), ${formatBytes(result.bytesFreed)} ${would}freed (${formatBytes(result.bytesDeleted)} deleted, ${formatBytes(result.bytesWritten)} written)`,
      );
      out(`before: ${share(result.unusedBefore, result.totalBefore)}; after: ${share(result.unusedAfter, result.totalAfter)}`);
      if (result.unindexedKept > 0) {
        out(`kept ${result.unindexedKept} packs (${formatBytes(result.unindexedKeptBytes)}) that no index names yet: younger than ${formatDuration(choice.unusedGrace)} (a backup may be writing them)`);
      }
    }
    return result;
  }

  program
    .command('forget')
    .description('remove snapshots by a retention policy (restic semantics, per project); --prune also frees their data')
    .addOption(new Option('--keep-last <n>', 'keep the n latest snapshots').argParser(count))
    .addOption(new Option('--keep-hourly <n>', 'keep the latest snapshot of each of the last n hours that have one').argParser(count))
    .addOption(new Option('--keep-daily <n>', 'likewise for days').argParser(count))
    .addOption(new Option('--keep-weekly <n>', 'likewise for ISO weeks').argParser(count))
    .addOption(new Option('--keep-monthly <n>', 'likewise for months').argParser(count))
    .addOption(new Option('--keep-yearly <n>', 'likewise for years').argParser(count))
    .option('--prune', 'then remove the data no snapshot needs')
    .addOption(maxUnusedOption())
    .addOption(graceOption())
    .option('--dry-run', 'only show what would be removed')
    .action(async (options: { keepLast?: number; keepHourly?: number; keepDaily?: number; keepWeekly?: number; keepMonthly?: number; keepYearly?: number; prune?: boolean; dryRun?: boolean } & PruneChoice) => {
      const policy: RetentionPolicy = {
        ...(options.keepLast !== undefined ? { last: options.keepLast } : {}),
        ...(options.keepHourly !== undefined ? { hourly: options.keepHourly } : {}),
        ...(options.keepDaily !== undefined ? { daily: options.keepDaily } : {}),
        ...(options.keepWeekly !== undefined ? { weekly: options.keepWeekly } : {}),
        ...(options.keepMonthly !== undefined ? { monthly: options.keepMonthly } : {}),
        ...(options.keepYearly !== undefined ? { yearly: options.keepYearly } : {}),
      };
      if (isEmptyPolicy(policy)) throw new UsageError('give at least one --keep-* rule (forget never removes every snapshot)');
      await withRepositoryLock('forget', async (repo, signal) => {
        // Damaged snapshots are named and left alone (their time is unknown); prune refuses while they exist.
        const all = warnDamaged(await readSnapshots(repo)).snapshots;
        const scope = globals().project === undefined ? all : all.filter((s) => s.project === globals().project);
        const decision = applyRetention(scope, policy);
        if (!options.dryRun) {
          // Checked once, not per file: a snapshot removal needs no index, and a lost lock stops here.
          await repo.assertLockHeld();
          if (decision.remove.length > 0 || options.prune) await repo.backend.assertDeletes?.();
          await assertRemovable(repo, decision.remove.map((s) => ({ kind: 'snapshots' as const, name: s.id })), Date.now(), 'forget');
          for (const s of decision.remove) await repo.backend.remove('snapshots', s.id); // durable: the folder is fsynced
        }
        const pruned = options.prune && !options.dryRun ? await prune(repo, signal, options) : undefined;
        if (globals().json) {
          out(JSON.stringify({ kept: decision.keep.map((k) => ({ id: k.snapshot.id, reasons: k.reasons })), removed: decision.remove.map((s) => s.id), dryRun: options.dryRun ?? false, prune: pruned ?? null }));
        } else {
          for (const k of decision.keep) out(`keep    ${shortId(k.snapshot.id)}  ${k.snapshot.time.replace('T', ' ').slice(0, 19)}  ${k.snapshot.project}  (${k.reasons.join(', ')})`);
          for (const r of decision.remove) out(`${options.dryRun ? 'would remove' : 'removed'} ${shortId(r.id)}  ${r.time.replace('T', ' ').slice(0, 19)}  ${r.project}`);
        }
      });
    });

  program
    .command('export')
    .description('write a snapshot as a seed-compatible archive set (<volume>.tar.gz + manifest.json) into a new folder')
    .argument('<snapshot>', "'latest' or a snapshot id (prefix)")
    .requiredOption('--to <dir>', 'new or empty folder')
    .action(async (ref: string, options: { to: string }) => {
      await withRepositoryLock('export', async (repo, signal) => {
        const { snapshot, manifest } = await exportSnapshot(repo, ref, resolve(options.to), {
          project: globals().project,
          toolVersion: TOOL_VERSION,
          signal,
          onVolume: (name) => process.stderr.write(`exporting ${name}…\n`),
        });
        if (globals().json) out(JSON.stringify({ snapshot: snapshot.id, dir: resolve(options.to), volumes: manifest.volumes.map((v) => ({ name: v.composeName, archive: v.archive, files: v.files, bytes: v.bytes })) }));
        else out(`Exported snapshot ${shortId(snapshot.id)} (${manifest.volumes.length} volumes) to ${resolve(options.to)}`);
      });
    });

  program
    .command('import')
    .description('store an archive set (from backup --to, or made by hand with the guide\'s tar commands) as a snapshot')
    .argument('<dir>', 'folder with the archives')
    .option('--cvat-version <version>', 'CVAT version of a hand-made archive set (no manifest)')
    .action(async (dir: string, options: { cvatVersion?: string }) => {
      // Shared, like backup: an import only adds.
      await withRepositoryLock('import', async (repo, signal) => {
        const snapshot = await importArchiveSet(repo, resolve(dir), {
          project: globals().project,
          cvatVersion: options.cvatVersion,
          toolVersion: TOOL_VERSION,
          signal,
          onVolume: (name) => process.stderr.write(`importing ${name}…\n`),
        });
        if (globals().json) out(JSON.stringify({ snapshot: snapshot.id, project: snapshot.project, cvatVersion: snapshot.cvat.version }));
        else out(`Imported ${dir} as snapshot ${shortId(snapshot.id)} of project ${snapshot.project} (CVAT ${snapshot.cvat.version ?? 'unknown'})`);
      });
    });

  program
    .command('prune')
    .description('remove the data no snapshot needs (and, after the grace period, packs left by interrupted backups)')
    .addOption(maxUnusedOption())
    .addOption(graceOption())
    .option('--dry-run', 'only show what would be deleted and repacked')
    .action(async (options: PruneChoice) => {
      await withRepositoryLock('prune', async (repo, signal) => {
        const result = await prune(repo, signal, options);
        if (globals().json) out(JSON.stringify(result));
      });
    });

  const repair = program.command('repair').description('repair the repository');
  repair
    .command('undelete')
    .description("Object Lock (S3): bring back repository files someone deleted or overwrote (their first version is still stored); run with the bucket owner's credentials")
    .action(async () => {
      const backend = await backends.open(repositoryLocation(globals().repo));
      if (!backend.undelete) throw new UsageError(`${backend.location}: only an S3 repository keeps deleted files (versions); nothing to undelete here`);
      const restored = await backend.undelete();
      if (globals().json) out(JSON.stringify({ repository: backend.location, restored }));
      else out(`Brought back ${restored} files in ${backend.location}. Run 'cvat-backup check --read-data' next.`);
    });
  repair
    .command('index')
    .description("rebuild the index from the packs' own headers (when index files are lost, damaged, or disagree with the packs)")
    .action(async () => {
      await withRepositoryLock('repair-index', async (repo, signal) => {
        const result = await repairIndex(repo, { signal, onPhase: (m) => process.stderr.write(`${m}…\n`) });
        if (globals().json) {
          out(JSON.stringify(result));
          return;
        }
        for (const d of result.damagedPacks) {
          warn(`pack ${d.id}: ${d.error}${d.keptFromOldIndex > 0 ? ` (its ${d.keptFromOldIndex} entries from the old index kept)` : ' (not indexed: its blobs are lost unless stored elsewhere)'}`);
        }
        out(
          `Rebuilt the index from ${result.packs} packs (${result.blobs} blobs): ${result.indexFilesWritten} index files written, ${result.indexFilesRemoved} old ones removed${result.missingPacks > 0 ? `, ${result.missingPacks} missing packs dropped` : ''}. Run 'cvat-backup check' next.`,
        );
      });
    });

  // ---- copy between repositories (restic's copy; init --from-repo --copy-chunker-params) ----

  interface FromRepositoryOptions {
    fromRepo?: string;
    fromPasswordFile?: string;
  }
  interface InitFromOptions extends FromRepositoryOptions {
    copyChunkerParams?: boolean;
  }

  function fromRepoOption(): Option {
    return new Option('--from-repo <location>', 'the repository to copy from (default: $CVAT_BACKUP_FROM_REPO)');
  }
  function fromPasswordFileOption(): Option {
    return new Option(
      '--from-password-file <file>',
      "read the --from-repo repository's password from FILE (else $CVAT_BACKUP_FROM_PASSWORD_FILE, then $CVAT_BACKUP_FROM_PASSWORD, else this repository's password)",
    );
  }

  function checkInitFrom(options: InitFromOptions): void {
    const from = sourceRepositoryLocation(options.fromRepo);
    if (options.copyChunkerParams && from === undefined) throw new UsageError('--copy-chunker-params needs --from-repo SOURCE (or $CVAT_BACKUP_FROM_REPO)');
    if (options.fromRepo !== undefined && !options.copyChunkerParams) throw new UsageError('init uses --from-repo only with --copy-chunker-params');
  }

  /**
   * Opens the source repository (--from-repo) with its own password, or `fallback` (the target's)
   * when none is given. A wrong password names the source and where its password comes from.
   */
  async function openSourceRepository(options: FromRepositoryOptions, fallback: string): Promise<Repository> {
    const location = sourceRepositoryLocation(options.fromRepo);
    if (location === undefined) throw new UsageError('give the repository to copy from: --from-repo SOURCE (or $CVAT_BACKUP_FROM_REPO)');
    const own = await readSourcePassword(options.fromPasswordFile, warn);
    const backend = await backends.open(location, backendSettings());
    try {
      return await Repository.open(backend, own ?? fallback, {
        onWarning: (m) => warn(`source: ${m}`),
        locks: { retryForMs: globals().retryLock ?? 0, onWait: (holder, waitMs) => process.stderr.write(`source repository is locked by ${describeHolder(holder)}: waiting up to ${formatDuration(waitMs)} for it…\n`) },
      });
    } catch (error) {
      if (!(error instanceof WrongPasswordError)) throw error;
      throw new WrongPasswordError(
        `wrong password for the source repository ${backend.location} (${own === undefined ? "this repository's password was tried: give the source's with --from-password-file, $CVAT_BACKUP_FROM_PASSWORD_FILE or $CVAT_BACKUP_FROM_PASSWORD" : 'check --from-password-file, $CVAT_BACKUP_FROM_PASSWORD_FILE or $CVAT_BACKUP_FROM_PASSWORD'})`,
        { cause: error },
      );
    }
  }

  /** init --copy-chunker-params: the source's chunker parameters (undefined without the option). */
  async function chunkerOfSource(options: InitFromOptions, targetPassword: string): Promise<{ location: string; chunker: ChunkerParams } | undefined> {
    if (!options.copyChunkerParams) return undefined;
    const source = await openSourceRepository(options, targetPassword);
    return { location: source.backend.location, chunker: source.config.chunker };
  }

  /** Copy's events as the progress display shows them: a bar (or lines) per snapshot being copied. */
  function renderCopyEvents(onProgress: ProgressListener): (event: CopyEvent) => void {
    const labels = new Map<string, string>();
    const last = new Map<string, { bytes: number; files: number }>();
    return (event) => {
      switch (event.type) {
        case 'snapshot-start': {
          const label = `snapshot ${shortId(event.snapshot)} ${event.time.replace('T', ' ').slice(0, 19)} ${event.project}`;
          labels.set(event.snapshot, label);
          onProgress({ type: 'volume-start', volume: label, action: 'copying', totalBytes: event.bytes });
          break;
        }
        case 'snapshot-progress': {
          const label = labels.get(event.snapshot);
          if (label === undefined) break;
          last.set(event.snapshot, { bytes: event.bytes, files: event.files });
          onProgress({ type: 'volume-progress', volume: label, bytes: event.bytes, files: event.files });
          break;
        }
        case 'snapshot-done': {
          const o = event.outcome;
          const label = labels.get(o.source);
          if (label !== undefined) onProgress({ type: 'volume-done', volume: label, ...(last.get(o.source) ?? { bytes: 0, files: 0 }) });
          if (o.status === 'damaged') onProgress({ type: 'warning', message: `source snapshot ${shortId(o.source)} is damaged and was not copied: ${o.error}` });
          break;
        }
        case 'warning':
          onProgress({ type: 'warning', message: event.message });
          break;
      }
    };
  }

  function printCopy(result: CopyResult, source: Repository, target: Repository): void {
    const copied = result.snapshots.filter((s) => s.status === 'copied');
    const present = result.snapshots.filter((s) => s.status === 'present');
    const damaged = result.snapshots.filter((s) => s.status === 'damaged');
    if (globals().json) {
      out(JSON.stringify({ source: source.backend.location, target: target.backend.location, ...result }));
      return;
    }
    if (result.snapshots.length === 0) {
      out(`no snapshots to copy in ${source.backend.location}`);
      return;
    }
    out(
      table([
        ['SOURCE', 'TARGET', 'TIME', 'PROJECT', 'RESULT'],
        ...result.snapshots.map((s) =>
          s.status === 'damaged'
            ? [shortId(s.source), '-', '-', '-', `damaged, not copied: ${s.error}`]
            : [shortId(s.source), shortId(s.target), s.time.replace('T', ' ').slice(0, 19), s.project, s.status === 'copied' ? `copied, ${formatBytes(s.bytesAdded)} added` : 'already there'],
        ),
      ]),
    );
    if (copied.length === 0 && damaged.length === 0) {
      out(`Nothing to copy: ${present.length === 1 ? 'the snapshot is' : `all ${present.length} snapshots are`} already in ${target.backend.location}.`);
      return;
    }
    const others = [present.length > 0 ? `${present.length} already there` : '', damaged.length > 0 ? `${damaged.length} damaged` : ''].filter(Boolean).join(', ');
    out(
      `Copied ${copied.length} snapshot(s) from ${source.backend.location} to ${target.backend.location}${others ? ` (${others})` : ''}: ` +
        `${formatBytes(result.bytesCopied)} in ${result.blobsCopied} blobs sent of ${formatBytes(result.bytesProcessed)} the copied snapshots hold; ` +
        `${formatBytes(result.bytesWritten.packs + result.bytesWritten.objects)} written, ${result.packsVerified} new packs read back.`,
    );
  }

  program
    .command('copy')
    .description("copy snapshots from another repository (--from-repo) into this one: all, or the ones named; only what this one lacks is sent, verified on arrival")
    .argument('[snapshot...]', "'latest' or snapshot ids (prefixes) of the source; all (of --project, if given) when none")
    .addOption(fromRepoOption())
    .addOption(fromPasswordFileOption())
    .action(async (refs: string[], options: FromRepositoryOptions) => {
      if (sourceRepositoryLocation(options.fromRepo) === undefined) throw new UsageError('give the repository to copy from: --from-repo SOURCE (or $CVAT_BACKUP_FROM_REPO)');
      const targetPassword = await readPassword(globals().passwordFile, false, warn);
      const target = await Repository.open(await backends.open(repositoryLocation(globals().repo), backendSettings()), targetPassword, {
        onWarning: warn,
        locks: { retryForMs: globals().retryLock ?? 0, onWait: (holder, waitMs) => process.stderr.write(`repository is locked by ${describeHolder(holder)}: waiting up to ${formatDuration(waitMs)} for it…\n`) },
      });
      const source = await openSourceRepository(options, targetPassword);
      // Shared locks on both: copy only reads the source and only adds to the target.
      const result = await withProgress(async (interrupt, onProgress) => {
        const targetLock = await target.lock('copy', { signal: interrupt });
        try {
          const sourceLock = await source.lock('copy', { signal: interrupt });
          try {
            return await copySnapshots(source, target, {
              refs,
              project: globals().project,
              signal: AbortSignal.any([interrupt, targetLock.signal, sourceLock.signal]),
              onEvent: renderCopyEvents(onProgress),
            });
          } catch (error) {
            throw await blameLostLock(sourceLock, error);
          } finally {
            await sourceLock.release().catch(() => undefined);
          }
        } catch (error) {
          throw await blameLostLock(targetLock, error);
        } finally {
          await targetLock.release().catch(() => undefined);
        }
      });
      printCopy(result, source, target);
      const damaged = result.snapshots.filter((s) => s.status === 'damaged');
      if (damaged.length > 0) {
        throw new CorruptArchiveError(
          `${damaged.length} snapshot(s) of ${source.backend.location} are damaged and were not copied (${damaged.map((d) => shortId(d.source)).join(', ')}); the others were: run 'cvat-backup check' on the source`,
        );
      }
    });

  // ---- end of copy ----

  return program;
}

/** `restore` takes a snapshot ('latest' or a hex id prefix) unless the argument is a folder. */
async function isSnapshotRef(arg: string): Promise<boolean> {
  if (arg === 'latest') return true;
  if (!/^[0-9a-f]{4,64}$/i.test(arg)) return false;
  return (await stat(arg).catch(() => undefined)) === undefined;
}

/** What a full disk means for each command: which disk, and what to do. */
const DISK_FULL: Record<string, string> = {
  backup:
    "the backup's destination is full (the --to folder, or the repository): free space, or remove old snapshots with 'cvat-backup forget --keep-daily 7 --prune'; CVAT was started again and no partial backup was kept",
  init: 'the disk of the repository location is full: free space or choose another --repo',
  import: "the repository's disk is full: free space, or remove old snapshots with 'cvat-backup forget … --prune'; nothing was stored",
  export: 'the disk of the --to folder is full: free space or choose another --to; the partial archives were removed',
  prune: "the repository's disk is full: prune writes what it repacks before it deletes anything; free some space and run it again",
  forget: "the repository's disk is full: free some space and run the command again",
  index: "the repository's disk is full: repair index writes the new index before it removes the old one; free some space and run it again",
};

function report(error: unknown, command: string | undefined): number {
  // An abort whose reason is one of ours (a lost lock) is that error, not an interruption.
  const cause = (error as { name?: unknown; cause?: unknown } | null)?.name === 'AbortError' ? (error as { cause?: unknown }).cause : undefined;
  if (cause instanceof CvatBackupError) return report(cause, command);
  const classified = classifyError(error, command !== undefined ? DISK_FULL[command] : undefined);
  if (classified instanceof AggregateError) {
    const [first, ...rest] = classified.errors as unknown[];
    const code = report(first, command);
    for (const e of rest) process.stderr.write(`cvat-backup: also: ${(e as Error).message}\n`);
    return code;
  }
  if (classified instanceof CvatBackupError) {
    process.stderr.write(`cvat-backup: ${classified.message}\n`);
    return classified.exitCode;
  }
  process.stderr.write(`cvat-backup: internal error: ${(classified as Error)?.stack ?? String(classified)}\n`);
  return ExitCode.internal;
}

export async function main(argv: string[], engineFactory?: () => DockerEngine): Promise<void> {
  const backends = new OpenedBackends();
  const program = buildProgram(engineFactory, backends);
  // A promise that never settles would let Node exit 0 silently; make that a loud internal error.
  let settled = false;
  const onBeforeExit = (): void => {
    if (settled) return;
    settled = true;
    process.stderr.write('cvat-backup: internal error: the operation stalled before finishing; check that CVAT is running (cvat-backup status)\n');
    process.exitCode = ExitCode.internal;
  };
  process.once('beforeExit', onBeforeExit);
  let command: string | undefined;
  program.hook('preAction', (_program, action) => {
    command = action.name();
  });
  try {
    await program.parseAsync(argv, { from: 'user' });
    process.exitCode = ExitCode.ok;
  } catch (error) {
    if (error instanceof CommanderError) {
      process.exitCode = error.exitCode === 0 ? ExitCode.ok : ExitCode.usage;
      return;
    }
    commandFailed = true;
    process.exitCode = report(error, command);
  } finally {
    await backends.closeAll();
    settled = true;
    process.off('beforeExit', onBeforeExit);
  }
}
