/**
 * `prune`: removes data no snapshot needs, without ever removing what a snapshot — or a writer
 * that is still running, or was killed a moment ago — may need. Needs the exclusive lock.
 *
 * 1. Refuse on damage. Every snapshot must read (`listSnapshots`), every index file must open,
 *    and every blob a snapshot needs must be in the index, in a pack that is there: otherwise
 *    prune would take recoverable data for garbage. It says to run `check` / `repair index`.
 * 2. Mark. Walk every snapshot's trees: every tree and chunk reached is used. A blob stored twice
 *    (two backups at once, an interrupted prune) is used in one copy only: the one in the newest
 *    pack, so an interrupted repack is finished rather than undone.
 * 3. Plan (restic's rules). Packs the index names whose blobs are all unused are deleted. Packs
 *    with some unused blobs are repacked — their used blobs copied, still sealed and
 *    authenticated first, into new packs of their type — emptiest first, only while the unused
 *    bytes exceed `maxUnused` of the repository's bytes (default 5 %).
 * 4. Grace period (kopia's rule). Packs no index names were written by a writer that is still
 *    running (possibly without a valid lock: clocks can be skewed, a host can be frozen) or was
 *    killed: they are deleted only once older than the grace period (24 h), by the storage's
 *    modification time; where the backend has none, by when a prune first saw them (remembered
 *    in a sealed `state/` object). Index files that appear while prune runs are never touched,
 *    and their packs are kept. Temporary files of interrupted saves go after the grace period too.
 * 5. Order for crash safety: new packs → index files naming them → index files rewritten without
 *    the packs to delete → a last look (no new snapshot appeared, the lock is still ours) → old
 *    index files deleted → packs deleted. Each deletion is durable before the next (the backend
 *    fsyncs its folder). A crash at any point leaves every snapshot readable; the next prune
 *    finishes the job.
 */
import type { FileInfo, TemporaryFile } from '../backend/backend.js';
import { systemClock, type Clock } from '../clock.js';
import { assertRemovable } from './object-lock.js';
import { CorruptArchiveError, LockedError } from '../errors.js';
import type { BlobType } from './blob-index.js';
import type { PackHeaderEntry } from './packer.js';
import type { Repository } from './repository.js';
import { loadTree } from './restorer.js';
import { listSnapshots, shortId, type StoredSnapshot } from './snapshots.js';
import { isZeroChunk } from './tree.js';

export const DEFAULT_GRACE_MS = 24 * 3_600_000;
export const DEFAULT_MAX_UNUSED = 0.05;

export interface PruneOptions {
  /**
   * Repack while the unused bytes exceed this share (0–1) of the repository's bytes (restic's
   * --max-unused); 1 never repacks. Packs with no used blob are deleted whatever this says.
   */
  maxUnused?: number;
  /** Packs no index names and temporary files are kept until this old (default 24 h). */
  graceMs?: number;
  /** Plan only: nothing is written or deleted. */
  dryRun?: boolean;
  clock?: Clock;
  signal?: AbortSignal;
  onPhase?: (message: string) => void;
}

export interface PruneResult {
  dryRun: boolean;
  /** Blobs some snapshot uses. */
  blobsUsed: number;
  /** Pack files deleted (wholly unused, repacked, and unindexed past the grace period). */
  packsDeleted: number;
  packsRepacked: number;
  /** Packs no index names, deleted (older than the grace period) or kept (younger). */
  unindexedDeleted: number;
  unindexedKept: number;
  unindexedKeptBytes: number;
  temporaryDeleted: number;
  /** Index files replaced by ones that no longer name deleted packs. */
  indexFilesRewritten: number;
  /** Unused bytes (and their share of all pack bytes) before and after. */
  unusedBefore: number;
  unusedAfter: number;
  totalBefore: number;
  totalAfter: number;
  /** Sum of the sizes of the files deleted. */
  bytesDeleted: number;
  /** Bytes written: new packs and index files. */
  bytesWritten: number;
  /** What the repository really shrank by: deleted minus written. */
  bytesFreed: number;
}

interface PackPlan {
  id: string;
  /** Every blob the index files name in this pack (one entry per id and offset). */
  entries: PackHeaderEntry[];
  file: FileInfo | undefined;
  used: number;
  unused: number;
}

/** Where the one kept copy of a used blob is. */
interface Copy {
  pack: string;
  entry: PackHeaderEntry;
}

