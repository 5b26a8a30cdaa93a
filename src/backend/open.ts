/**
 * From a repository location (location.ts) to the backend that stores it. The one place that
 * knows every backend; the CLI and tests open repositories through it.
 */
import { UsageError } from '../errors.js';
import type { Backend } from './backend.js';
import { LocalBackend } from './local.js';
import { describeLocation, parseLocation, type Location } from './location.js';
import { RestBackend } from './rest.js';

/** What a backend may need from outside (credentials come from the environment, never the location). */
export interface BackendSettings {
  env?: NodeJS.ProcessEnv;
}

/** Opens the backend of `location` (text in restic's syntax, or parsed). Remote backends connect lazily. */
// eslint-disable-next-line @typescript-eslint/require-await -- async: a bad location rejects, never throws synchronously
export async function openBackend(location: string | Location, settings: BackendSettings = {}): Promise<Backend> {
  const parsed = typeof location === 'string' ? parseLocation(location) : location;
  const env = settings.env ?? process.env;
  switch (parsed.kind) {
    case 'local':
      return new LocalBackend(parsed.path);
    case 'rest':
      return RestBackend.http(parsed.url, describeLocation(parsed), env);
    case 'rclone':
      return RestBackend.rclone(parsed.remote, describeLocation(parsed), env);
    default:
      throw new UsageError(`repository location '${describeLocation(parsed)}': ${parsed.kind}: repositories are not supported by this build yet`);
  }
}
