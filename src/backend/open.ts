/**
 * From a repository location (location.ts) to the backend that stores it. The one place that
 * knows every backend; the CLI and tests open repositories through it.
 */
import { UsageError } from '../errors.js';
import type { Backend } from './backend.js';
import { withCache, type CacheSettings } from './cache.js';
import { LocalBackend } from './local.js';
import { describeLocation, parseLocation, type Location } from './location.js';

/** What a backend may need from outside (credentials come from the environment, never the location). */
export interface BackendSettings {
  env?: NodeJS.ProcessEnv;
  /** The local cache (and downtime spool) of remote repositories: --cache-dir, --no-cache. */
  cache?: CacheSettings;
}

/**
 * Every remote backend is opened through this: it gets its local cache of index, snapshots and
 * tree packs, and the spool a backup's downtime writes to (cache.ts). Local folders never do.
 * Use: `case 'sftp': return remoteBackend(new SftpBackend(…), settings);`
 */
export function remoteBackend(backend: Backend, settings: BackendSettings): Promise<Backend> {
  return withCache(backend, { ...settings.cache, env: settings.cache?.env ?? settings.env });
}

/** Opens the backend of `location` (text in restic's syntax, or parsed). Remote backends connect lazily. */
export function openBackend(location: string | Location, settings: BackendSettings = {}): Promise<Backend> {
  const parsed = typeof location === 'string' ? parseLocation(location) : location;
  void settings;
  switch (parsed.kind) {
    case 'local':
      return Promise.resolve(new LocalBackend(parsed.path));
    default:
      return Promise.reject(new UsageError(`repository location '${describeLocation(parsed)}': ${parsed.kind}: repositories are not supported by this build yet`));
  }
}
