/**
 * Retries in one place: a Backend wrapper that repeats a call failing for a transient reason — a
 * connection reset or refused, a timeout, a throttling reply (HTTP 429, 503, S3's SlowDown), a
 * ranged load cut short — with exponential backoff and jitter, a bounded number of attempts and a
 * bounded total time. What a repeat cannot fix is thrown at once, unchanged: a missing file
 * (ENOENT), no permission, a full disk, "not a repository", damage, a cancelled operation.
 *
 * Repeating is safe because the contract (backend.ts) makes saves of the same content and removes
 * idempotent: a save whose reply was lost is simply saved again. The wrapper never prints; it
 * tells `onRetry` of each retry so the CLI can say "retrying save of data/ab12cd34… (attempt 2/10):
 * connection reset". Every non-local backend is opened wrapped in it (open.ts, `remote`).
 *
 * Short reads: a ranged load that returns fewer bytes than asked is compared with the file's size
 * (one stat); fewer than the file holds is a short read and is retried. A whole load is checked
 * by the backend's client (Content-Length) and by the reader (every object is authenticated and
 * named by its hash).
 */
import { systemClock, type Clock } from '../clock.js';
import type { Backend, FileInfo, FileKind, TemporaryFile } from './backend.js';
import { adoptOptional, type OptionalMethod } from './forwarding.js';

export interface RetryEvent {
  /** What is retried, e.g. "save of data/ab12cd34…". */
  operation: string;
  /** The attempt about to be made (2 for the first retry) and the most there will be. */
  attempt: number;
  attempts: number;
  /** The pause before it. */
  delayMs: number;
  /** Why the last attempt failed: a short reason ("connection reset", "HTTP 503"). */
  reason: string;
  error: unknown;
  /** The whole line: "retrying save of data/ab12cd34… (attempt 2/10): connection reset". */
  message: string;
}

export interface RetryOptions {
  /** Attempts per call, the first one included (default 10). */
  attempts?: number;
  /** No retry starts once this long has passed since the first attempt (default 15 min). */
  maxElapsedMs?: number;
  /** The first pause (default 500 ms); each next one doubles, up to `maxDelayMs` (default 60 s). */
  initialDelayMs?: number;
  maxDelayMs?: number;
  /** Told of every retry (the core never prints). */
  onRetry?: (event: RetryEvent) => void;
  /** Pauses between attempts and measures the total time (tests inject a manual clock: no waiting). */
  clock?: Clock;
  /** Uniform in [0, 1), for the jitter (tests inject a fixed one). */
  random?: () => number;
  /** Stops retrying (a pause in progress ends at once with the abort reason). */
  signal?: AbortSignal;
}

/** A ranged load that came back shorter than the file holds: transient, retried. */
export class ShortReadError extends Error {
  readonly code = 'ESHORTREAD';
  readonly transient = true;
}

/** Node and undici codes of a connection that failed or stalled: worth another try. */
const TRANSIENT_CODES = new Map<string, string>([
  ['ECONNRESET', 'connection reset'],
  ['ECONNABORTED', 'connection aborted'],
  ['ECONNREFUSED', 'connection refused'],
  ['EPIPE', 'connection closed while sending'],
  ['ETIMEDOUT', 'timed out'],
  ['ESOCKETTIMEDOUT', 'timed out'],
  ['EHOSTUNREACH', 'host unreachable'],
  ['ENETUNREACH', 'network unreachable'],
  ['ENETDOWN', 'network down'],
  ['ENETRESET', 'connection reset'],
  ['ENOTCONN', 'not connected'],
  ['EAI_AGAIN', 'name lookup failed for now'],
  ['ESHORTREAD', 'short read'],
  ['ERR_STREAM_PREMATURE_CLOSE', 'connection closed early'],
  ['UND_ERR_SOCKET', 'connection reset'],
  ['UND_ERR_CLOSED', 'connection closed'],
  ['UND_ERR_CONNECT_TIMEOUT', 'connect timed out'],
  ['UND_ERR_HEADERS_TIMEOUT', 'timed out'],
  ['UND_ERR_BODY_TIMEOUT', 'timed out'],
]);

/** HTTP statuses that say "later": timeout, throttling, a server or gateway having trouble. */
const TRANSIENT_STATUS = new Set([408, 429, 500, 502, 503, 504]);

/** S3 error codes (`name` or `Code`) that say "later". */
const TRANSIENT_NAMES = new Set([
  'SlowDown',
  'Throttling',
  'ThrottlingException',
  'TooManyRequestsException',
  'RequestLimitExceeded',
  'RequestTimeout',
  'RequestTimeoutException',
  'InternalError',
  'ServiceUnavailable',
  'TimeoutError',
]);

