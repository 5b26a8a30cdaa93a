/**
 * `repair index`: rebuilds the index from the packs' own headers (every pack ends with a sealed
 * list of its blobs, see packer.ts), for when index files are lost, damaged, or disagree with
 * the packs — the state in which prune refuses to run. Needs the exclusive lock.
 *
 * Every pack is listed and its header read. A pack whose header cannot be read keeps the entries
 * the old index files gave it (its blobs may still be whole), and is reported; a pack the old
 * index names but the storage lacks is dropped from the index. A pack keeps `nameIsHash` when an
 * old index file gave it (its header cannot say how it was named). The new index files are written
 * (and the lock checked) before any old one is deleted, so a crash leaves the old index beside
 * the new — both true, merely twice — and running the command again finishes it.
 */
import { CorruptArchiveError } from '../errors.js';
import type { PackHeaderEntry } from './packer.js';
import type { IndexedPack, Repository } from './repository.js';
import { shortId } from './snapshots.js';

export interface RepairIndexResult {
  /** Packs whose header was read and indexed. */
  packs: number;
  blobs: number;
  /** Packs whose header cannot be read (entries from the old index kept, if it had any). */
  damagedPacks: { id: string; error: string; keptFromOldIndex: number }[];
  /** Packs the old index named that are not stored. */
  missingPacks: number;
  /** Old index files that could not be read. */
  damagedIndexFiles: number;
  indexFilesWritten: number;
  indexFilesRemoved: number;
}

export async function repairIndex(
  repo: Repository,
  options: { signal?: AbortSignal; onPhase?: (message: string) => void } = {},
): Promise<RepairIndexResult> {
  options.onPhase?.('reading the old index');
  const oldFiles = (await repo.backend.list('index')).map((f) => f.name);
  /** What the old index files said, for packs whose own header is unreadable. */
  const old = new Map<string, PackHeaderEntry[]>();
  /** Packs the old index says are named by their hash: the new index says so too (headers do not tell). */
  const hashed = new Set<string>();
  let damagedIndexFiles = 0;
  for (const name of oldFiles) {
    try {
      for (const pack of (await repo.readIndexFile(name)).packs) {
        old.set(pack.id, [...(old.get(pack.id) ?? []), ...pack.blobs]);
        if (pack.nameIsHash === true) hashed.add(pack.id);
      }
    } catch (error) {
      if (!(error instanceof CorruptArchiveError)) throw error;
      damagedIndexFiles++;
    }
  }

  options.onPhase?.('reading pack headers');
  const stored = await repo.backend.list('data');
  const packs: IndexedPack[] = [];
  const indexed = (id: string, blobs: PackHeaderEntry[]): IndexedPack => (hashed.has(id) ? { id, blobs, nameIsHash: true } : { id, blobs });
  const damagedPacks: RepairIndexResult['damagedPacks'] = [];
  let blobs = 0;
  for (const file of stored) {
    options.signal?.throwIfAborted();
    try {
      const header = await repo.readPackHeader(file.name, file.size);
      packs.push(indexed(file.name, header));
      blobs += header.length;
    } catch (error) {
      if (!(error instanceof CorruptArchiveError)) throw error;
      const before = dedupe(old.get(file.name) ?? []).filter((e) => e.offset + e.length <= file.size);
      if (before.length > 0) packs.push(indexed(file.name, before));
      damagedPacks.push({ id: shortId(file.name), error: error.message, keptFromOldIndex: before.length });
    }
  }
  const storedNames = new Set(stored.map((f) => f.name));
  const missingPacks = [...old.keys()].filter((id) => !storedNames.has(id)).length;

  options.onPhase?.('writing the new index');
  const written = await repo.saveIndexFiles(packs);
  const keep = new Set(written);
  let removed = 0;
  for (const name of oldFiles) {
    if (keep.has(name)) continue; // the same content written again has the same name
    await repo.backend.remove('index', name);
    removed++;
  }
  repo.resetIndex();
  return { packs: packs.length, blobs, damagedPacks, missingPacks, damagedIndexFiles, indexFilesWritten: written.length, indexFilesRemoved: removed };
}

function dedupe(entries: PackHeaderEntry[]): PackHeaderEntry[] {
  const seen = new Map<string, PackHeaderEntry>();
  for (const e of entries) seen.set(`${e.id}@${e.offset}`, e);
  return [...seen.values()];
}
