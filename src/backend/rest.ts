/**
 * restic's REST backend protocol (doc/REST_backend.rst in restic), the one `rest-server` and
 * `rclone serve restic` speak, over two transports:
 *
 * - `rest:http(s)://host:port/path`: HTTP/1.1 with keep-alive connections. User and password come
 *   from the environment (CVAT_BACKUP_REST_USERNAME, CVAT_BACKUP_REST_PASSWORD or
 *   CVAT_BACKUP_REST_PASSWORD_FILE), never from the location, and travel only in the
 *   Authorization header.
 * - `rclone:remote:path`: this process starts `rclone serve restic --stdio remote:path` (the
 *   program and its arguments can be set: CVAT_BACKUP_RCLONE_PROGRAM, CVAT_BACKUP_RCLONE_ARGS, as
 *   restic's rclone.program / rclone.args) and speaks HTTP/2 without TLS over its stdin/stdout, as
 *   restic's rclone backend does. rclone gets our environment without any CVAT_BACKUP_* variable
 *   (the repository and REST passwords are not its business).
 *
 * Requests: `POST {path}?create=true` creates the layout; `POST {path}/{kind}/{name}` stores a file
 * (the server writes it; rest-server and most rclone remotes make it visible atomically);
 * `GET` with `Range` reads (206), `HEAD` stats (Content-Length), `DELETE` removes, and
 * `GET {path}/{kind}/` with `Accept: application/vnd.x.restic.rest.v2` lists names with sizes.
 *
 * Times. The protocol lists no modification times. A HEAD may carry `Last-Modified` (newer rclone
 * sets it, by the server's clock): where it does, listings of the small kinds carry it (one HEAD
 * per file, a few at a time; never for packs, which are many); elsewhere `modifiedMs` is undefined
 * and prune falls back to when it first saw a file. Every reply carries the server's `Date`: `clockOffsetMs` tells how far the server's clock
 * is ahead of ours, so locks compare times on the storage's clock, not on each client's (a client
 * whose clock runs an hour ahead must not take a live lock for stale).
 *
 * Append-only servers (`rclone serve restic --append-only`, `rest-server --append-only`) refuse to
 * delete anything but locks and to overwrite a file (403): `remove` then fails with one line saying
 * so, `assertDeletes` tells it before an operation that deletes writes anything, and `save` of a
 * file that is already there with the same bytes counts as done (saves are idempotent).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import http, { type IncomingHttpHeaders } from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import { randomBytes } from 'node:crypto';
import { StorageAccessError, TargetNotEmptyError, UsageError } from '../errors.js';
import type { Backend, FileInfo, FileKind } from './backend.js';
import { socketPair } from './socket-pair.js';

const LIST_V2 = 'application/vnd.x.restic.rest.v2';
/** A request whose reply stalls this long (no bytes either way) fails with ETIMEDOUT. */
const IDLE_TIMEOUT_MS = 120_000;
/** HEADs in flight while a listing fetches modification times. */
const HEAD_CONCURRENCY = 16;

interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

/** How requests reach the server: one HTTP/1.1 agent, or one HTTP/2 session over rclone's stdio. */
interface Transport {
  request(method: string, path: string, headers: Record<string, string>, body?: Buffer[]): Promise<Reply>;
  close(): Promise<void>;
}

function header(headers: IncomingHttpHeaders, name: string): string | undefined {
  const value = headers[name];
  return Array.isArray(value) ? value[0] : value;
}

function bodyLength(body: Buffer[] | undefined): number {
  return body ? body.reduce((n, b) => n + b.length, 0) : 0;
}

/** HTTP/1.1 (or https) with keep-alive: `rest:` locations. */
class HttpTransport implements Transport {
  private readonly agent: http.Agent;
  private readonly base: URL;

  constructor(base: string) {
    this.base = new URL(base);
    this.agent = this.base.protocol === 'https:' ? new https.Agent({ keepAlive: true, maxSockets: 8 }) : new http.Agent({ keepAlive: true, maxSockets: 8 });
  }