/** Codes a repeat cannot fix: checked first, so a permanent error wrapping a transient cause is not retried. */
const PERMANENT_CODES = new Set(['ENOENT', 'ENOTDIR', 'EACCES', 'EPERM', 'EROFS', 'ENOSPC', 'EDQUOT', 'EEXIST', 'ABORT_ERR']);
const PERMANENT_STATUS = new Set([400, 401, 403, 404, 405, 409, 412, 416]);

interface ErrorFields {
  code?: unknown;
  name?: unknown;
  Code?: unknown;
  statusCode?: unknown;
  status?: unknown;
  transient?: unknown;
  $metadata?: { httpStatusCode?: unknown };
  $retryable?: unknown;
  cause?: unknown;
  message?: unknown;
}

function statusOf(e: ErrorFields): number | undefined {
  for (const s of [e.statusCode, e.status, e.$metadata?.httpStatusCode]) if (typeof s === 'number') return s;
  return undefined;
}

/**
 * Why `error` is worth another attempt (a short reason for messages), or undefined when it is
 * not. Looks through `cause` (fetch wraps the socket error). A backend marks a transient error
 * of its own with `transient: true`; the class of error decides nothing else (our own errors —
 * not a repository, damage — are never retried).
 */
export function transientReason(error: unknown): string | undefined {
  for (let e = error, depth = 0; typeof e === 'object' && e !== null && depth < 5; e = (e as ErrorFields).cause, depth++) {
    const f = e as ErrorFields;
    const code = typeof f.code === 'string' ? f.code : undefined;
    const status = statusOf(f);
    if (f.name === 'AbortError' || (code !== undefined && PERMANENT_CODES.has(code))) return undefined;
    if (f.transient === true) return code !== undefined ? (TRANSIENT_CODES.get(code) ?? firstLine(f.message)) : firstLine(f.message);
    if (code !== undefined && TRANSIENT_CODES.has(code)) return TRANSIENT_CODES.get(code);
    // A named throttling or timeout reply wins over its status (S3's RequestTimeout comes as 400).
    for (const name of [f.name, f.Code, code]) if (typeof name === 'string' && TRANSIENT_NAMES.has(name)) return status !== undefined ? `${name} (HTTP ${status})` : name;
    if (status !== undefined && PERMANENT_STATUS.has(status)) return undefined;
    if (status !== undefined && TRANSIENT_STATUS.has(status)) return `HTTP ${status}`;
    if (f.$retryable !== undefined && f.$retryable !== null && f.$retryable !== false) return firstLine(f.message);
  }
  return undefined;
}

function firstLine(message: unknown): string {
  const text = typeof message === 'string' ? message : 'transient failure';
  return text.split('\n', 1)[0]!.slice(0, 200);
}

/**
 * What the wrapper does with each optional method, when the wrapped backend has it: `retry` (an
 * idempotent call, repeated like the required ones) or `pass` (handed on as it is: local-only,
 * bookkeeping, or calls that must not be repeated). Keyed by every optional method of Backend, so
 * a method added to the contract does not compile here until someone decides: a wrapper that
 * silently dropped it would hide the feature from everything above it.
 */
const OPTIONAL: { [K in OptionalMethod]: 'retry' | 'pass' } = {
  listTemporary: 'retry',
  removeTemporary: 'retry',
  // A staged file's appends are not repeated: only local backends stage, and they are not wrapped.
  stage: 'pass',
  localPath: 'pass',
  close: 'pass',
  // The server's clock as its last reply showed it: nothing to retry.
  clockOffsetMs: 'pass',
  assertDeletes: 'retry',
  // Object Lock (S3): reads, and idempotent writes (retention set again, markers removed again).
  retention: 'retry',
  retainedUntil: 'retry',
  extendRetention: 'retry',
  listHidden: 'retry',
  undelete: 'retry',
  // No request is made; a caller whose signing failed loads through `load` (retried there).
  signedLoad: 'pass',
};

/** Wraps `inner` so that each call is retried on transient failures (see the module comment). */
export class RetryBackend implements Backend {
  // Present exactly when the wrapped backend has them (set in the constructor, from OPTIONAL).
  declare readonly stage?: NonNullable<Backend['stage']>;
  declare readonly localPath?: NonNullable<Backend['localPath']>;
  declare readonly listTemporary?: NonNullable<Backend['listTemporary']>;
  declare readonly removeTemporary?: NonNullable<Backend['removeTemporary']>;
  declare readonly close?: NonNullable<Backend['close']>;
  declare readonly clockOffsetMs?: NonNullable<Backend['clockOffsetMs']>;
  declare readonly assertDeletes?: NonNullable<Backend['assertDeletes']>;
  declare readonly retention?: NonNullable<Backend['retention']>;
  declare readonly retainedUntil?: NonNullable<Backend['retainedUntil']>;
  declare readonly extendRetention?: NonNullable<Backend['extendRetention']>;
  declare readonly listHidden?: NonNullable<Backend['listHidden']>;
  declare readonly undelete?: NonNullable<Backend['undelete']>;
  declare readonly signedLoad?: NonNullable<Backend['signedLoad']>;
  private readonly attempts: number;
  private readonly maxElapsedMs: number;
  private readonly initialDelayMs: number;
  private readonly maxDelayMs: number;
  private readonly clock: Clock;
  private readonly random: () => number;

