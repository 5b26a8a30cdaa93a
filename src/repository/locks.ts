/**
 * Repository locks (format: docs/repository-format.md, "Locks"). restic's rules, kept as the floor:
 *
 * - Modes. Operations that only add data or only read (backup, import, check, restore, export, copy)
 *   take a shared lock and run side by side; operations that delete (forget, prune, repair index)
 *   take the exclusive one, which needs the repository to themselves.
 * - Taking a lock: write our lock file, then list the locks. A conflicting lock that is not stale
 *   makes us remove ours and refuse (LockedError) or, with a wait time, retry with growing pauses.
 *   Two takers that race both see each other's file: at least one backs off, never both go on.
 * - Stale: a lock whose host is this host and whose process is gone, or that was not refreshed for
 *   30 minutes. Stale locks are removed by whoever meets them. The 30 minutes are measured on the
 *   storage's clock (lock files' modification times against that of the file we just wrote), so
 *   a host whose clock runs ahead cannot take a live lock for stale; only where the storage tells
 *   no times do the lock's own time and this host's clock decide.
 * - Refresh: every 5 minutes a held lock writes a new lock file, then removes the old one — after
 *   checking that the old one is still there. A lock whose file vanished (someone judged it stale,
 *   or removed it by hand) or that could not be refreshed for about 22 minutes (a margin before
 *   others may call it stale) is lost: `assertHeld` throws LockLostError and the lock's `signal`
 *   aborts, so the holder stops before it writes an index or a snapshot (the repository calls
 *   `assertHeld` right before each).
 *
 * Locks protect running operations from each other; they cannot protect a holder that was frozen
 * for half an hour and taken for gone, nor storage without modification times from skewed
 * clocks. Prune's grace period covers those cases for the data a writer may still need (prune.ts).
 */
import { randomBytes } from 'node:crypto';
import { hostname as systemHostname, userInfo } from 'node:os';
import type { Backend, FileInfo } from '../backend/backend.js';
import { systemClock, type Clock } from '../clock.js';
import { LockLostError, LockedError } from '../errors.js';
import { processAlive as systemProcessAlive } from '../host.js';
import { inOrder } from './in-order.js';

export type LockOperation = 'backup' | 'import' | 'check' | 'restore' | 'export' | 'copy' | 'forget' | 'prune' | 'repair-index';

const EXCLUSIVE: ReadonlySet<LockOperation> = new Set(['forget', 'prune', 'repair-index']);

/** Whether an operation needs the exclusive lock (it deletes) or shares (it adds or reads). */
export function isExclusive(operation: LockOperation): boolean {
  return EXCLUSIVE.has(operation);
}

/** The content of a lock file (plaintext JSON: other hosts must read it without the key). */
export interface LockFileContent {
  version: 1;
  exclusive: boolean;
  operation: string;
  hostname: string;
  pid: number;
  username?: string;
  /** When the lock was taken. */
  created: string;
  /** When this file was written (taken or last refreshed): staleness counts from here. */
  time: string;
}

export const DEFAULT_REFRESH_INTERVAL_MS = 5 * 60_000;
export const DEFAULT_STALE_AFTER_MS = 30 * 60_000;
/** First pause of a lock wait; it doubles up to the maximum, with ±25 % jitter. */
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 30_000;
/** Lock files loaded at once (listLocks). */
const LOCK_LOADS = 8;

export interface LockOptions {
  clock?: Clock;
  /** This host's name (default: the system's). */
  hostname?: string;
  /** This process (default: process.pid). */
  pid?: number;
  /** Whether a process of this host exists (default: signal 0). */
  processAlive?: (pid: number) => boolean;
  refreshIntervalMs?: number;
  staleAfterMs?: number;
  /** Keep trying this long when the repository is locked (--retry-lock); 0: refuse at once. */
  retryForMs?: number;
  /** Told once when a wait begins, with the lock in the way and how long the wait may last. */
  onWait?: (holder: LockHolder, waitMs: number) => void;
  /** Stops a wait (Ctrl-C). */
  signal?: AbortSignal;
}

/** A lock file as another process sees it. */
export interface LockHolder extends Partial<LockFileContent> {
  name: string;
  exclusive: boolean;
  /** Why it counts as stale, if it does. */
  stale?: string;
  /** The file could not be read as a lock. */
  unreadable?: boolean;
}