  request(method: string, path: string, headers: Record<string, string>, body?: Buffer[]): Promise<Reply> {
    const send = this.base.protocol === 'https:' ? https.request : http.request;
    return new Promise((resolve, reject) => {
      const req = send(
        {
          agent: this.agent,
          protocol: this.base.protocol,
          hostname: this.base.hostname.replace(/^\[|\]$/g, ''),
          port: this.base.port,
          method,
          path,
          headers: { ...headers, ...(body ? { 'content-length': String(bodyLength(body)) } : {}) },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
          res.on('error', reject);
        },
      );
      req.setTimeout(IDLE_TIMEOUT_MS, () => req.destroy(Object.assign(new Error(`no reply for ${IDLE_TIMEOUT_MS / 1000} s`), { code: 'ETIMEDOUT' })));
      req.on('error', reject);
      for (const part of body ?? []) req.write(part);
      req.end();
    });
  }

  close(): Promise<void> {
    this.agent.destroy();
    return Promise.resolve();
  }
}

/** Splits a setting into words the way a shell would for plain words and '…' / "…" quotes. */
export function splitWords(text: string): string[] {
  const words: string[] = [];
  let current: string | undefined;
  let quote: string | undefined;
  for (const ch of text) {
    if (quote) {
      if (ch === quote) quote = undefined;
      else current = (current ?? '') + ch;
    } else if (ch === '"' || ch === "'") {
      quote = ch;
      current ??= '';
    } else if (/\s/.test(ch)) {
      if (current !== undefined) words.push(current);
      current = undefined;
    } else current = (current ?? '') + ch;
  }
  if (quote) throw new UsageError(`unbalanced ${quote} in '${text}'`);
  if (current !== undefined) words.push(current);
  return words;
}

export interface RcloneCommand {
  program: string[];
  args: string[];
}

/** The rclone command line, from CVAT_BACKUP_RCLONE_PROGRAM / CVAT_BACKUP_RCLONE_ARGS (restic's defaults otherwise). */
export function rcloneCommand(env: NodeJS.ProcessEnv): RcloneCommand {
  const program = splitWords(env['CVAT_BACKUP_RCLONE_PROGRAM'] ?? 'rclone');
  if (program.length === 0) throw new UsageError('CVAT_BACKUP_RCLONE_PROGRAM is empty');
  return { program, args: splitWords(env['CVAT_BACKUP_RCLONE_ARGS'] ?? 'serve restic --stdio') };
}

interface RcloneProcess {
  child: ChildProcess;
  session: http2.ClientHttp2Session;
}

/**
 * HTTP/2 without TLS over the stdin/stdout of `rclone serve restic --stdio`: `rclone:` locations.
 * rclone starts with the first request.
 */
class RcloneTransport implements Transport {
  private started: Promise<RcloneProcess> | undefined;
  private exited: Promise<void> = Promise.resolve();
  private exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private spawnError: Error | undefined;
  private stderrTail = '';
  private closing = false;

  constructor(
    private readonly command: RcloneCommand,
    private readonly remote: string,
    private readonly env: NodeJS.ProcessEnv,
    private readonly location: string,
  ) {}

  private start(): Promise<RcloneProcess> {
    this.started ??= (async () => {
      const [program, ...programArgs] = this.command.program as [string, ...string[]];
      const childEnv = Object.fromEntries(Object.entries(this.env).filter(([key]) => !key.startsWith('CVAT_BACKUP_')));
      const [ours, theirs] = await socketPair();
      const child = spawn(program, [...programArgs, ...this.command.args, this.remote], { stdio: [theirs, theirs, 'pipe'], env: childEnv });
      theirs.destroy(); // rclone has its own copy
      this.exited = new Promise((resolve) => {
        child.on('error', (error) => {
          this.spawnError = error;
          resolve();
        });
        child.on('exit', (code, signal) => {
          this.exit = { code, signal };
          resolve();
        });
      });
      child.stderr.on('data', (chunk: Buffer) => {
        this.stderrTail = (this.stderrTail + chunk.toString('utf8')).slice(-4096);
      });
      ours.on('error', () => undefined); // reported through the session and the child's exit
      const session = http2.connect('http://localhost', { createConnection: () => ours });
      session.on('error', () => undefined); // each request reports its own failure
      // rclone gone (a bad remote, a crash): fail what is in flight now, not after a timeout.
      void this.exited.then(() => {
        if (!session.destroyed) session.destroy();
        ours.destroy();
      });
      return { child, session };
    })();
    return this.started;
  }

