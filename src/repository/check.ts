/**
 * `check`: the repository's structure — every index file and snapshot opens, every pack the index
 * names is there with the right size and its own header says exactly what the index says (every
 * blob the index puts in pack P is in P's header at the same offset, length and type, and every
 * blob of the header is in the index for P), every tree a snapshot needs is readable, every blob
 * it references is indexed. With `readData`, every pack is read whole (one load each) and every
 * blob in it decrypted and hashed, so a flipped bit or a truncated pack is found; a pack the index
 * says is named by its hash (`nameIsHash`: every pack this build writes) must also hash to its
 * name, which proves the upload end to end — bytes outside any blob included. Packs of earlier
 * builds have random names, which prove nothing, and are checked blob by blob only. Damage is
 * reported with the snapshots it hurts.
 *
 * Packs that no index names are listed as information, not as errors: a writer that is running
 * (check shares the lock with backups) or was killed leaves them, and prune deletes them once they
 * are older than its grace period. If a snapshot needs a blob only such a pack holds, that blob
 * is reported as missing from the index — an error, whose remedy is `repair index`.
 *
 * Order: snapshots, then index files, then the pack listing — each written before the next by
 * every writer — so a backup finishing meanwhile cannot make a sound repository look damaged.
 */
import type { FileInfo } from '../backend/backend.js';
import { systemClock, type Clock } from '../clock.js';
import { CorruptArchiveError } from '../errors.js';
import type { PackHeaderEntry } from './packer.js';
import { sha256, type Repository } from './repository.js';
import { loadTree } from './restorer.js';
import { readSnapshots, shortId } from './snapshots.js';
import { isZeroChunk } from './tree.js';

export interface UnindexedPack {
  id: string;
  size: number;
  /** Milliseconds since the storage last wrote it; undefined where the backend cannot tell. */
  ageMs: number | undefined;
}

export interface CheckResult {
  errors: string[];
  snapshots: number;
  packs: number;
  blobs: number;
  readData: boolean;
  /** Packs no index names (information: see the module comment). */
  unindexed: UnindexedPack[];
}

const key = (e: PackHeaderEntry): string => `${e.id}:${e.type}:${e.offset}:${e.length}:${e.rawLength}`;

