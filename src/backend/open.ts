/**
 * From a repository location (location.ts) to the backend that stores it. The one place that
 * knows every backend; the CLI and tests open repositories through it.
 */
import { UsageError } from '../errors.js';
import type { Backend } from './backend.js';
import { LocalBackend } from './local.js';
import { describeLocation, parseLocation, type Location } from './location.js';
import { SftpBackend, splitCommand } from './sftp.js';

/** What a backend may need from outside (credentials come from the environment, never the location). */
export interface BackendSettings {
  env?: NodeJS.ProcessEnv;
  /**
   * SFTP: the command that starts a session instead of `ssh … -s sftp` (--sftp-command, else
   * $CVAT_BACKUP_SFTP_COMMAND), and extra ssh arguments (--sftp-args, else $CVAT_BACKUP_SFTP_ARGS).
   */
  sftpCommand?: string | undefined;
  sftpArgs?: string | undefined;
}

/** Opens the backend of `location` (text in restic's syntax, or parsed). Remote backends connect lazily. */
export function openBackend(location: string | Location, settings: BackendSettings = {}): Promise<Backend> {
  const parsed = typeof location === 'string' ? parseLocation(location) : location;
  const env = settings.env ?? {};
  switch (parsed.kind) {
    case 'local':
      return Promise.resolve(new LocalBackend(parsed.path));
    case 'sftp': {
      const command = settings.sftpCommand ?? (env['CVAT_BACKUP_SFTP_COMMAND'] || undefined);
      const args = settings.sftpArgs ?? (env['CVAT_BACKUP_SFTP_ARGS'] || undefined);
      const options = { command: command === undefined ? undefined : splitCommand(command), args: args === undefined ? undefined : splitCommand(args), env: settings.env };
      // A location ssh would misread is refused as a rejection, like the other kinds.
      return new Promise((resolve) => resolve(new SftpBackend({ ...parsed, text: describeLocation(parsed) }, options)));
    }
    default:
      return Promise.reject(new UsageError(`repository location '${describeLocation(parsed)}': ${parsed.kind}: repositories are not supported by this build yet`));
  }
}
