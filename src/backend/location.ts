/**
 * Repository locations, in restic's syntax so that restic users need no new habits:
 *
 *   /srv/backup, ./repo, local:/srv/backup        a folder on this machine
 *   sftp:user@host:/srv/backup                    SFTP through the system's ssh (host may be an
 *   sftp:host:relative/path                         ~/.ssh/config alias); a relative path is relative
 *   sftp://user@host:2222//srv/backup               to the login folder, `//` after host:port is absolute
 *   s3:s3.amazonaws.com/bucket/prefix             Amazon S3 (the region from the usual AWS settings)
 *   s3:https://host:9000/bucket/prefix            any S3 server (path-style addressing)
 *   rest:http://host:8000/path                    restic's REST protocol (rest-server, rclone serve restic)
 *   rclone:remote:path                            rclone, started as `rclone serve restic --stdio`
 *   rclone::local:/path, rclone:/path             rclone's on-the-fly remotes; a folder where rclone runs
 *
 * Anything else that looks like a URL (`scheme://…`), and restic's backends we do not speak
 * (`b2:`, `azure:`, `gs:`, `swift:`), is refused with one line — never taken for a folder name.
 * Credentials never live in a location: a `rest:` URL with a user or password is refused (they come
 * from the environment or a file), and `describe` shows a location without any.
 */
import { UsageError } from '../errors.js';

export type Location =
  | { kind: 'local'; path: string }
  | { kind: 'sftp'; user: string | undefined; host: string; port: number | undefined; path: string }
  | {
      kind: 's3';
      /** `https://host:port` of a custom server; undefined for Amazon S3 itself. */
      endpoint: string | undefined;
      bucket: string;
      /** Folder inside the bucket ('' for its root), without leading or trailing '/'. */
      prefix: string;
    }
  | { kind: 'rest'; url: string }
  | { kind: 'rclone'; remote: string };

const NOT_OURS = ['b2', 'azure', 'gs', 'swift'];

/** A location in a message: any `user:password@` in it shown as `***@`. */
function redact(text: string): string {
  return text.replace(/\/\/[^/@]*@/, '//***@');
}

function refuse(text: string, why: string): never {
  throw new UsageError(`repository location '${redact(text)}': ${why}`);
}

/** Parses a location (see the module comment); throws UsageError with one line for anything else. */
export function parseLocation(text: string): Location {
  if (text.trim() === '') refuse(text, 'empty');
  const scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(text)?.[1]?.toLowerCase();
  switch (scheme) {
    case 'local':
      return local(text, text.slice('local:'.length));
    case 'sftp':
      return sftp(text);
    case 's3':
      return s3(text);
    case 'rest':
      return rest(text);
    case 'rclone': {
      const remote = text.slice('rclone:'.length);
      // It goes last on rclone's command line: a leading '-' would be an option (`--config=…`).
      if (remote.startsWith('-')) refuse(text, "an rclone remote may not start with '-'");
      // A configured remote (`b2prod:bucket`), an on-the-fly one (`:local:/srv/x`, `:sftp,host=nas:x`),
      // or an absolute path on the machine rclone runs on (rclone's local backend).
      if (!/^(?:[^:/]+:|:[A-Za-z][^:]*:|\/.)/.test(remote)) {
        refuse(text, "expected rclone:REMOTE:PATH (a remote from 'rclone config', a colon, a path), rclone::BACKEND:PATH or rclone:/PATH");
      }
      return { kind: 'rclone', remote };
    }
    default:
      if (scheme !== undefined && NOT_OURS.includes(scheme)) {
        refuse(text, `cvat-backup does not speak '${scheme}:' itself: reach it through rclone (rclone:REMOTE:PATH)`);
      }
      if (/^[a-zA-Z][a-zA-Z0-9+.-]*:\/\//.test(text)) {
        refuse(text, `unknown scheme '${scheme ?? ''}://' (use a folder, sftp:, s3:, rest: or rclone:)`);
      }
      return local(text, text);
  }
}

function local(text: string, path: string): Location {
  if (path === '') refuse(text, 'no folder given');
  return { kind: 'local', path };
}