  /** Why rclone is gone (its last error line), or undefined while it runs. */
  private async death(): Promise<Error | undefined> {
    // A failed request often arrives a moment before the exit: give the exit a chance to land.
    await Promise.race([this.exited, new Promise((r) => setTimeout(r, 200).unref())]);
    const program = this.command.program.join(' ');
    if (this.spawnError) {
      const code = (this.spawnError as NodeJS.ErrnoException).code;
      return new UsageError(
        code === 'ENOENT'
          ? `${this.location}: cannot run '${program}': install rclone, or set CVAT_BACKUP_RCLONE_PROGRAM`
          : `${this.location}: cannot run '${program}': ${this.spawnError.message}`,
        { cause: this.spawnError },
      );
    }
    if (!this.exit) return undefined;
    const lines = this.stderrTail
      .split('\n')
      .map((l) => l.replace(/^\d{4}\/\d\d\/\d\d \d\d:\d\d:\d\d /, '').trim())
      .filter((l) => l !== '' && !/^NOTICE: Config file .* not found/.test(l));
    const why = lines.at(-1) ?? (this.exit.code !== null ? `exit code ${this.exit.code}` : `signal ${this.exit.signal}`);
    return new StorageAccessError(`${this.location}: rclone stopped: ${why}`);
  }

  async request(method: string, path: string, headers: Record<string, string>, body?: Buffer[]): Promise<Reply> {
    if (this.closing) throw new Error(`${this.location}: closed`);
    const { session } = await this.start();
    if (this.exit || this.spawnError) throw (await this.death())!;
    try {
      return await new Promise<Reply>((resolve, reject) => {
        const stream = session.request({ ':method': method, ':path': path, ...headers }, { endStream: body === undefined });
        const chunks: Buffer[] = [];
        let replyHeaders: IncomingHttpHeaders = {};
        let status = 0;
        stream.on('response', (h) => {
          status = Number(h[':status']);
          replyHeaders = h;
        });
        stream.on('data', (c: Buffer) => chunks.push(c));
        const noReply = (): Error => Object.assign(new Error('the stream closed without a reply'), { code: 'ECONNRESET' });
        stream.on('end', () => (status === 0 ? reject(noReply()) : resolve({ status, headers: replyHeaders, body: Buffer.concat(chunks) })));
        stream.on('error', reject);
        stream.on('close', () => status === 0 && reject(noReply()));
        stream.setTimeout(IDLE_TIMEOUT_MS, () => stream.close(http2.constants.NGHTTP2_CANCEL));
        if (body) {
          for (const part of body) stream.write(part);
          stream.end();
        }
      });
    } catch (error) {
      throw (await this.death()) ?? error;
    }
  }

  /** Ends the session, which ends rclone's stdin: rclone exits by itself (a TERM after 5 s, a KILL after 10 s). */
  async close(): Promise<void> {
    if (this.closing || !this.started) {
      this.closing = true;
      return this.exited;
    }
    this.closing = true;
    const { child, session } = await this.started;
    await new Promise<void>((resolve) => {
      if (session.closed || session.destroyed) resolve();
      else session.close(() => resolve());
      setTimeout(resolve, 2000).unref();
    });
    session.destroy();
    const term = setTimeout(() => child.exitCode === null && child.kill('SIGTERM'), 5000);
    const kill = setTimeout(() => child.exitCode === null && child.kill('SIGKILL'), 10_000);
    await this.exited;
    clearTimeout(term);
    clearTimeout(kill);
  }
}

function readSecret(env: NodeJS.ProcessEnv, name: string): string | undefined {
  const file = env[`${name}_FILE`];
  if (file !== undefined && file !== '') {
    try {
      return readFileSync(file, 'utf8').replace(/\r?\n$/, '');
    } catch (error) {
      throw new UsageError(`cannot read ${name}_FILE (${file}): ${(error as NodeJS.ErrnoException).code ?? 'error'}`, { cause: error });
    }
  }
  return env[name];
}