export async function checkRepository(
  repo: Repository,
  options: { readData?: boolean; signal?: AbortSignal; onPhase?: (message: string) => void; clock?: Clock } = {},
): Promise<CheckResult> {
  const errors: string[] = [];
  const note = (message: string): void => {
    errors.push(message);
  };
  const clock = options.clock ?? systemClock;

  options.onPhase?.('loading snapshots');
  const listing = await readSnapshots(repo);
  for (const d of listing.damaged) note(`snapshot ${shortId(d.id)} is damaged: ${d.error}`);
  const snapshots = listing.snapshots;

  options.onPhase?.('loading index');
  const damagedIndex = new Set<string>();
  await repo.loadIndex({
    onDamaged: (name, error) => {
      damagedIndex.add(name);
      note(`index file ${shortId(name)} is damaged (${error.message}): run 'cvat-backup repair index'`);
    },
  });
  /** What the index files say about each pack: every entry, once. */
  const indexed = new Map<string, Map<string, PackHeaderEntry>>();
  /** Packs an index file says are named by the SHA-256 of their bytes. */
  const hashNamed = new Set<string>();
  for (const name of repo.loadedIndexFiles()) {
    if (damagedIndex.has(name)) continue;
    for (const pack of (await repo.readIndexFile(name)).packs) {
      const entries = indexed.get(pack.id) ?? new Map<string, PackHeaderEntry>();
      for (const e of pack.blobs) entries.set(key(e), e);
      indexed.set(pack.id, entries);
      if (pack.nameIsHash === true) hashNamed.add(pack.id);
    }
  }

  options.onPhase?.('checking packs');
  const stored = new Map<string, FileInfo>();
  for (const f of await repo.backend.list('data')) stored.set(f.name, f);
  const headers = new Map<string, PackHeaderEntry[]>();
  for (const [pack, entries] of indexed) {
    options.signal?.throwIfAborted();
    const file = stored.get(pack);
    const minimum = Math.max(0, ...[...entries.values()].map((e) => e.offset + e.length));
    if (!file) {
      note(`pack ${shortId(pack)} is missing`);
      continue;
    }
    if (file.size < minimum + 4) {
      note(`pack ${shortId(pack)} is truncated (${file.size} bytes, needs more than ${minimum})`);
      continue;
    }
    let header: PackHeaderEntry[];
    try {
      header = await repo.readPackHeader(pack, file.size);
    } catch (error) {
      if (!(error instanceof CorruptArchiveError)) throw error;
      note(`pack ${shortId(pack)}: ${error.message}`);
      continue;
    }
    headers.set(pack, header);
    const inHeader = new Set(header.map(key));
    const onlyIndex = [...entries.keys()].filter((k) => !inHeader.has(k));
    const onlyHeader = header.filter((e) => !entries.has(key(e)));
    if (onlyIndex.length + onlyHeader.length > 0) {
      const first = onlyIndex[0] ?? key(onlyHeader[0]!);
      note(
        `pack ${shortId(pack)}: its header and the index differ (${onlyIndex.length} blob entries only in the index, ${onlyHeader.length} only in the header; first: blob ${first.slice(0, 12)} ${first.split(':').slice(1).join(' ')}): run 'cvat-backup repair index'`,
      );
    }
  }
  const now = repo.storageNow() ?? clock.now();
  const unindexed: UnindexedPack[] = [...stored.values()]
    .filter((f) => !indexed.has(f.name))
    .map((f) => ({ id: f.name, size: f.size, ageMs: f.modifiedMs === undefined ? undefined : now - f.modifiedMs }));

  options.onPhase?.('checking snapshots');
  /** blob id → snapshots that need it, to say which snapshots a damaged pack hurts. */
  const users = new Map<string, Set<string>>();
  for (const snapshot of snapshots) {
    const seenTrees = new Set<string>();
    const use = (id: string): void => {
      if (!users.has(id)) users.set(id, new Set());
      users.get(id)!.add(shortId(snapshot.id));
    };
    const walk = async (treeId: string, where: string): Promise<void> => {
      if (seenTrees.has(treeId)) return;
      seenTrees.add(treeId);
      use(treeId);
      options.signal?.throwIfAborted();
      if (!repo.location(treeId)) {
        note(`snapshot ${shortId(snapshot.id)}: tree ${shortId(treeId)} of ${where} is not in the index${hint(unindexed)}`);
        return;
      }
      let tree;
      try {
        tree = await loadTree(repo, treeId);
      } catch (error) {
        note(`snapshot ${shortId(snapshot.id)}: tree of ${where}: ${(error as Error).message}`);
        return;
      }
      for (const node of tree.nodes) {
        if (node.subtree) await walk(node.subtree, `${where}/${Buffer.from(node.name, 'base64').toString('utf8')}`);
        for (const ref of node.content ?? []) {
          if (isZeroChunk(ref)) continue;
          use(ref);
          if (!repo.location(ref)) note(`snapshot ${shortId(snapshot.id)}: blob ${shortId(ref)} of ${where}/${Buffer.from(node.name, 'base64').toString('utf8')} is not in the index${hint(unindexed)}`);
        }
      }
    };
    for (const volume of snapshot.volumes) await walk(volume.tree, volume.composeName);
    for (const ref of snapshot.database?.content ?? []) {
      if (isZeroChunk(ref)) continue;
      use(ref);
      if (!repo.location(ref)) note(`snapshot ${shortId(snapshot.id)}: blob ${shortId(ref)} of the database dump is not in the index${hint(unindexed)}`);
    }
  }

  let blobs = 0;
  if (options.readData) {
    options.onPhase?.('reading all data');
    for (const [pack, header] of headers) {
      options.signal?.throwIfAborted();
      let bytes: Buffer;
      try {
        bytes = await repo.backend.load('data', pack);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
        note(`pack ${shortId(pack)} vanished while check ran${affected(users, header.map((e) => e.id))}`);
        continue;
      }
      if (hashNamed.has(pack) && sha256(bytes) !== pack) {
        note(`pack ${shortId(pack)}: its bytes do not hash to its name (SHA-256 ${shortId(sha256(bytes))}): it was damaged in storage or on the way${affected(users, header.map((e) => e.id))}`);
      }
      for (const entry of header) {
        blobs++;
        try {
          // Read where the header says this copy is (a blob stored twice is read in each pack).
          await repo.openBlob(entry.id, { pack, ...entry }, bytes.subarray(entry.offset, entry.offset + entry.length), true);
        } catch (error) {
          note(`${(error as Error).message}${affected(users, [entry.id])}`);
        }
      }
    }
    for (const pack of indexed.keys()) {
      if (stored.has(pack) && !headers.has(pack)) {
        const ids = [...indexed.get(pack)!.values()].map((e) => e.id);
        if (ids.length > 0) note(`pack ${shortId(pack)} cannot be read${affected(users, ids)}`);
      }
    }
  }
  return { errors, snapshots: snapshots.length + listing.damaged.length, packs: indexed.size, blobs, readData: options.readData ?? false, unindexed };
}

function hint(unindexed: UnindexedPack[]): string {
  return unindexed.length > 0 ? ` (${unindexed.length} packs no index names may hold it: run 'cvat-backup repair index')` : '';
}

function affected(users: Map<string, Set<string>>, ids: string[]): string {
  const snapshots = new Set<string>();
  for (const id of ids) for (const s of users.get(id) ?? []) snapshots.add(s);
  return snapshots.size === 0 ? ' (no snapshot uses it)' : ` (damages snapshot ${[...snapshots].sort().join(', ')})`;
}