function sftp(text: string): Location {
  if (text.startsWith('sftp://')) {
    let url: URL;
    try {
      url = new URL(text);
    } catch {
      refuse(text, 'not a valid sftp:// URL');
    }
    if (url.password !== '') refuse(text, 'no password in the location: use an ssh key or agent');
    if (url.hostname === '') refuse(text, 'no host');
    // sftp://host/rel is relative to the login folder; sftp://host//abs is absolute (restic's rule):
    // what follows the first '/' after host[:port] is the path.
    const slash = text.indexOf('/', 'sftp://'.length);
    const path = slash === -1 ? '' : text.slice(slash + 1);
    if (path === '' || path === '/') refuse(text, 'no folder given');
    return {
      kind: 'sftp',
      user: url.username === '' ? undefined : decodeURIComponent(url.username),
      host: url.hostname.replace(/^\[|\]$/g, ''),
      port: url.port === '' ? undefined : Number(url.port),
      path: decodeURIComponent(path),
    };
  }
  // sftp:[user@]host:path — the host may be an alias from ~/.ssh/config.
  const rest = text.slice('sftp:'.length);
  const match = /^(?:([^@/:]+)@)?(\[[^\]]+\]|[^:/]+):(.+)$/.exec(rest);
  if (!match) refuse(text, 'expected sftp:[USER@]HOST:PATH or sftp://[USER@]HOST[:PORT]//PATH');
  return { kind: 'sftp', user: match[1], host: match[2]!.replace(/^\[|\]$/g, ''), port: undefined, path: match[3]! };
}

function s3(text: string): Location {
  const rest = text.slice('s3:'.length);
  let endpoint: string | undefined;
  let path: string;
  if (/^https?:\/\//i.test(rest)) {
    let url: URL;
    try {
      url = new URL(rest);
    } catch {
      refuse(text, 'not a valid URL after s3:');
    }
    if (url.username !== '' || url.password !== '') refuse(text, 'no credentials in the location: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)');
    endpoint = `${url.protocol}//${url.host}`;
    path = url.pathname.replace(/^\/+/, '');
  } else {
    // s3:HOST/bucket/prefix without a scheme: Amazon S3 (restic's form), or a custom host over https.
    const slash = rest.indexOf('/');
    if (slash <= 0) refuse(text, 'expected s3:s3.amazonaws.com/BUCKET[/PREFIX] or s3:https://HOST[:PORT]/BUCKET[/PREFIX]');
    const host = rest.slice(0, slash);
    endpoint = /(^|\.)amazonaws\.com$/i.test(host) ? undefined : `https://${host}`;
    path = rest.slice(slash + 1);
  }
  const [bucket, ...prefix] = path.split('/').filter((p) => p !== '');
  if (!bucket) refuse(text, 'no bucket given');
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) refuse(text, `'${bucket}' is not a valid bucket name`);
  return { kind: 's3', endpoint, bucket, prefix: prefix.join('/') };
}

function rest(text: string): Location {
  const rest = text.slice('rest:'.length);
  let url: URL;
  try {
    url = new URL(rest);
  } catch {
    refuse(text, 'expected rest:http://HOST:PORT/PATH or rest:https://…');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') refuse(text, 'expected an http:// or https:// URL after rest:');
  if (url.username !== '' || url.password !== '') {
    refuse(text, 'no user or password in the location (it would show in process lists and logs): set CVAT_BACKUP_REST_USERNAME and CVAT_BACKUP_REST_PASSWORD (or _FILE)');
  }
  return { kind: 'rest', url: url.toString().replace(/\/+$/, '') };
}

/** The location for messages, `--json` and `status`: never a credential. */
export function describeLocation(location: Location): string {
  switch (location.kind) {
    case 'local':
      return location.path;
    case 'sftp':
      return `sftp:${location.user ? `${location.user}@` : ''}${location.host.includes(':') ? `[${location.host}]` : location.host}${location.port ? `:${location.port}` : ''}:${location.path}`;
    case 's3':
      return `s3:${location.endpoint ?? 's3.amazonaws.com'}/${location.bucket}${location.prefix ? `/${location.prefix}` : ''}`;
    case 'rest':
      return `rest:${location.url}`;
    case 'rclone':
      return `rclone:${location.remote}`;
  }
}