/** The Authorization header of a `rest:` server, from the environment; undefined for none. */
export function restAuthorization(env: NodeJS.ProcessEnv): string | undefined {
  const user = readSecret(env, 'CVAT_BACKUP_REST_USERNAME');
  const password = readSecret(env, 'CVAT_BACKUP_REST_PASSWORD');
  if (user === undefined && password === undefined) return undefined;
  if (user === undefined || user === '') throw new UsageError('CVAT_BACKUP_REST_PASSWORD is set but CVAT_BACKUP_REST_USERNAME is not');
  return `Basic ${Buffer.from(`${user}:${password ?? ''}`).toString('base64')}`;
}

function notFound(what: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`ENOENT: no such file: ${what}`), { code: 'ENOENT' });
}

export interface RestBackendOptions {
  /** For messages: the location without credentials. */
  location: string;
  /** Path prefix of the repository on the server ('' for its root), without a trailing '/'. */
  basePath: string;
  transport: Transport;
  authorization?: string | undefined;
}

export class RestBackend implements Backend {
  readonly location: string;
  private readonly basePath: string;
  private readonly transport: Transport;
  private readonly authorization: string | undefined;
  private offsetMs: number | undefined;

  constructor(options: RestBackendOptions) {
    this.location = options.location;
    this.basePath = options.basePath;
    this.transport = options.transport;
    this.authorization = options.authorization;
  }

  /** `rest:http://host:port/path`. */
  static http(url: string, location: string, env: NodeJS.ProcessEnv): RestBackend {
    const parsed = new URL(url);
    const origin = `${parsed.protocol}//${parsed.host}`;
    return new RestBackend({
      location,
      basePath: parsed.pathname.replace(/\/+$/, ''),
      transport: new HttpTransport(origin),
      authorization: restAuthorization(env),
    });
  }

  /** `rclone:remote:path`: rclone starts with the first request; `close` stops it. */
  static rclone(remote: string, location: string, env: NodeJS.ProcessEnv): RestBackend {
    return new RestBackend({ location, basePath: '', transport: new RcloneTransport(rcloneCommand(env), remote, env, location) });
  }

  private path(kind: FileKind | undefined, name?: string): string {
    if (kind === undefined) return `${this.basePath}/`;
    if (kind === 'config') return `${this.basePath}/config`;
    if (name === undefined) return `${this.basePath}/${kind}/`;
    if (!/^[A-Za-z0-9._-]+$/.test(name) || name.startsWith('.')) throw new Error(`not a repository file name: ${JSON.stringify(name)}`);
    return `${this.basePath}/${kind}/${name}`;
  }

  private async send(method: string, path: string, headers: Record<string, string> = {}, body?: Buffer[]): Promise<Reply> {
    const sent = Date.now();
    let reply: Reply;
    try {
      reply = await this.transport.request(method, path, { ...headers, ...(this.authorization ? { authorization: this.authorization } : {}) }, body);
    } catch (error) {
      if (error instanceof UsageError || error instanceof StorageAccessError) throw error;
      const code = (error as NodeJS.ErrnoException).code;
      // One line, with the code kept for whoever retries; never the request's headers. A stream
      // the server reset (one request of the HTTP/2 session) is worth another try.
      throw Object.assign(new Error(`${this.location}: ${method} ${path}: ${code ?? (error as Error).message}`, { cause: error }), {
        code,
        ...(code === 'ERR_HTTP2_STREAM_ERROR' ? { transient: true } : {}),
      });
    }
    const date = header(reply.headers, 'date');
    const serverMs = date === undefined ? NaN : Date.parse(date);
    const received = Date.now();
    if (Number.isFinite(serverMs) && (received - sent <= 1000 || this.offsetMs === undefined)) {
      // Date has whole seconds: the server's clock read between serverMs and serverMs + 1 s, some
      // time between our send and now. The middle of both ranges; only quick replies are precise.
      this.offsetMs = serverMs + 500 - (sent + received) / 2;
    }
    if (reply.status === 401) {
      throw new StorageAccessError(`${this.location}: the server refused our credentials (401): set CVAT_BACKUP_REST_USERNAME and CVAT_BACKUP_REST_PASSWORD (or _FILE)`);
    }
    return reply;
  }