/**
 * The blobs the snapshots use, and the ones they need that the index does not have (or whose
 * tree cannot be read): prune refuses when there are any.
 */
export async function usedBlobs(
  repo: Repository,
  snapshots: StoredSnapshot[],
  signal?: AbortSignal,
): Promise<{ used: Map<string, BlobType>; problems: string[] }> {
  const used = new Map<string, BlobType>();
  const problems: string[] = [];
  const need = (id: string, type: BlobType, what: () => string): boolean => {
    if (used.has(id)) return false;
    used.set(id, type);
    if (repo.location(id)) return true;
    problems.push(`blob ${shortId(id)} (${what()}) is in no index`);
    return false;
  };
  for (const snapshot of snapshots) {
    const walk = async (treeId: string, where: string): Promise<void> => {
      signal?.throwIfAborted();
      if (!need(treeId, 'tree', () => `tree of ${where} in snapshot ${shortId(snapshot.id)}`)) return;
      let nodes;
      try {
        nodes = (await loadTree(repo, treeId)).nodes;
      } catch (error) {
        if (!(error instanceof CorruptArchiveError) && !(error instanceof SyntaxError)) throw error;
        problems.push(`tree ${shortId(treeId)} of ${where} in snapshot ${shortId(snapshot.id)} cannot be read (${error.message})`);
        return;
      }
      for (const node of nodes) {
        const path = `${where}/${Buffer.from(node.name, 'base64').toString('utf8')}`;
        if (node.subtree) await walk(node.subtree, path);
        for (const ref of node.content ?? []) if (!isZeroChunk(ref)) need(ref, 'data', () => `of ${path} in snapshot ${shortId(snapshot.id)}`);
      }
    };
    for (const v of snapshot.volumes) await walk(v.tree, v.composeName);
    for (const ref of snapshot.database?.content ?? []) if (!isZeroChunk(ref)) need(ref, 'data', () => `database dump of snapshot ${shortId(snapshot.id)}`);
  }
  return { used, problems };
}

/** Stops prune before it deletes anything, saying what to run. */
function refuse(problems: string[], advice: string): never {
  throw new CorruptArchiveError(
    `prune stopped before deleting anything: ${problems[0]}${problems.length > 1 ? ` (and ${problems.length - 1} more problem(s))` : ''}; ${advice}`,
  );
}