interface Settings {
  clock: Clock;
  hostname: string;
  pid: number;
  processAlive: (pid: number) => boolean;
  refreshIntervalMs: number;
  staleAfterMs: number;
}

/**
 * The clock locks read: the storage's where the backend knows how far it is from ours (a REST
 * server's Date replies: its listings carry no modification times), so lock times written and
 * judged by hosts with skewed clocks are all on one clock; else `clock` as it is.
 */
function storageClock(backend: Backend, clock: Clock): Clock {
  if (!backend.clockOffsetMs) return clock;
  return {
    now: () => clock.now() + (backend.clockOffsetMs?.() ?? 0),
    sleep: (ms, signal) => clock.sleep(ms, signal),
    schedule: (ms, task) => clock.schedule(ms, task),
  };
}

function settings(options: LockOptions, backend: Backend): Settings {
  return {
    clock: storageClock(backend, options.clock ?? systemClock),
    hostname: options.hostname ?? systemHostname(),
    pid: options.pid ?? process.pid,
    processAlive: options.processAlive ?? systemProcessAlive,
    refreshIntervalMs: options.refreshIntervalMs ?? DEFAULT_REFRESH_INTERVAL_MS,
    staleAfterMs: options.staleAfterMs ?? DEFAULT_STALE_AFTER_MS,
  };
}

/** What a caller of `listLocks` already has. */
export interface KnownLocks {
  /** The listing to judge (default: a new one). */
  listing?: FileInfo[];
  /** The storage's time now (see below). */
  storageNow?: number | undefined;
  /** The caller's own lock file, whose content it knows: left out. */
  except?: string;
  /**
   * Lock files loaded already (by name). A lock file is never rewritten (a refresh writes a new
   * one), so its bytes stay valid as long as the listing shows it; a load that failed or gave no
   * lock is made again.
   */
  loaded?: ReadonlyMap<string, Promise<Buffer>>;
}

/**
 * Every lock file of the repository, read and judged (stale or not) by the rules above, loaded
 * LOCK_LOADS at a time (a remote store answers them in one round trip together). Files that
 * vanish while listed are left out, and so is `known.except`. Any number of calls; removes nothing.
 *
 * Ages are measured on the storage's clock when it has one: a lock file's modification time
 * against `known.storageNow` (the modification time of a file the caller just wrote). A client
 * whose clock is far off then cannot take a live lock for stale. Without storage times, the
 * lock's own time is compared with this host's clock.
 */
export async function listLocks(backend: Backend, options: LockOptions = {}, known: KnownLocks = {}): Promise<LockHolder[]> {
  const s = settings(options, backend);
  const { storageNow } = known;
  const out: LockHolder[] = [];
  const files = (known.listing ?? (await backend.list('locks'))).filter((f) => f.name !== known.except);
  const load = async (name: string): Promise<Buffer> => {
    const early = await known.loaded?.get(name)?.catch(() => undefined);
    return early !== undefined && parseLock(early) !== undefined ? early : backend.load('locks', name);
  };
  await inOrder(
    files,
    LOCK_LOADS,
    (file) => load(file.name),
    async (loaded, file) => {
      let bytes: Buffer;
      try {
        bytes = await loaded;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') return; // released meanwhile
        throw error;
      }
      const byStorage = storageNow !== undefined && file.modifiedMs !== undefined ? storageNow - file.modifiedMs : undefined;
      const content = parseLock(bytes);
      if (!content) {
        // Half-written by a store without atomic uploads, or damaged: it may be a real holder's, so
        // it counts as an exclusive lock until it is as old as a stale one.
        const age = byStorage ?? (file.modifiedMs === undefined ? 0 : s.clock.now() - file.modifiedMs);
        out.push({ name: file.name, exclusive: true, unreadable: true, ...(age > s.staleAfterMs ? { stale: 'unreadable and old' } : {}) });
        return;
      }
      const stale = staleness(content, byStorage ?? s.clock.now() - Date.parse(content.time), s);
      out.push({ ...content, name: file.name, ...(stale ? { stale } : {}) });
    },
  );
  return out;
}