  private failure(method: string, what: string, reply: Reply): Error {
    const text = reply.body.toString('utf8', 0, Math.min(reply.body.length, 200)).split('\n')[0]!.trim();
    return Object.assign(new Error(`${this.location}: ${method} ${what}: HTTP ${reply.status}${text ? ` (${text})` : ''}`), { code: `HTTP_${reply.status}`, status: reply.status });
  }

  /** How far the server's clock is ahead of this host's, in ms, as its last reply's Date said. */
  clockOffsetMs(): number | undefined {
    return this.offsetMs;
  }

  async exists(): Promise<boolean> {
    const reply = await this.send('HEAD', this.path('config'));
    if (reply.status === 200) return true;
    if (reply.status === 404) return false;
    throw this.failure('HEAD', 'config', reply);
  }

  async create(): Promise<void> {
    if (await this.exists()) throw new TargetNotEmptyError(`${this.location} already holds a repository`);
    for (const kind of ['keys', 'snapshots', 'index', 'data'] as const) {
      if ((await this.listSizes(kind)).length > 0) throw new TargetNotEmptyError(`${this.location} is not empty (it has ${kind}/ files) and holds no repository: give the repository a new or empty path`);
    }
    const reply = await this.send('POST', `${this.path(undefined)}?create=true`);
    if (reply.status !== 200 && reply.status !== 201 && reply.status !== 204) throw this.failure('POST', '?create=true', reply);
  }

  async save(kind: FileKind, name: string, data: Buffer | Buffer[]): Promise<void> {
    const parts = Array.isArray(data) ? data : [data];
    const reply = await this.send('POST', this.path(kind, name), { 'content-type': 'application/octet-stream' }, parts);
    if (reply.status >= 200 && reply.status < 300) return;
    if (reply.status === 403) {
      // An append-only server refuses to overwrite. The same bytes already there: the save is done.
      const there = await this.load(kind, name).catch(() => undefined);
      if (there !== undefined && there.equals(Buffer.concat(parts))) return;
      throw new StorageAccessError(`${this.location}: the server refused to store ${kind}/${name} (403: it is append-only and the file exists with other content, or writes are not allowed)`);
    }
    throw this.failure('POST', `${kind}/${name}`, reply);
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    if (range && range.length <= 0) {
      if ((await this.stat(kind, name)) === undefined) throw notFound(`${this.location}/${kind}/${name}`);
      return Buffer.alloc(0);
    }
    const headers: Record<string, string> = range ? { range: `bytes=${range.offset}-${range.offset + range.length - 1}` } : {};
    const reply = await this.send('GET', this.path(kind, name), headers);
    if (reply.status === 404) throw notFound(`${this.location}/${kind}/${name}`);
    if (reply.status === 416) return Buffer.alloc(0); // the range starts past the end
    if (reply.status === 206 && range) {
      // rclone answers a range past the end with 206 and "bytes 20-10/11": no bytes.
      return reply.body.subarray(0, range.length);
    }
    if (reply.status === 200) return range ? reply.body.subarray(range.offset, range.offset + range.length) : reply.body;
    throw this.failure('GET', `${kind}/${name}`, reply);
  }

