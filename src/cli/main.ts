/**
 * The command line: parsing, rendering and exit codes. The only module that touches
 * process.stdout, process.stderr, signals and the exit code.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { resolve } from 'node:path';
import { createDockerEngine, type DockerEngine } from '../docker/engine.js';
import { CvatBackupError, ExitCode, InterruptedError, UsageError, classifyError } from '../errors.js';
import { discoverDeployment, type Deployment } from '../deployment/discover.js';
import { backupToArchiveSet, selectVolumes } from '../backup/archive-backup.js';
import { readArchiveSet, verifyArchiveSet } from '../archive/archive-set.js';
import { restoreFromArchiveSet } from '../restore/archive-restore.js';
import { TOOL_VERSION } from '../version.js';
import type { TransportChoice } from '../archive/transport.js';
import { createProgressRenderer, formatBytes, formatDuration, table } from './render.js';

interface GlobalOptions {
  project?: string;
  json?: boolean;
}

function out(text: string): void {
  process.stdout.write(`${text}\n`);
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

/** Ctrl-C aborts the operation; the operation itself restarts CVAT before it returns. */
function interruptible(): { signal: AbortSignal; dispose: () => void } {
  const controller = new AbortController();
  let count = 0;
  const onSignal = (name: NodeJS.Signals): void => {
    count++;
    if (count === 1) {
      process.stderr.write(`\n${name}: stopping; CVAT is being started again, please wait…\n`);
      controller.abort(new InterruptedError(`interrupted by ${name}`));
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

function renderStatus(d: Deployment, endpoint: string): string {
  const lines: string[] = [];
  const v = d.version;
  const versionText =
    v.version === undefined
      ? `unknown (${v.serverImage ? `image ${v.serverImage} has no version tag and no readable cvat/__init__.py` : 'no cvat_server container'})`
      : `${v.version} (from ${v.source === 'image-tag' ? `image tag ${v.serverImage ?? ''}` : 'cvat/__init__.py in the server image'})`;
  lines.push(`Project  ${d.project}  (Docker engine ${endpoint})`);
  lines.push(`CVAT     ${versionText}`);
  if (v.serverImageDigest) lines.push(`Image    ${v.serverImageDigest}`);
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

export function buildProgram(engineFactory: () => DockerEngine = () => createDockerEngine()): Command {
  const program = new Command();
  program
    .name('cvat-backup')
    .description('Back up and restore a whole self-hosted CVAT (Docker Compose) deployment')
    .version(TOOL_VERSION)
    .option('-p, --project <name>', 'compose project of the CVAT deployment (default: the only one running cvat/server, else "cvat")')
    .option('--json', 'print the result as one JSON object on stdout')
    .showHelpAfterError()
    .exitOverride();

  const globals = (): GlobalOptions => program.opts<GlobalOptions>();

  program
    .command('status')
    .description('show the deployment: containers, volumes and mounts, bind mounts, CVAT version')
    .action(async () => {
      const engine = engineFactory();
      const deployment = await discoverDeployment(engine, { project: globals().project });
      if (globals().json) out(JSON.stringify({ endpoint: engine.endpoint, ...deployment }, null, 2));
      else out(renderStatus(deployment, engine.endpoint));
    });

  program
    .command('backup')
    .description('stop CVAT, archive every volume into DIR (seed-compatible .tar.gz + manifest.json), start CVAT')
    .requiredOption('--to <dir>', 'new or empty folder for the archive set')
    .option('--include-cache', 'also archive cvat_cache_db (a regenerable cache)')
    .addOption(new Option('--compression-level <n>', 'gzip level 1-9').argParser(compressionLevel).default(3))
    .addOption(viaOption())
    .action(async (options: { to: string; includeCache?: boolean; compressionLevel: number; via: TransportChoice }) => {
      const engine = engineFactory();
      const progress = createProgressRenderer(process.stderr);
      const { signal, dispose } = interruptible();
      try {
        const { manifest, dir } = await backupToArchiveSet(engine, {
          project: globals().project,
          to: resolve(options.to),
          includeCache: options.includeCache ?? false,
          compressionLevel: options.compressionLevel,
          via: options.via,
          signal,
          onProgress: progress.listener,
        });
        progress.stop();
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
      } finally {
        progress.stop();
        dispose();
      }
    });

  program
    .command('verify')
    .description('check an archive set: manifest, every checksum, every archive read to its end')
    .argument('<dir>', 'folder written by backup --to')
    .action(async (dir: string) => {
      const progress = createProgressRenderer(process.stderr);
      const { signal, dispose } = interruptible();
      try {
        const set = await readArchiveSet(resolve(dir));
        if (!set.manifest) {
          throw new UsageError(`${dir} has no manifest.json (made by hand?): 'restore' checks such archives, 'verify' needs a cvat-backup set`);
        }
        const verified = await verifyArchiveSet(set, {
          signal,
          onVolume: (volume, phase, stats) =>
            phase === 'start'
              ? progress.listener({ type: 'volume-start', volume, action: 'verifying', totalBytes: undefined })
              : progress.listener({ type: 'volume-done', volume, bytes: stats?.bytes ?? 0, files: stats?.files ?? 0 }),
          onProgress: (volume, stats) => progress.listener({ type: 'volume-progress', volume, ...stats }),
        });
        progress.stop();
        if (globals().json) {
          out(JSON.stringify({ ok: true, dir: set.dir, cvatVersion: set.manifest.cvat.version, volumes: verified.map((v) => ({ name: v.composeName, files: v.check.files, bytes: v.check.bytes, sha256: v.check.sha256 })) }));
        } else {
          out(`OK: ${verified.length} archives of CVAT ${set.manifest.cvat.version ?? '(unknown)'} verified in ${set.dir}`);
        }
      } finally {
        progress.stop();
        dispose();
      }
    });

  program
    .command('restore')
    .description('verify an archive set (ours or made with the guide), then replace the volumes with it and start CVAT')
    .argument('<dir>', 'folder with the archives')
    .option('--allow-version-mismatch', 'restore even if the CVAT versions differ (risky: see README)')
    .option('--cvat-version <version>', 'CVAT version of a hand-made archive set (no manifest)')
    .addOption(viaOption())
    .action(async (dir: string, options: { allowVersionMismatch?: boolean; cvatVersion?: string; via: TransportChoice }) => {
      const engine = engineFactory();
      const progress = createProgressRenderer(process.stderr);
      const { signal, dispose } = interruptible();
      try {
        const result = await restoreFromArchiveSet(engine, {
          project: globals().project,
          from: resolve(dir),
          allowVersionMismatch: options.allowVersionMismatch ?? false,
          cvatVersion: options.cvatVersion,
          via: options.via,
          signal,
          onProgress: progress.listener,
        });
        progress.stop();
        if (globals().json) out(JSON.stringify(result));
        else {
          out(`Restored ${result.volumes.length} volumes of CVAT ${result.backupVersion ?? '(unknown)'} into project ${result.project}; CVAT is running.`);
          out(`Downtime ${formatDuration(result.downtimeMs)}, total ${formatDuration(result.durationMs)}`);
        }
      } finally {
        progress.stop();
        dispose();
      }
    });

  return program;
}

function report(error: unknown): number {
  const classified = classifyError(error);
  if (classified instanceof AggregateError) {
    const [first, ...rest] = classified.errors as unknown[];
    const code = report(first);
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
  const program = buildProgram(engineFactory);
  // A promise that never settles would let Node exit 0 silently; make that a loud internal error.
  let settled = false;
  const onBeforeExit = (): void => {
    if (settled) return;
    settled = true;
    process.stderr.write('cvat-backup: internal error: the operation stalled before finishing; check that CVAT is running (cvat-backup status)\n');
    process.exitCode = ExitCode.internal;
  };
  process.once('beforeExit', onBeforeExit);
  try {
    await program.parseAsync(argv, { from: 'user' });
    process.exitCode = ExitCode.ok;
  } catch (error) {
    if (error instanceof CommanderError) {
      process.exitCode = error.exitCode === 0 ? ExitCode.ok : ExitCode.usage;
      return;
    }
    process.exitCode = report(error);
  } finally {
    settled = true;
    process.off('beforeExit', onBeforeExit);
  }
}