  constructor(
    readonly inner: Backend,
    private readonly options: RetryOptions = {},
  ) {
    this.attempts = Math.max(1, options.attempts ?? 10);
    this.maxElapsedMs = options.maxElapsedMs ?? 15 * 60_000;
    this.initialDelayMs = options.initialDelayMs ?? 500;
    this.maxDelayMs = options.maxDelayMs ?? 60_000;
    this.clock = options.clock ?? systemClock;
    this.random = options.random ?? Math.random;
    adoptOptional(this, inner, Object.keys(OPTIONAL) as OptionalMethod[], (method, call) =>
      OPTIONAL[method] === 'pass' ? call : (...args: unknown[]) => this.retry(describeCall(method, args), () => call(...args) as Promise<unknown>),
    );
  }

  get location(): string {
    return this.inner.location;
  }

  exists(): Promise<boolean> {
    return this.retry('check for a repository', () => this.inner.exists());
  }

  create(): Promise<void> {
    return this.retry('create', () => this.inner.create());
  }

  // Arguments are handed on whole, so a parameter the contract gains reaches the backend.
  save(...args: Parameters<Backend['save']>): Promise<void> {
    return this.retry(`save of ${label(args[0], args[1])}`, () => this.inner.save(...args));
  }

  load(...args: Parameters<Backend['load']>): Promise<Buffer> {
    const [kind, name, range] = args;
    return this.retry(`load of ${label(kind, name)}`, async () => {
      const data = await this.inner.load(...args);
      if (range && data.length < range.length) {
        // Shorter than asked: the end of the file, or a transfer cut short? The size tells.
        const size = await this.inner.stat(kind, name);
        const expected = size === undefined ? data.length : Math.max(0, Math.min(range.length, size - range.offset));
        if (data.length < expected) throw new ShortReadError(`short read of ${label(kind, name)}: ${data.length} of ${expected} bytes at offset ${range.offset}`);
      }
      return data;
    });
  }

  list(...args: Parameters<Backend['list']>): Promise<FileInfo[]> {
    return this.retry(`list of ${args[0]}/`, () => this.inner.list(...args));
  }

  stat(...args: Parameters<Backend['stat']>): Promise<number | undefined> {
    return this.retry(`stat of ${label(args[0], args[1])}`, () => this.inner.stat(...args));
  }

  remove(...args: Parameters<Backend['remove']>): Promise<void> {
    return this.retry(`remove of ${label(args[0], args[1])}`, () => this.inner.remove(...args));
  }

  /**
   * Runs `call` until it succeeds, fails for a reason a repeat cannot fix, or the attempts or
   * the time are used up; then throws the last error unchanged (its code still tells the CLI
   * what happened).
   */
  private async retry<T>(operation: string, call: () => Promise<T>): Promise<T> {
    const started = this.clock.now();
    for (let attempt = 1; ; attempt++) {
      try {
        return await call();
      } catch (error) {
        const reason = transientReason(error);
        if (reason === undefined || attempt >= this.attempts || this.options.signal?.aborted) throw error;
        const backoff = Math.min(this.maxDelayMs, this.initialDelayMs * 2 ** (attempt - 1));
        // Jitter: between half and one and a half times the backoff, so that many writers that
        // failed together (a server restart) do not come back together.
        const delayMs = Math.round(Math.min(this.maxDelayMs, backoff * (0.5 + this.random())));
        if (this.clock.now() - started + delayMs > this.maxElapsedMs) throw error;
        const message = `retrying ${operation} (attempt ${attempt + 1}/${this.attempts}): ${reason}`;
        this.options.onRetry?.({ operation, attempt: attempt + 1, attempts: this.attempts, delayMs, reason, error, message });
        await this.clock.sleep(delayMs, this.options.signal);
      }
    }
  }
}

/** What an optional method's retry message calls the call. */
function describeCall(method: string, args: unknown[]): string {
  if (method === 'listTemporary') return 'list of temporary files';
  const file = args[0] as TemporaryFile | undefined;
  if (method === 'removeTemporary' && file) return `remove of temporary ${file.kind}/${file.name}`;
  return method;
}

/** "data/ab12cd34…": enough of a name to tell files apart in a message. */
function label(kind: FileKind, name: string): string {
  return kind === 'config' ? 'config' : `${kind}/${name.length > 12 ? `${name.slice(0, 8)}…` : name}`;
}