  /** Names and sizes (v2 listing); a folder that does not exist lists nothing. */
  private async listSizes(kind: FileKind): Promise<{ name: string; size: number }[]> {
    if (kind === 'config') {
      const size = await this.stat('config', 'config');
      return size === undefined ? [] : [{ name: 'config', size }];
    }
    const reply = await this.send('GET', this.path(kind), { accept: LIST_V2 });
    if (reply.status === 404) return [];
    if (reply.status !== 200) throw this.failure('GET', `${kind}/`, reply);
    let parsed: unknown;
    try {
      parsed = JSON.parse(reply.body.toString('utf8'));
    } catch (error) {
      throw new Error(`${this.location}: the listing of ${kind}/ is not JSON`, { cause: error });
    }
    if (!Array.isArray(parsed)) throw new Error(`${this.location}: the listing of ${kind}/ is not a JSON array`);
    const out: { name: string; size: number }[] = [];
    for (const item of parsed as unknown[]) {
      if (typeof item === 'string') {
        // A v1 server: names only; the size from a HEAD.
        const size = await this.stat(kind, item);
        if (size !== undefined) out.push({ name: item, size });
      } else if (item && typeof item === 'object' && typeof (item as { name?: unknown }).name === 'string' && typeof (item as { size?: unknown }).size === 'number') {
        out.push({ name: (item as { name: string }).name, size: (item as { size: number }).size });
      } else {
        throw new Error(`${this.location}: an entry of the listing of ${kind}/ is neither a name nor {name, size}`);
      }
    }
    return out.filter((f) => !f.name.startsWith('.'));
  }

  private timesKnown: boolean | undefined;

  async list(kind: FileKind): Promise<FileInfo[]> {
    const files = await this.listSizes(kind);
    // Modification times come only from HEAD's Last-Modified; once a server showed it sends none,
    // no more HEADs are spent on asking. Not for packs: one HEAD per pack would make every prune
    // and check pay a round trip per pack, and prune's grace period works without (first seen).
    if (this.timesKnown === false || files.length === 0 || kind === 'data') return files.map((f) => ({ ...f, modifiedMs: undefined }));
    const out: FileInfo[] = [];
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < files.length) {
        const f = files[next++]!;
        if (this.timesKnown === false) {
          out.push({ ...f, modifiedMs: undefined });
          continue;
        }
        const reply = await this.send('HEAD', this.path(kind, f.name));
        if (reply.status === 404) continue; // removed meanwhile
        if (reply.status !== 200) throw this.failure('HEAD', `${kind}/${f.name}`, reply);
        const modified = header(reply.headers, 'last-modified');
        const ms = modified === undefined ? NaN : Date.parse(modified);
        if (!Number.isFinite(ms)) this.timesKnown = false;
        else this.timesKnown = true;
        out.push({ ...f, modifiedMs: Number.isFinite(ms) ? ms : undefined });
      }
    };
    await Promise.all(Array.from({ length: Math.min(HEAD_CONCURRENCY, files.length) }, worker));
    return out;
  }

  async stat(kind: FileKind, name: string): Promise<number | undefined> {
    const reply = await this.send('HEAD', this.path(kind, name));
    if (reply.status === 404) return undefined;
    if (reply.status !== 200) throw this.failure('HEAD', `${kind}/${name}`, reply);
    const length = Number(header(reply.headers, 'content-length'));
    if (!Number.isFinite(length)) throw new Error(`${this.location}: HEAD ${kind}/${name}: no Content-Length`);
    return length;
  }

  private appendOnly(what?: string): StorageAccessError {
    return new StorageAccessError(
      `${this.location}: the server refuses to delete ${what ?? 'repository files'} (403): it is append-only, so forget and prune cannot run through it; run them against the storage itself (on the server, with delete rights)`,
    );
  }

  async remove(kind: FileKind, name: string): Promise<void> {
    const reply = await this.send('DELETE', this.path(kind, name));
    if (reply.status === 404 || (reply.status >= 200 && reply.status < 300)) return;
    if (reply.status === 403) throw this.appendOnly(`${kind}/${name}`);
    throw this.failure('DELETE', `${kind}/${name}`, reply);
  }

  /**
   * Throws the append-only error if the server refuses deletes: asks to delete a snapshot that
   * does not exist (an append-only server refuses before it looks; any other says 404).
   */
  async assertDeletes(): Promise<void> {
    const name = randomBytes(32).toString('hex');
    const reply = await this.send('DELETE', this.path('snapshots', name));
    if (reply.status === 403) throw this.appendOnly();
    if (reply.status !== 404 && (reply.status < 200 || reply.status >= 300)) throw this.failure('DELETE', `snapshots/${name}`, reply);
  }

  async close(): Promise<void> {
    await this.transport.close();
  }
}
