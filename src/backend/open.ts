/**
 * From a repository location (location.ts) to the backend that stores it. The one place that
 * knows every backend; the CLI and tests open repositories through it. Every backend that is not
 * a local folder is wrapped in the retry wrapper (`remote`): network storage fails for a moment
 * now and then, a local disk that fails does not get better by asking again.
 */
import { UsageError } from '../errors.js';
import type { Backend } from './backend.js';
import { withCache, type CacheSettings } from './cache.js';
import { LocalBackend } from './local.js';
import { describeLocation, parseLocation, type Location } from './location.js';
import { RestBackend } from './rest.js';
import { RetryBackend, type RetryOptions } from './retry.js';
import { SftpBackend, splitCommand } from './sftp.js';
import type { ObjectLockSettings } from './s3.js';

/** What a backend may need from outside (credentials come from the environment, never the location). */
export interface BackendSettings {
  env?: NodeJS.ProcessEnv;
  /** For `init --object-lock`: the repository is created with this retention (S3 only). */
  objectLock?: ObjectLockSettings;
  /** How remote backends retry (attempts, pauses) and whom they tell (`onRetry`: the CLI's warnings). */
  retry?: RetryOptions;
  /** The local cache (and downtime spool) of remote repositories: --cache-dir, --no-cache. */
  cache?: CacheSettings;
  /**
   * SFTP: the command that starts a session instead of `ssh … -s sftp` (--sftp-command, else
   * $CVAT_BACKUP_SFTP_COMMAND), and extra ssh arguments (--sftp-args, else $CVAT_BACKUP_SFTP_ARGS).
   */
  sftpCommand?: string | undefined;
  sftpArgs?: string | undefined;
}

/**
 * A remote backend as the repository gets it: with retries (retry.ts). Each remote case of
 * `openBackend` returns `remote(new XBackend(…), settings)`.
 */
export function remote(backend: Backend, settings: BackendSettings = {}): Backend {
  return new RetryBackend(backend, settings.retry);
}

/**
 * Opens the backend of `location` (text in restic's syntax, or parsed). Remote backends connect
 * lazily, and get their local cache of index, snapshots and tree packs and the spool that keeps a
 * backup's downtime off the network (cache.ts); a local folder needs neither.
 */
export async function openBackend(location: string | Location, settings: BackendSettings = {}): Promise<Backend> {
  const parsed = typeof location === 'string' ? parseLocation(location) : location;
  if (settings.objectLock && parsed.kind !== 's3') {
    throw new UsageError(`--object-lock needs an S3 repository (s3:…), not '${describeLocation(parsed)}'`);
  }
  const backend = await backendOf(parsed, settings);
  return parsed.kind === 'local' ? backend : withCache(backend, { ...settings.cache, env: settings.cache?.env ?? settings.env });
}

async function backendOf(parsed: Location, settings: BackendSettings): Promise<Backend> {
  const env = settings.env ?? process.env;
  switch (parsed.kind) {
    case 'local':
      return new LocalBackend(parsed.path);
    case 'rest':
      return remote(RestBackend.http(parsed.url, describeLocation(parsed), env), settings);
    case 'rclone':
      return remote(RestBackend.rclone(parsed.remote, describeLocation(parsed), env), settings);
    case 'sftp': {
      const command = settings.sftpCommand ?? (env['CVAT_BACKUP_SFTP_COMMAND'] || undefined);
      const args = settings.sftpArgs ?? (env['CVAT_BACKUP_SFTP_ARGS'] || undefined);
      const options = { command: command === undefined ? undefined : splitCommand(command), args: args === undefined ? undefined : splitCommand(args), env: settings.env };
      return remote(new SftpBackend({ ...parsed, text: describeLocation(parsed) }, options), settings);
    }
    case 's3': {
      // Loaded only for an S3 location: the AWS SDK is tens of MiB of resident memory and most
      // of a second to load.
      const { S3Backend } = await import('./s3.js');
      return remote(
        new S3Backend(parsed, describeLocation(parsed), {
          ...(settings.env ? { env: settings.env } : {}),
          ...(settings.objectLock ? { objectLock: settings.objectLock } : {}),
        }),
        settings,
      );
    }
  }
}