function parseLock(bytes: Buffer): LockFileContent | undefined {
  try {
    const value = JSON.parse(bytes.toString('utf8')) as Partial<LockFileContent>;
    if (typeof value !== 'object' || value === null) return undefined;
    if (typeof value.exclusive !== 'boolean' || typeof value.pid !== 'number' || typeof value.hostname !== 'string' || typeof value.time !== 'string') return undefined;
    if (Number.isNaN(Date.parse(value.time))) return undefined;
    return { version: 1, operation: '?', created: value.time, ...value } as LockFileContent;
  } catch {
    return undefined;
  }
}

function staleness(lock: LockFileContent, ageMs: number, s: Settings): string | undefined {
  if (lock.hostname === s.hostname && lock.pid !== s.pid && !s.processAlive(lock.pid)) return `process ${lock.pid} is gone`;
  if (ageMs > s.staleAfterMs) return `not refreshed for ${Math.round(ageMs / 60_000)} min`;
  return undefined;
}

function conflicts(exclusive: boolean, other: LockHolder): boolean {
  return exclusive || other.exclusive;
}

/** "prune (pid 123 on host-a since 2026-…)" */
export function describeHolder(holder: LockHolder): string {
  if (holder.unreadable) return `an unreadable lock file (locks/${holder.name})`;
  return `${holder.operation ?? '?'} (${holder.exclusive ? 'exclusive' : 'shared'}, pid ${holder.pid ?? '?'} on ${holder.hostname ?? '?'} since ${holder.created ?? holder.time ?? '?'})`;
}

/**
 * The first lock (other than ours) that conflicts with a lock of this mode and is not stale.
 * Stale locks met on the way are removed; one that cannot be removed counts as a conflict (a
 * lock we cannot remove is not ours to ignore).
 */
async function findConflict(backend: Backend, exclusive: boolean, options: LockOptions, known: KnownLocks): Promise<LockHolder | undefined> {
  for (const holder of await listLocks(backend, options, known)) {
    if (holder.stale) {
      const removed = await backend.remove('locks', holder.name).then(
        () => true,
        () => false,
      );
      if (removed) continue;
    }
    if (conflicts(exclusive, holder)) return holder;
  }
  return undefined;
}

/**
 * Takes a lock for `operation`: writes our lock file, lists the locks, and keeps it only if no
 * conflicting live lock is there (two takers that race both see each other's file: at least one
 * backs off, never both go on). Refuses with LockedError when a conflicting lock is held and
 * `retryForMs` is 0; otherwise retries with growing pauses until it is free or the time is up
 * (then LockedError, exit 10). Storage errors are passed on as they came.
 */
export async function acquireLock(backend: Backend, operation: LockOperation, options: LockOptions = {}): Promise<RepositoryLock> {
  const s = settings(options, backend);
  const exclusive = isExclusive(operation);
  const retryFor = options.retryForMs ?? 0;
  const deadline = s.clock.now() + retryFor;
  let pause = RETRY_FIRST_MS;
  let told = false;
  for (;;) {
    options.signal?.throwIfAborted();
    const now = s.clock.now();
    const content: LockFileContent = {
      version: 1,
      exclusive,
      operation,
      hostname: s.hostname,
      pid: s.pid,
      ...username(),
      created: new Date(now).toISOString(),
      time: new Date(now).toISOString(),
    };
    const name = randomBytes(32).toString('hex');
    // The locks already there are read while ours is written: what decides is the listing made
    // after that write, but the files it shows were mostly there before, and a lock file never
    // changes, so only the ones new to it are loaded after it (one round trip less).
    const early = loadEarly(backend);
    await backend.save('locks', name, Buffer.from(JSON.stringify(content)));
    let holder: LockHolder | undefined;
    let storageNow: number | undefined;
    try {
      const listing = await backend.list('locks');
      storageNow = listing.find((f) => f.name === name)?.modifiedMs;
      holder = await findConflict(backend, exclusive, options, { listing, storageNow, except: name, loaded: await early });
    } catch (error) {
      await backend.remove('locks', name).catch(() => undefined);
      throw error;
    }
    if (!holder) return new RepositoryLock(backend, name, content, now, storageNow, s);
    await backend.remove('locks', name);
    const left = deadline - s.clock.now();
    if (left <= 0) {
      const waited = retryFor > 0 ? ` (waited ${formatWait(retryFor)})` : '; wait for it (--retry-lock 30m waits)';
      throw new LockedError(
        `repository ${backend.location} is locked by ${describeHolder(holder)}${waited}; if that process is gone, its lock turns stale ${
          holder.hostname === s.hostname ? 'now' : `${s.staleAfterMs / 60_000} min after its last refresh`
        }, or remove ${backend.location}/locks/${holder.name}`,
      );
    }
    if (!told) {
      options.onWait?.(holder, left);
      told = true;
    }
    const jitter = 0.75 + Math.random() * 0.5;
    await s.clock.sleep(Math.min(left, pause * jitter), options.signal);
    pause = Math.min(pause * 2, RETRY_MAX_MS);
  }
}