export async function pruneRepository(repo: Repository, options: PruneOptions = {}): Promise<PruneResult> {
  const clock = options.clock ?? systemClock;
  const graceMs = options.graceMs ?? DEFAULT_GRACE_MS;
  const maxUnused = Math.min(1, Math.max(0, options.maxUnused ?? DEFAULT_MAX_UNUSED));
  const signal = options.signal;
  const phase = (message: string): void => options.onPhase?.(message);

  // 1–2. What the snapshots need. Snapshots before the index: every snapshot's index files were
  // written before it.
  phase('finding data in use');
  let snapshots: StoredSnapshot[];
  try {
    snapshots = await listSnapshots(repo);
  } catch (error) {
    if (error instanceof CorruptArchiveError) refuse([error.message], 'no data is deleted while a snapshot cannot be read');
    throw error;
  }
  const snapshotNames = new Set(snapshots.map((s) => s.id));
  try {
    await repo.loadIndex();
  } catch (error) {
    if (error instanceof CorruptArchiveError) refuse([error.message], "run 'cvat-backup repair index', then 'cvat-backup check'");
    throw error;
  }
  const indexFiles = [...repo.loadedIndexFiles()];
  const { used, problems } = await usedBlobs(repo, snapshots, signal);
  if (problems.length > 0) refuse(problems, "run 'cvat-backup repair index' (it rebuilds the index from the packs' own headers), then 'cvat-backup check'");

  // What is stored, as the index files say pack by pack (the in-memory index keeps one copy of a
  // blob; prune must see them all).
  const stored = new Map<string, FileInfo>();
  for (const f of await repo.backend.list('data')) stored.set(f.name, f);
  const plans = new Map<string, PackPlan>();
  const namedBy = new Map<string, string[]>();
  for (const name of indexFiles) {
    signal?.throwIfAborted();
    const file = await repo.readIndexFile(name);
    for (const pack of file.packs) {
      let plan = plans.get(pack.id);
      if (!plan) {
        plan = { id: pack.id, entries: [], file: stored.get(pack.id), used: 0, unused: 0 };
        plans.set(pack.id, plan);
      }
      const seen = new Set(plan.entries.map((e) => `${e.id}@${e.offset}`));
      for (const e of pack.blobs) if (!seen.has(`${e.id}@${e.offset}`)) plan.entries.push(e);
      namedBy.set(pack.id, [...(namedBy.get(pack.id) ?? []), name]);
    }
  }

  // One copy of each used blob: in a pack that is there whole, the newest such pack.
  const kept = new Map<string, Copy>();
  const newer = (a: PackPlan, b: PackPlan): boolean =>
    (a.file?.modifiedMs ?? 0) > (b.file?.modifiedMs ?? 0) || ((a.file?.modifiedMs ?? 0) === (b.file?.modifiedMs ?? 0) && a.id > b.id);
  for (const plan of plans.values()) {
    if (!plan.file) continue;
    for (const e of plan.entries) {
      if (!used.has(e.id) || e.offset + e.length + 4 > plan.file.size) continue;
      const current = kept.get(e.id);
      if (!current || newer(plan, plans.get(current.pack)!)) kept.set(e.id, { pack: plan.id, entry: e });
    }
  }
  const lost = [...used.keys()].filter((id) => !kept.has(id));
  if (lost.length > 0) {
    const where = (id: string): string => repo.location(id)?.pack.slice(0, 12) ?? '?';
    refuse(
      lost.map((id) => `blob ${shortId(id)} that a snapshot uses is indexed in pack ${where(id)}, which is missing or truncated`),
      "run 'cvat-backup check' to see which snapshots are hurt, and 'cvat-backup repair index'",
    );
  }
  for (const plan of plans.values()) {
    for (const e of plan.entries) {
      const copy = kept.get(e.id);
      if (copy && copy.pack === plan.id && copy.entry.offset === e.offset) plan.used += e.length;
      else plan.unused += e.length;
    }
  }

  // 3. The plan.
  phase('planning');
  // Ages on the storage's clock when the lock knows it: a prune whose own clock runs a day ahead
  // must not find a running backup's packs a day old.
  const now = repo.storageNow() ?? clock.now();
  const missing: string[] = [];
  const remove: PackPlan[] = [];
  const candidates: PackPlan[] = [];
  let usedBytes = 0;
  let unusedBytes = 0;
  for (const plan of plans.values()) {
    if (!plan.file) {
      missing.push(plan.id); // named by the index, not stored, and (as checked above) not needed
      continue;
    }
    // A pack's header and framing count as used while it holds a used blob.
    const overhead = Math.max(0, plan.file.size - plan.used - plan.unused);
    if (plan.used === 0) {
      remove.push(plan);
      unusedBytes += plan.file.size;
      continue;
    }
    usedBytes += plan.used + overhead;
    unusedBytes += plan.unused;
    if (plan.unused > 0) candidates.push(plan);
  }
  const totalBefore = usedBytes + unusedBytes;
  let unusedLeft = unusedBytes - remove.reduce((n, p) => n + p.file!.size, 0);
  // Emptiest first: the most bytes freed for the fewest copied.
  candidates.sort((a, b) => b.unused / (b.used + b.unused) - a.unused / (a.used + a.unused) || a.id.localeCompare(b.id));
  const repack: PackPlan[] = [];
  for (const plan of candidates) {
    if (unusedLeft <= maxUnused * (usedBytes + unusedLeft)) break;
    // Object Lock: a partly used pack under retention cannot go (the snapshots that use it keep
    // extending it); repacking it would only store its live blobs twice.
    if (((await repo.backend.retainedUntil?.('data', plan.id)) ?? 0) > clock.now()) continue;
    repack.push(plan);
    unusedLeft -= plan.unused;
  }

  // 4. Packs no index names, and leftovers of interrupted saves: by age.
  const ages = await FirstSeen.load(repo, now);
  const unindexed = [...stored.values()].filter((f) => !plans.has(f.name));
  const oldUnindexed = unindexed.filter((f) => ages.age('data', f) > graceMs);
  const youngUnindexed = unindexed.filter((f) => ages.age('data', f) <= graceMs);
  const temporaries = (await repo.backend.listTemporary?.()) ?? [];
  const oldTemporaries = temporaries.filter((t) => ages.age(`tmp-${t.kind}`, t) > graceMs);

  const result: PruneResult = {
    dryRun: options.dryRun ?? false,
    blobsUsed: used.size,
    packsDeleted: remove.length + repack.length + oldUnindexed.length,
    packsRepacked: repack.length,
    unindexedDeleted: oldUnindexed.length,
    unindexedKept: youngUnindexed.length,
    unindexedKeptBytes: youngUnindexed.reduce((n, f) => n + f.size, 0),
    temporaryDeleted: oldTemporaries.length,
    indexFilesRewritten: 0,
    unusedBefore: unusedBytes,
    unusedAfter: unusedLeft,
    totalBefore,
    totalAfter: usedBytes + unusedLeft,
    bytesDeleted: 0,
    bytesWritten: 0,
    bytesFreed: 0,
  };
  if (options.dryRun) {
    result.bytesDeleted = [...remove, ...repack].reduce((n, p) => n + p.file!.size, 0) + oldUnindexed.reduce((n, f) => n + f.size, 0);
    result.bytesFreed = result.bytesDeleted - repack.reduce((n, p) => n + p.used, 0);
    return result;
  }
  // An append-only server refuses the deletes: say so before writing anything.
  await repo.backend.assertDeletes?.();

  // Object Lock: all the packs, and the index files that name them, or nothing (a refusal half-way
  // would leave the repository mid-prune).
  const goingPacks = [...remove, ...repack].map((p) => p.id).concat(missing);
  const goingIndex = new Set(goingPacks.flatMap((id) => namedBy.get(id) ?? []));
  await assertRemovable(
    repo,
    [
      ...[...remove, ...repack].map((p) => ({ kind: 'data' as const, name: p.id })),
      ...oldUnindexed.map((f) => ({ kind: 'data' as const, name: f.name })),
      ...[...goingIndex].map((name) => ({ kind: 'index' as const, name })),
    ],
    clock.now(),
    'prune',
  );

  // 5. Repack: copy the kept blobs of the chosen packs, sealed as they are, after checking each
  // is the blob the index says (a damaged copy is never carried over in place of a good one).
  if (repack.length > 0) phase(`repacking ${repack.length} packs`);
  const written = repo.bytesWritten;
  for (const plan of repack) {
    signal?.throwIfAborted();
    const bytes = await repo.backend.load('data', plan.id);
    for (const e of plan.entries) {
      const copy = kept.get(e.id);
      if (!copy || copy.pack !== plan.id || copy.entry.offset !== e.offset) continue;
      const sealed = bytes.subarray(e.offset, e.offset + e.length);
      try {
        repo.authenticateSealed(e.id, e.type, sealed, `blob ${shortId(e.id)} in pack ${shortId(plan.id)}`);
      } catch (error) {
        if (error instanceof CorruptArchiveError) refuse([error.message], "run 'cvat-backup check --read-data' to see which snapshots are hurt");
        throw error;
      }
      await repo.repackBlob(e.id, e.type, Buffer.from(sealed), e.rawLength);
    }
  }
  await repo.flush(); // packs, then the index files naming them (the lock is checked first)
  const ours = new Set(repo.writtenIndexFiles());

  // Index files that name packs about to go are replaced by ones that do not.
  const doomed = new Set([...remove, ...repack].map((p) => p.id).concat(missing));
  const rewritten: string[] = [];
  const rewrite = new Set<string>();
  for (const pack of doomed) for (const name of namedBy.get(pack) ?? []) rewrite.add(name);
  if (rewrite.size > 0) phase(`rewriting ${rewrite.size} index files`);
  for (const name of rewrite) {
    const file = await repo.readIndexFile(name);
    const keep = file.packs.filter((p) => !doomed.has(p.id));
    for (const n of await repo.saveIndexFiles(keep)) ours.add(n);
    rewritten.push(name);
  }
  result.indexFilesRewritten = rewritten.length;

  // A last look before anything goes. A new snapshot means someone writes without a valid lock:
  // its blobs may be among those about to go. New index files (a writer that lost its lock, or
  // whose clock is far off) keep their packs.
  phase('deleting unused data');
  const lateSnapshots = (await repo.backend.list('snapshots')).filter((f) => !snapshotNames.has(f.name));
  if (lateSnapshots.length > 0) {
    throw new LockedError(
      `prune stopped before deleting anything: snapshot ${shortId(lateSnapshots[0]!.name)} appeared while it ran (a writer without a valid lock: a clock far off?); run prune again`,
    );
  }
  const protectedPacks = new Set<string>();
  const listedIndex = new Set(indexFiles);
  for (const f of await repo.backend.list('index')) {
    if (listedIndex.has(f.name) || ours.has(f.name)) continue;
    for (const p of (await repo.readIndexFile(f.name)).packs) protectedPacks.add(p.id);
  }
  await repo.assertLockHeld();
  // Every used blob must now be in a pack that stays: where it was, or in a new pack.
  for (const [id, copy] of kept) {
    if (!doomed.has(copy.pack)) continue;
    const moved = repo.location(id);
    if (!moved || doomed.has(moved.pack) || plans.has(moved.pack)) {
      throw new Error(`prune would lose blob ${shortId(id)} (in pack ${shortId(copy.pack)}): stopped before deleting anything`);
    }
  }

  const indexSizes = new Map((await repo.backend.list('index')).map((f) => [f.name, f.size]));
  for (const name of rewritten) {
    result.bytesDeleted += indexSizes.get(name) ?? 0;
    await repo.backend.remove('index', name);
  }
  result.packsDeleted = 0;
  result.unindexedDeleted = 0;
  for (const plan of [...remove, ...repack]) {
    if (protectedPacks.has(plan.id)) continue;
    signal?.throwIfAborted();
    await repo.backend.remove('data', plan.id);
    result.bytesDeleted += plan.file!.size;
    result.packsDeleted++;
  }
  for (const f of oldUnindexed) {
    if (protectedPacks.has(f.name)) {
      result.unindexedKept++;
      result.unindexedKeptBytes += f.size;
      continue;
    }
    signal?.throwIfAborted();
    await repo.backend.remove('data', f.name);
    result.bytesDeleted += f.size;
    result.packsDeleted++;
    result.unindexedDeleted++;
  }
  for (const t of oldTemporaries) {
    await repo.backend.removeTemporary?.(t);
    result.bytesDeleted += t.size;
  }
  await ages.save(
    youngUnindexed.map((f) => ages.key('data', f)),
    temporaries.filter((t) => !oldTemporaries.includes(t)).map((t) => ages.key(`tmp-${t.kind}`, t)),
  );
  const after = repo.bytesWritten;
  result.bytesWritten = after.packs - written.packs + (after.objects - written.objects);
  result.bytesFreed = result.bytesDeleted - result.bytesWritten;
  repo.resetIndex();
  return result;
}

