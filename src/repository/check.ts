/**
 * `check`: the repository's structure — every index file and snapshot opens, every tree a
 * snapshot needs is readable, every blob it references is indexed and its pack exists with the
 * right size. With `readData`, every pack is read whole and every blob in it decrypted and hashed,
 * so a flipped bit or a truncated pack is found; damage is reported with the snapshots it hurts.
 */
import type { Repository } from './repository.js';
import { loadTree } from './restorer.js';
import { listSnapshots, shortId } from './snapshots.js';
import { isZeroChunk } from './tree.js';

export interface CheckResult {
  errors: string[];
  snapshots: number;
  packs: number;
  blobs: number;
  readData: boolean;
}

export async function checkRepository(
  repo: Repository,
  options: { readData?: boolean; signal?: AbortSignal; onPhase?: (message: string) => void } = {},
): Promise<CheckResult> {
  const errors: string[] = [];
  const note = (message: string): void => {
    errors.push(message);
  };
  options.onPhase?.('loading index');
  try {
    await repo.loadIndex();
  } catch (error) {
    note(`index: ${(error as Error).message}`);
  }
  const packSizes = new Map<string, number>();
  for (const [, where] of repo.blobIds()) {
    packSizes.set(where.pack, Math.max(packSizes.get(where.pack) ?? 0, where.offset + where.length));
  }
  options.onPhase?.('checking packs');
  for (const [pack, minimum] of packSizes) {
    const size = await repo.backend.stat('data', pack);
    if (size === undefined) note(`pack ${shortId(pack)} is missing`);
    else if (size < minimum + 4) note(`pack ${shortId(pack)} is truncated (${size} bytes, needs more than ${minimum})`);
  }
  options.onPhase?.('checking snapshots');
  /** blob id → snapshots that need it, to say which snapshots a damaged pack hurts. */
  const users = new Map<string, Set<string>>();
  const snapshots = await listSnapshots(repo).catch((error: unknown) => {
    note(`snapshots: ${(error as Error).message}`);
    return [];
  });
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
          if (!repo.location(ref)) note(`snapshot ${shortId(snapshot.id)}: blob ${shortId(ref)} of ${where}/${Buffer.from(node.name, 'base64').toString('utf8')} is not in the index`);
        }
      }
    };
    for (const volume of snapshot.volumes) await walk(volume.tree, volume.composeName);
    for (const ref of snapshot.database?.content ?? []) {
      if (isZeroChunk(ref)) continue;
      use(ref);
      if (!repo.location(ref)) note(`snapshot ${shortId(snapshot.id)}: blob ${shortId(ref)} of the database dump is not in the index`);
    }
  }
  let blobs = 0;
  if (options.readData) {
    options.onPhase?.('reading all data');
    for (const pack of packSizes.keys()) {
      options.signal?.throwIfAborted();
      let header;
      try {
        header = await repo.readPackHeader(pack);
      } catch (error) {
        note(`pack ${shortId(pack)}: ${(error as Error).message}${affected(users, [...repo.blobIds()].filter(([, w]) => w.pack === pack).map(([id]) => id))}`);
        continue;
      }
      for (const entry of header) {
        blobs++;
        try {
          await repo.loadBlob(entry.id, undefined, { hash: true });
        } catch (error) {
          note(`${(error as Error).message}${affected(users, [entry.id])}`);
        }
      }
    }
  }
  return { errors, snapshots: snapshots.length, packs: packSizes.size, blobs, readData: options.readData ?? false };
}

function affected(users: Map<string, Set<string>>, ids: string[]): string {
  const snapshots = new Set<string>();
  for (const id of ids) for (const s of users.get(id) ?? []) snapshots.add(s);
  return snapshots.size === 0 ? ' (no snapshot uses it)' : ` (damages snapshot ${[...snapshots].sort().join(', ')})`;
}