/**
 * Lists the locks and starts loading them (at most LOCK_LOADS); never fails (a failure only means
 * `listLocks` loads them itself).
 */
async function loadEarly(backend: Backend): Promise<Map<string, Promise<Buffer>>> {
  const loads = new Map<string, Promise<Buffer>>();
  const files = await backend.list('locks').catch(() => []);
  for (const { name } of files.slice(0, LOCK_LOADS)) {
    const load = backend.load('locks', name);
    load.catch(() => undefined); // listLocks loads it again
    loads.set(name, load);
  }
  return loads;
}

function username(): { username?: string } {
  try {
    return { username: userInfo().username };
  } catch {
    return {};
  }
}

function formatWait(ms: number): string {
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0) return `${ms / 60_000}m`;
  return `${Math.round(ms / 1000)}s`;
}

/**
 * A held lock. Refreshes itself every `refreshIntervalMs` in the background (without keeping the
 * process alive) until released or lost.
 */
export class RepositoryLock {
  readonly exclusive: boolean;
  readonly operation: string;
  private lost: LockLostError | undefined;
  private released = false;
  private cancelRefresh: (() => void) | undefined;
  /** Refreshes, checks and release run one at a time (each reads and may change `name`). */
  private queue: Promise<unknown> = Promise.resolve();
  private readonly controller = new AbortController();

  /** The storage's time at a moment of ours (from our lock file's modification time), if it tells. */
  private anchor: { storageMs: number; localMs: number } | undefined;

  constructor(
    private readonly backend: Backend,
    private name: string,
    private readonly content: LockFileContent,
    private lastRefreshMs: number,
    storageMs: number | undefined,
    private readonly s: Settings,
  ) {
    this.exclusive = content.exclusive;
    this.operation = content.operation;
    this.anchor = storageMs === undefined ? undefined : { storageMs, localMs: lastRefreshMs };
    this.scheduleRefresh();
  }

  /**
   * Now on the storage's clock (estimated from our lock file's modification time and the time
   * elapsed here since); this host's clock where the storage tells no times. Prune measures the
   * ages of files with it, so a prune on a host whose clock runs ahead deletes nothing early.
   */
  storageNow(): number {
    return this.anchor ? this.anchor.storageMs + (this.s.clock.now() - this.anchor.localMs) : this.s.clock.now();
  }

  /** Aborts (with the LockLostError as its reason) when the lock is lost. */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** The current lock file's name (it changes with every refresh). */
  get fileName(): string {
    return this.name;
  }

  /**
   * After this long without a successful refresh, the lock counts as lost to its holder: a bit
   * before others may call it stale, so a small clock difference between hosts does not matter.
   */
  private get refreshDeadlineMs(): number {
    return Math.max(this.s.staleAfterMs / 2, this.s.staleAfterMs - (this.s.refreshIntervalMs * 3) / 2);
  }

