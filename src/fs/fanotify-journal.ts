/**
 * The change journal on Linux (issue 10), on fanotify: native/fanotify.c marks each filesystem that
 * holds a volume once (FAN_MARK_FILESYSTEM) and reports changes as (folder handle, name), so no
 * folder needs its own watch and a folder created during phase 1 is covered from its first entry
 * (inotify needs a watch per folder and misses what happens in a new folder before its watch is
 * added). A native thread drains the queue continuously and keeps distinct (folder, name) pairs
 * only; this module turns them into the contract of change-journal.ts, one result per volume.
 *
 * What it cannot see, and so must be walked in full by the final pass:
 * - Writes through shared memory maps (MAP_SHARED + PROT_WRITE): neither fanotify nor inotify
 *   reports them. Checked per CVAT volume, in upstream code (2024-10 snapshots):
 *
 *   | volume          | program           | writes its files through shared maps?                |
 *   |-----------------|-------------------|------------------------------------------------------|
 *   | cvat_db         | PostgreSQL        | no by default: relation files and WAL by pwrite; the |
 *   |                 |                   | main shared memory is anonymous; dynamic shared      |
 *   |                 |                   | memory is POSIX shm (/dev/shm). Only with            |
 *   |                 |                   | dynamic_shared_memory_type=mmap (dsm_impl_mmap:      |
 *   |                 |                   | pg_dynshmem/ mapped PROT_WRITE, MAP_SHARED): scratch |
 *   |                 |                   | segments PostgreSQL discards at restart              |
 *   | cvat_inmem_db   | Redis             | no: RDB and AOF by write(); its only file mapping    |
 *   |                 |                   | (util.c, a test) is PROT_READ                        |
 *   | cvat_cache_db   | kvrocks (RocksDB) | no: kvrocks never sets allow_mmap_writes (RocksDB    |
 *   |                 |                   | default false) and has no setting for it             |
 *   | cvat_events_db  | ClickHouse        | no: parts by write(); MMappedFileDescriptor maps     |
 *   |                 |                   | PROT_READ, MAP_PRIVATE (reads only)                  |
 *   | cvat_data, keys | CVAT (Python)     | no                                                   |
 *
 *   So no volume needs the full walk for this reason with CVAT's defaults; a deployment that sets
 *   dynamic_shared_memory_type=mmap (or runs other images) would. The database volumes hold few
 *   files, so walking them fully anyway is cheap insurance: the routing lives in
 *   src/deployment/cvat.ts.
 * - This process's own writes (its repository may sit on the same filesystem): dropped by pid on
 *   purpose. A backup must never write into the volumes it journals.
 * - Another filesystem mounted inside a volume (the mark covers the volume root's filesystem): such
 *   a volume is not journaled (its reason says so).
 * - The other names of a hard-linked file: a write or chmod through one name is reported under that
 *   name only, and link()/unlink() change the link count of the other names silently.
 */
import { readFile, realpath } from 'node:fs/promises';
import type { ChangeJournal, JournalResult, VolumeChanges } from './change-journal.js';
import { nativeHelper, nativeUnavailableReason } from './native.js';

/** What native/fanotify.c exports. */
interface NativeFanotify {
  fanotifyStart(
    roots: Buffer[],
    options: { maxEntries: number; unlimitedQueue: boolean; reader: boolean },
  ): { journal: object; errors: ({ code: string; message: string } | null)[] };
  fanotifyCollect(journal: object): Promise<NativeCollect>;
  fanotifyClose(journal: object): void;
}

/** One changed folder, as read from collect()'s buffer. */
interface ChangedFolder {
  /** Its path relative to its volume's root ('' = the root). */
  rel: string;
  /** Changed names, each NUL-terminated, back to back. */
  names: Buffer;
  /** The subset of `names` under which a folder was created or moved in. */
  newFolders: Buffer;
  /** The folder's own metadata changed (chmod, chown, utimes, xattr on it). */
  self: boolean;
  /** Entries were created, deleted or renamed in it (so its own mtime and ctime changed). */
  listing: boolean;
}

interface NativeCollect extends JournalCounters {
  overflow: string;
  /** Per folder (little-endian): u32 root index, u32 + relative path, u32 + names, u32 + new folders, u8 flags. */
  folders: Buffer;
}

/** What the last collect() saw (for benchmarks and the report). */
export interface JournalCounters {
  /** Events read from the kernel, in all. */
  readonly events: number;
  /** Of them, made by this process (dropped). */
  readonly ownEvents: number;
  /** Of them, in folders outside every volume (dropped). */
  readonly outsideEvents: number;
  /** Folder handles resolved to paths (first sight, then once per folder per collect). */
  readonly resolutions: number;
  /** Changed folders collected (inside the volumes, still there). */
  readonly folderCount: number;
  /** Distinct changed folders + names held. */
  readonly entries: number;
  /** Heap the native sets hold, in bytes. */
  readonly bytes: number;
  /** Time collect() spent reading the queue up to now, and mapping folders to paths. */
  readonly drainMs: number;
  readonly resolveMs: number;
  /** Linux thread id of the native reader (its CPU time: /proc/self/task/TID/stat). */
  readonly readerTid: number;
}