/**
 * Ages of files whose backend tells no modification time: the time a prune first saw each one,
 * kept in sealed `state/` objects (names of packs only, nothing of their content). Written new
 * before the old ones are removed; several are merged by taking the earliest time.
 */
class FirstSeen {
  private readonly seen = new Map<string, number>();
  private changed = false;

  private constructor(
    private readonly repo: Repository,
    private readonly now: number,
    private readonly files: string[],
  ) {}

  static async load(repo: Repository, now: number): Promise<FirstSeen> {
    const files = (await repo.backend.list('state')).map((f) => f.name);
    const state = new FirstSeen(repo, now, files);
    for (const name of files) {
      const content = await repo.loadObject<{ firstSeen?: Record<string, number> }>('state', name).catch(() => undefined);
      for (const [key, time] of Object.entries(content?.firstSeen ?? {})) {
        if (typeof time === 'number') state.seen.set(key, Math.min(time, state.seen.get(key) ?? Infinity));
      }
    }
    return state;
  }

  key(kind: string, file: FileInfo | TemporaryFile): string {
    return `${kind}/${file.name}`;
  }

  /** Age by the storage's time when it has one; else since a prune first saw it (0 the first time). */
  age(kind: string, file: FileInfo | TemporaryFile): number {
    if (file.modifiedMs !== undefined) return this.now - file.modifiedMs;
    const key = this.key(kind, file);
    const first = this.seen.get(key);
    if (first === undefined) {
      this.seen.set(key, this.now);
      this.changed = true;
      return 0;
    }
    return this.now - first;
  }

  /** Keeps the times of the files still there (and without a storage time); drops the rest. */
  async save(...keeps: string[][]): Promise<void> {
    const keep = new Set(keeps.flat());
    const record: Record<string, number> = {};
    for (const [key, time] of this.seen) if (keep.has(key)) record[key] = time;
    if (!this.changed && Object.keys(record).length === this.seen.size) return;
    if (Object.keys(record).length > 0) await this.repo.saveObject('state', { firstSeen: record });
    for (const name of this.files) await this.repo.backend.remove('state', name);
  }
}
