/**
 * From a repository location (location.ts) to the backend that stores it. The one place that
 * knows every backend; the CLI and tests open repositories through it. Every backend that is not
 * a local folder is wrapped in the retry wrapper (`remote`): network storage fails for a moment
 * now and then, a local disk that fails does not get better by asking again.
 */
import { UsageError } from '../errors.js';
import type { Backend } from './backend.js';
import { LocalBackend } from './local.js';
import { describeLocation, parseLocation, type Location } from './location.js';
import { RetryBackend, type RetryOptions } from './retry.js';
import { S3Backend, type ObjectLockSettings } from './s3.js';

/** What a backend may need from outside (credentials come from the environment, never the location). */
export interface BackendSettings {
  env?: NodeJS.ProcessEnv;
  /** For `init --object-lock`: the repository is created with this retention (S3 only). */
  objectLock?: ObjectLockSettings;
  /** How remote backends retry (attempts, pauses) and whom they tell (`onRetry`: the CLI's warnings). */
  retry?: RetryOptions;
}

/**
 * A remote backend as the repository gets it: with retries (retry.ts). Each remote case of
 * `openBackend` returns `remote(new XBackend(…), settings)`.
 */
export function remote(backend: Backend, settings: BackendSettings = {}): Backend {
  return new RetryBackend(backend, settings.retry);
}

/** Opens the backend of `location` (text in restic's syntax, or parsed). Remote backends connect lazily. */
export function openBackend(location: string | Location, settings: BackendSettings = {}): Promise<Backend> {
  const parsed = typeof location === 'string' ? parseLocation(location) : location;
  if (settings.objectLock && parsed.kind !== 's3') {
    return Promise.reject(new UsageError(`--object-lock needs an S3 repository (s3:…), not '${describeLocation(parsed)}'`));
  }
  switch (parsed.kind) {
    case 'local':
      return Promise.resolve(new LocalBackend(parsed.path));
    case 's3':
      return Promise.resolve(
        remote(
          new S3Backend(parsed, describeLocation(parsed), {
            ...(settings.env ? { env: settings.env } : {}),
            ...(settings.objectLock ? { objectLock: settings.objectLock } : {}),
          }),
          settings,
        ),
      );
    default:
      return Promise.reject(new UsageError(`repository location '${describeLocation(parsed)}': ${parsed.kind}: repositories are not supported by this build yet`));
  }
}
