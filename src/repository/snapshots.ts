/**
 * Listing snapshots and resolving `latest` or an id prefix to one snapshot.
 *
 * One damaged snapshot file (truncated, flipped bits, not ours) must not hide the others: reading
 * collects the damaged ones beside the good ones, and each caller decides. Listing and restore
 * name them and go on; prune refuses (it cannot know which data a damaged snapshot still needs).
 */
import { CorruptArchiveError, UsageError } from '../errors.js';
import { inOrder } from './in-order.js';
import type { Repository } from './repository.js';
import type { Snapshot } from './tree.js';

export type StoredSnapshot = Snapshot & { id: string };

export interface DamagedSnapshot {
  id: string;
  /** Why it could not be read. */
  error: string;
}

export interface SnapshotListing {
  /** Readable snapshots, oldest first. */
  snapshots: StoredSnapshot[];
  damaged: DamagedSnapshot[];
}

/** Snapshot files loaded at once: a remote store answers them in one round trip together. */
const SNAPSHOT_LOADS = 16;

export interface ReadSnapshotsOptions {
  /**
   * Also loads the repository's index (`Repository.loadIndex`), while the snapshots are loaded:
   * for callers that read the blobs of a snapshot next. Its listing starts once the snapshot
   * listing is complete: a backup writes its index files before its snapshot, so the index then
   * holds every blob of every snapshot listed. Its failure is thrown after the snapshots' own.
   */
  loadIndex?: boolean;
}

/** Every snapshot that can be read, and the ones that cannot; never throws for a damaged file. */
export async function readSnapshots(repo: Repository, options: ReadSnapshotsOptions = {}): Promise<SnapshotListing> {
  const { listing, index } = await readWithIndex(repo, options.loadIndex ?? false);
  await index;
  return listing;
}

/**
 * `readSnapshots`, and the index load (when asked) as a promise to await: settled already if the
 * snapshots' loads failed (that failure is thrown), under way otherwise.
 */
async function readWithIndex(repo: Repository, loadIndex: boolean): Promise<{ listing: SnapshotListing; index: Promise<void> }> {
  const snapshots: StoredSnapshot[] = [];
  const damaged: DamagedSnapshot[] = [];
  const files = await repo.backend.list('snapshots');
  const index = loadIndex ? repo.loadIndex() : Promise.resolve();
  index.catch(() => undefined); // the caller's to throw, after its own
  try {
    await inOrder(
      files,
      SNAPSHOT_LOADS,
      ({ name: id }) => repo.loadObject<Snapshot>('snapshots', id),
      async (loaded, { name: id }) => {
        try {
          const snapshot = await loaded;
          if (!isSnapshotShape(snapshot)) throw new CorruptArchiveError('not a snapshot');
          snapshots.push({ ...snapshot, id });
        } catch (error) {
          // Removed meanwhile (forget on another host) is not damage.
          if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
          if (!(error instanceof CorruptArchiveError) && !(error instanceof SyntaxError)) throw error;
          damaged.push({ id, error: error.message });
        }
      },
    );
  } catch (error) {
    await index.catch(() => undefined);
    throw error;
  }
  snapshots.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
  damaged.sort((a, b) => a.id.localeCompare(b.id));
  return { listing: { snapshots, damaged }, index };
}

/** The snapshots, oldest first; throws if any snapshot file is damaged (for prune and forget). */
export async function listSnapshots(repo: Repository): Promise<StoredSnapshot[]> {
  const { snapshots, damaged } = await readSnapshots(repo);
  const first = damaged[0];
  if (first !== undefined) {
    throw new CorruptArchiveError(
      `snapshot ${shortId(first.id)} is damaged (${first.error})${damaged.length > 1 ? ` and ${damaged.length - 1} more` : ''}: run 'cvat-backup check', and remove what cannot be repaired from ${repo.backend.location}/snapshots/`,
    );
  }
  return snapshots;
}

function isSnapshotShape(value: unknown): value is Snapshot {
  const s = value as Partial<Snapshot> | null;
  return typeof s === 'object' && s !== null && typeof s.time === 'string' && typeof s.project === 'string' && Array.isArray(s.volumes);
}

/**
 * `latest` (of `project`, if given) or an id prefix. Damaged snapshots are passed over: `onDamaged`
 * hears of each one (a restore says which it skipped). Loads the repository's index too, while
 * the snapshots are loaded (every caller reads the snapshot's blobs next; see
 * `ReadSnapshotsOptions.loadIndex` for why the index then has them); a failure to resolve is
 * thrown before the index's.
 */
export async function resolveSnapshot(
  repo: Repository,
  ref: string,
  project?: string,
  onDamaged?: (damaged: DamagedSnapshot) => void,
): Promise<StoredSnapshot> {
  const { listing, index } = await readWithIndex(repo, true);
  let found: StoredSnapshot | DamagedSnapshot;
  try {
    found = findSnapshot(listing, ref, repo.backend.location, project, onDamaged);
  } catch (error) {
    await index.catch(() => undefined);
    throw error;
  }
  if ('error' in found) {
    await index.catch(() => undefined);
    throw new CorruptArchiveError(`snapshot ${shortId(found.id)} is damaged (${found.error}): pick another one ('cvat-backup snapshots')`);
  }
  await index;
  return found;
}

/**
 * `resolveSnapshot` within a listing already read (copy resolves several references against one):
 * the snapshot, or the damaged one an id prefix names. UsageError when no snapshot or more than
 * one matches; `location` names the repository in that message.
 */
export function findSnapshot(
  listing: SnapshotListing,
  ref: string,
  location: string,
  project?: string,
  onDamaged?: (damaged: DamagedSnapshot) => void,
): StoredSnapshot | DamagedSnapshot {
  const { snapshots: all, damaged } = listing;
  if (ref === 'latest') {
    for (const d of damaged) onDamaged?.(d);
    const candidates = project === undefined ? all : all.filter((s) => s.project === project);
    const latest = candidates[candidates.length - 1];
    if (!latest) throw new UsageError(`no snapshot${project ? ` of project '${project}'` : ''} in repository ${location}`);
    return latest;
  }
  const wanted = ref.toLowerCase();
  const matches = all.filter((s) => s.id.startsWith(wanted));
  const damagedMatches = damaged.filter((d) => d.id.startsWith(wanted));
  if (matches.length + damagedMatches.length > 1) throw new UsageError(`snapshot id '${ref}' is ambiguous: give more characters`);
  const hurt = damagedMatches[0];
  if (hurt !== undefined) return hurt;
  if (matches.length === 0) throw new UsageError(`no snapshot '${ref}' in repository ${location} (see 'cvat-backup snapshots')`);
  return matches[0]!;
}

export function shortId(id: string): string {
  return id.slice(0, 8);
}