export interface FanotifyJournalOptions {
  /**
   * Distinct changed folders + names kept before the journal gives up (every volume then falls back
   * to a full walk). Measured: 38 bytes each in the native sets with short names, and about 180
   * bytes each once collect() has made them strings and sets; the default keeps both near 110 MiB
   * at worst (a phase 1 that changes half a million files is rare: its final pass reads them all).
   */
  readonly maxEntries?: number;
  /**
   * Tests only: the kernel's bounded queue (fs.fanotify.max_queued_events) and no reader thread,
   * so that the queue overflows as it would if the reader fell behind.
   */
  readonly boundedQueueWithoutReader?: boolean;
}

export const DEFAULT_MAX_ENTRIES = 500_000;

export type JournalStart = { ok: true; journal: FanotifyJournal } | { ok: false; reason: string };

function native(): NativeFanotify | undefined {
  const helper = nativeHelper();
  return helper && typeof helper['fanotifyStart'] === 'function' ? (helper as unknown as NativeFanotify) : undefined;
}

function startFailure(code: string, message: string): string {
  switch (code) {
    case 'EPERM':
      return 'fanotify needs root (CAP_SYS_ADMIN)';
    case 'EINVAL':
      return 'the kernel has no fanotify name reporting (Linux 5.9 or later needed)';
    case 'ENOSYS':
      return 'the kernel has no fanotify';
    case 'EMFILE':
      return `too many fanotify groups (fs.fanotify.max_user_groups): ${message}`;
    default:
      return `fanotify: ${message}`;
  }
}

function markFailure(code: string, message: string): string {
  if (code === 'ENODEV' || code === 'EOPNOTSUPP' || code === 'EXDEV' || code === 'ENOTSUP')
    return `its filesystem cannot report file handles to fanotify (${code})`;
  return message;
}

/**
 * Starts journaling the volumes at `volumeRoots` (their mount points; result keys are these strings
 * as given). Call it before phase 1 starts; it returns once the kernel is recording. A volume whose
 * filesystem cannot be watched gets `{ ok: false, reason }` from collect() (and in `unwatched`);
 * when none can, or fanotify itself is missing, this returns `{ ok: false, reason }`.
 */
export async function startFanotifyJournal(volumeRoots: readonly string[], options: FanotifyJournalOptions = {}): Promise<JournalStart> {
  const api = native();
  if (!api) {
    const why = nativeUnavailableReason();
    return { ok: false, reason: `no change journal: the native helper ${why ? `is ${why}` : 'has no fanotify support (rebuild it: sh scripts/build-native.sh)'}` };
  }
  const unwatched = new Map<string, string>();
  const watched: { root: string; real: Buffer }[] = [];
  const mounts = await mountPoints();
  for (const root of volumeRoots) {
    try {
      const real = await realpath(root, { encoding: 'buffer' });
      const inside = real.toString('latin1').replace(/\/?$/, '/');
      const nested = mounts.find((m) => m.startsWith(inside));
      if (nested) unwatched.set(root, `another filesystem is mounted inside it (${Buffer.from(nested, 'latin1').toString()})`);
      else watched.push({ root, real });
    } catch (error) {
      unwatched.set(root, (error as Error).message);
    }
  }
  let started: ReturnType<NativeFanotify['fanotifyStart']>;
  try {
    started = api.fanotifyStart(
      watched.map((w) => w.real),
      {
        maxEntries: options.maxEntries ?? DEFAULT_MAX_ENTRIES,
        unlimitedQueue: !options.boundedQueueWithoutReader,
        reader: !options.boundedQueueWithoutReader,
      },
    );
  } catch (error) {
    const e = error as NodeJS.ErrnoException;
    return { ok: false, reason: `no change journal: ${startFailure(e.code ?? '', e.message)}` };
  }
  // Indexed as passed to fanotifyStart (collect() names a folder's volume by that index).
  const roots: (string | undefined)[] = watched.map((w, i) => {
    const error = started.errors[i];
    if (!error) return w.root;
    unwatched.set(w.root, markFailure(error.code, error.message));
    return undefined;
  });
  if (roots.every((root) => root === undefined)) {
    api.fanotifyClose(started.journal);
    const reasons = [...new Set(unwatched.values())].join('; ');
    return { ok: false, reason: `no change journal: ${reasons || 'no volumes'}` };
  }
  return { ok: true, journal: new FanotifyJournal(api, started.journal, roots, unwatched) };
}