  private serialized<T>(work: () => Promise<T>): Promise<T> {
    const run = this.queue.then(work, work);
    this.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * The next refresh: after the interval, or — once a refresh failed — no later than just past the
   * refresh deadline, so a lock that cannot be refreshed is declared lost (and its signal aborts)
   * on time, not at the next regular refresh.
   */
  private scheduleRefresh(): void {
    const untilDeadline = this.lastRefreshMs + this.refreshDeadlineMs + 1 - this.s.clock.now();
    const delay = Math.max(1, Math.min(this.s.refreshIntervalMs, untilDeadline));
    this.cancelRefresh = this.s.clock.schedule(delay, async () => {
      this.cancelRefresh = undefined;
      if (this.released || this.lost) return;
      await this.refresh().catch(() => undefined); // a failure is counted; the deadline decides
      if (!this.released && !this.lost) this.scheduleRefresh();
    });
  }

  private lose(reason: string, cause?: unknown): LockLostError {
    if (!this.lost) {
      this.lost = new LockLostError(
        `the repository lock of this ${this.operation} ${reason}: stopped before writing an index or a snapshot (what is stored stays intact); run the ${this.operation} again`,
        cause === undefined ? {} : { cause },
      );
      this.cancelRefresh?.();
      this.controller.abort(this.lost);
    }
    return this.lost;
  }

  /**
   * Writes a new lock file with the current time, then removes the old one. Called by the timer;
   * callable any time (one at a time; serialized with `assertHeld`). Throws LockLostError when the
   * old file is gone (someone took it for stale or removed it), and the storage's error when the
   * write fails (the lock is then lost once the refresh deadline has passed).
   */
  refresh(): Promise<void> {
    return this.serialized(async () => {
      if (this.lost) throw this.lost;
      if (this.released) throw new LockLostError(`the repository lock of this ${this.operation} was released`);
      const now = this.s.clock.now();
      const expired = (): boolean => this.s.clock.now() - this.lastRefreshMs > this.refreshDeadlineMs;
      try {
        if ((await this.backend.stat('locks', this.name)) === undefined) throw this.lose('vanished (another process judged it stale, or it was removed by hand)');
        const fresh = randomBytes(32).toString('hex');
        await this.backend.save('locks', fresh, Buffer.from(JSON.stringify({ ...this.content, time: new Date(now).toISOString() })));
        const listing = await this.backend.list('locks');
        if (!listing.some((f) => f.name === this.name)) {
          await this.backend.remove('locks', fresh).catch(() => undefined);
          throw this.lose('vanished while it was refreshed');
        }
        const storageMs = listing.find((f) => f.name === fresh)?.modifiedMs;
        if (storageMs !== undefined) this.anchor = { storageMs, localMs: now };
        const old = this.name;
        this.name = fresh;
        this.lastRefreshMs = now;
        await this.backend.remove('locks', old).catch(() => undefined); // a leftover only delays others until it is stale
      } catch (error) {
        if (error instanceof LockLostError) throw error;
        if (expired()) throw this.lose(`could not be refreshed for ${Math.round((this.s.clock.now() - this.lastRefreshMs) / 60_000)} min`, error);
        throw error;
      }
    });
  }

  /**
   * Resolves if the lock is still held: not lost, refreshed recently enough (else refreshed now,
   * if its file is still there), and its file is in the repository. Throws LockLostError
   * otherwise; a storage error while checking is thrown as it came. Writers call it right before
   * writing an index file or a snapshot; cheap enough for that (one stat).
   */
  async assertHeld(): Promise<void> {
    if (this.lost) throw this.lost;
    if (this.released) throw new LockLostError(`the repository lock of this ${this.operation} was released before its last write`);
    if (this.s.clock.now() - this.lastRefreshMs > this.refreshDeadlineMs) {
      // Asleep (a suspended machine, a stopped process) past the refresh deadline: still ours only
      // if our file is still there — refresh checks that before and after writing the new one.
      await this.refresh().catch((error: unknown) => {
        throw error instanceof LockLostError ? error : this.lose('could not be refreshed in time', error);
      });
    }
    await this.serialized(async () => {
      if (this.lost) throw this.lost;
      if ((await this.backend.stat('locks', this.name)) === undefined) throw this.lose('vanished (another process judged it stale, or it was removed by hand)');
    });
  }

  /** Whether the lock is known to be lost (no storage access). */
  get isLost(): boolean {
    return this.lost !== undefined;
  }

  /** Removes the lock file and stops refreshing. Idempotent; a lost lock has nothing to remove. */
  release(): Promise<void> {
    if (this.released) return Promise.resolve();
    this.released = true;
    this.cancelRefresh?.();
    return this.serialized(async () => {
      if (!this.lost) await this.backend.remove('locks', this.name);
    });
  }
}

/**
 * For readers: an error met while the lock was lost (a prune that judged it stale may have
 * deleted what we were reading) is reported as the lost lock, not as damage. Returns the error
 * to throw; checks the lock file once.
 */
export async function blameLostLock(lock: RepositoryLock, error: unknown): Promise<unknown> {
  if (error instanceof LockLostError) return error;
  const lost = await lock.assertHeld().then(
    () => undefined,
    (e: unknown) => (e instanceof LockLostError ? e : undefined),
  );
  return lost === undefined ? error : new LockLostError(`${lost.message} (${(error as Error).message})`, { cause: error });
}
