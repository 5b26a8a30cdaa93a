/**
 * `prune`: removes data no snapshot needs.
 *
 * 1. Mark: walk every snapshot's trees; every tree and chunk reached is used.
 * 2. Packs whose blobs are all unused are deleted; packs with some unused blobs are repacked (the
 *    used blobs copied, still sealed, into new packs); packs no index names (left by a killed
 *    backup) are deleted.
 * 3. Order for crash safety: new packs → one new index for everything kept → old index files
 *    deleted → obsolete packs deleted. A crash at any point leaves every snapshot readable.
 * Needs the exclusive lock (no backup may add blobs meanwhile).
 */
import type { Repository } from './repository.js';
import { loadTree } from './restorer.js';
import { listSnapshots } from './snapshots.js';
import { isZeroChunk } from './tree.js';

export interface PruneResult {
  packsDeleted: number;
  packsRepacked: number;
  bytesFreed: number;
  blobsKept: number;
}

export async function usedBlobs(repo: Repository, signal?: AbortSignal): Promise<Set<string>> {
  const used = new Set<string>();
  const walk = async (treeId: string): Promise<void> => {
    if (used.has(treeId)) return;
    used.add(treeId);
    signal?.throwIfAborted();
    for (const node of (await loadTree(repo, treeId)).nodes) {
      if (node.subtree) await walk(node.subtree);
      for (const ref of node.content ?? []) if (!isZeroChunk(ref)) used.add(ref);
    }
  };
  for (const snapshot of await listSnapshots(repo)) {
    for (const v of snapshot.volumes) await walk(v.tree);
    for (const ref of snapshot.database?.content ?? []) if (!isZeroChunk(ref)) used.add(ref);
  }
  return used;
}

export async function pruneRepository(repo: Repository, options: { signal?: AbortSignal; onPhase?: (m: string) => void } = {}): Promise<PruneResult> {
  options.onPhase?.('finding data in use');
  await repo.loadIndex();
  const used = await usedBlobs(repo, options.signal);
  const packs = new Map<string, { used: string[]; unused: number }>();
  for (const [id, where] of repo.blobIds()) {
    const entry = packs.get(where.pack) ?? { used: [], unused: 0 };
    if (used.has(id)) entry.used.push(id);
    else entry.unused++;
    packs.set(where.pack, entry);
  }
  // Packs no index names (left by killed backups), listed before this prune writes any pack.
  const orphans = (await repo.backend.list('data')).filter((p) => !packs.has(p));
  const obsolete: string[] = [];
  let repacked = 0;
  options.onPhase?.('repacking');
  const keptBlobs: string[] = [];
  for (const [pack, { used: inUse, unused }] of packs) {
    if (unused === 0) {
      keptBlobs.push(...inUse);
      continue;
    }
    obsolete.push(pack);
    if (inUse.length === 0) continue;
    repacked++;
    for (const id of inUse) {
      options.signal?.throwIfAborted();
      await repo.copyBlobToNewPack(id);
      keptBlobs.push(id);
    }
  }
  await repo.flushPacksOnly();
  if (obsolete.length === 0 && orphans.length === 0) return { packsDeleted: 0, packsRepacked: 0, bytesFreed: 0, blobsKept: keptBlobs.length };
  options.onPhase?.('writing the new index');
  const oldIndexFiles = await repo.backend.list('index');
  await repo.rewriteIndex(new Set(keptBlobs));
  for (const name of oldIndexFiles) await repo.backend.remove('index', name);
  options.onPhase?.('deleting unused packs');
  const doomed = new Set([...obsolete, ...orphans]);
  for (const id of keptBlobs) {
    const where = repo.location(id);
    if (!where || doomed.has(where.pack)) {
      throw new Error(`prune would lose blob ${id.slice(0, 12)} (in pack ${where?.pack.slice(0, 12) ?? '?'}): stopped before deleting anything`);
    }
  }
  let bytesFreed = 0;
  for (const pack of doomed) {
    bytesFreed += (await repo.backend.stat('data', pack)) ?? 0;
    await repo.backend.remove('data', pack);
  }
  return { packsDeleted: obsolete.length + orphans.length, packsRepacked: repacked, bytesFreed, blobsKept: keptBlobs.length };
}