/** This process's mount points (latin1 strings: one char per byte), from /proc/self/mountinfo. */
async function mountPoints(): Promise<string[]> {
  const text = (await readFile('/proc/self/mountinfo')).toString('latin1');
  // "36 35 98:0 /mnt1 /mnt/point opts ...": the fifth field, with space, tab, newline and backslash as \ooo.
  return text
    .split('\n')
    .map((line) => line.split(' ')[4])
    .filter((field): field is string => field !== undefined)
    .map((field) => field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8))));
}

export class FanotifyJournal implements ChangeJournal {
  #closed = false;
  #pending: Promise<unknown> = Promise.resolve();
  #counters: JournalCounters | undefined;

  constructor(
    private readonly api: NativeFanotify,
    private readonly handle: object,
    /** The watched volumes, by the index the native side uses (undefined: not watched). */
    private readonly roots: readonly (string | undefined)[],
    /** Volumes that are not journaled, and why (collect() reports them as not ok). */
    readonly unwatched: ReadonlyMap<string, string>,
  ) {}

  /** The counters of the last collect(), if any. */
  get counters(): JournalCounters | undefined {
    return this.#counters;
  }

  collect(): Promise<Map<string, JournalResult>> {
    if (this.#closed) return Promise.reject(new Error('the change journal is closed'));
    const run = this.#pending.then(async () => {
      const raw = await this.api.fanotifyCollect(this.handle);
      this.#counters = raw;
      return this.#results(raw);
    });
    this.#pending = run.catch(() => undefined);
    return run;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    // Never close under a running collect: its worker thread holds the journal's lock.
    await this.#pending;
    this.api.fanotifyClose(this.handle);
  }

  #results(raw: NativeCollect): Map<string, JournalResult> {
    const results = new Map<string, JournalResult>();
    for (const [root, reason] of this.unwatched) results.set(root, { ok: false, reason });
    const watched = this.roots.filter((root): root is string => root !== undefined);
    if (raw.overflow) {
      for (const root of watched) results.set(root, { ok: false, reason: `the change journal overflowed: ${raw.overflow}` });
      return results;
    }
    const perRoot = new Map<string, ChangedFolder[]>(watched.map((root) => [root, []]));
    const b = raw.folders;
    for (let o = 0; o < b.length; ) {
      const index = b.readUInt32LE(o);
      const relLength = b.readUInt32LE(o + 4);
      const rel = b.toString('latin1', o + 8, o + 8 + relLength);
      o += 8 + relLength;
      const namesLength = b.readUInt32LE(o);
      const names = b.subarray(o + 4, o + 4 + namesLength);
      o += 4 + namesLength;
      const newLength = b.readUInt32LE(o);
      const newFolders = b.subarray(o + 4, o + 4 + newLength);
      o += 4 + newLength;
      const flags = b[o++] ?? 0;
      const root = this.roots[index];
      if (root !== undefined) perRoot.get(root)?.push({ rel, names, newFolders, self: (flags & 1) !== 0, listing: (flags & 2) !== 0 });
    }
    for (const [root, folders] of perRoot) results.set(root, { ok: true, changes: volumeChanges(folders) });
    return results;
  }
}

function splitNames(buffer: Buffer): string[] {
  const names: string[] = [];
  let start = 0;
  for (let i = buffer.indexOf(0, start); i !== -1; i = buffer.indexOf(0, start)) {
    names.push(buffer.toString('latin1', start, i));
    start = i + 1;
  }
  return names;
}

function join(folder: string, name: string): string {
  return folder === '' ? name : `${folder}/${name}`;
}

/**
 * The contract's view of one volume's changed folders:
 * - every changed name under its folder;
 * - a folder created or moved in: 'all' (its contents were never seen at that path);
 * - a folder whose own metadata changed, or whose entries changed (so did its mtime/ctime): its
 *   name under its parent. The root has no parent here: the archiver stats it on every pass.
 */
function volumeChanges(folders: readonly ChangedFolder[]): VolumeChanges {
  const whole = new Set<string>();
  const named = new Map<string, Set<string>>();
  const add = (folder: string, name: string): void => {
    let names = named.get(folder);
    if (!names) named.set(folder, (names = new Set()));
    names.add(name);
  };
  for (const folder of folders) {
    const rel = folder.rel;
    for (const name of splitNames(folder.newFolders)) whole.add(join(rel, name));
    for (const name of splitNames(folder.names)) add(rel, name);
    if ((folder.self || folder.listing) && rel !== '') {
      const slash = rel.lastIndexOf('/');
      add(slash === -1 ? '' : rel.slice(0, slash), rel.slice(slash + 1));
    }
  }
  const result = new Map<string, ReadonlySet<string> | 'all'>();
  for (const [folder, names] of named) result.set(folder, whole.has(folder) ? 'all' : names);
  for (const folder of whole) result.set(folder, 'all');
  return { folders: result };
}
