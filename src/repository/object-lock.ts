/**
 * Object Lock (ransomware-proof S3 repositories): what a backup keeps retained, and what forget
 * and prune must not try to remove. The backend does the storage's part (retention on every write,
 * refusal inside it); this module decides which files a snapshot still needs.
 *
 * Deduplicated packs outlive the snapshot that wrote them, so every backup extends the retention
 * of the packs its snapshot uses, and of the keys and the config (without which nothing can be
 * read). Index files are not extended: they keep the retention of their write, because prune must
 * replace the index files that name packs it deletes, and an index file is shared by live and dead
 * packs; an index lost after its retention is rebuilt from the (retained) packs' own headers by
 * `repair index`.
 */
import { ObjectLockedError } from '../errors.js';
import type { FileKind } from '../backend/backend.js';
import type { Repository } from './repository.js';
import type { StoredSnapshot } from './snapshots.js';
import { usedBlobs } from './prune.js';

/** Extends the retention of what `snapshot` needs; returns how many files (0 without Object Lock). */
export async function extendSnapshotRetention(repo: Repository, snapshot: StoredSnapshot, signal?: AbortSignal): Promise<number> {
  const backend = repo.backend;
  if (!backend.extendRetention || !(await backend.retention?.())) return 0;
  await repo.loadIndex();
  const { used } = await usedBlobs(repo, [snapshot], signal);
  const packs = new Set<string>();
  for (const id of used.keys()) {
    const at = repo.location(id);
    if (at) packs.add(at.pack);
  }
  const files: { kind: FileKind; name: string }[] = [
    { kind: 'config', name: 'config' },
    ...(await backend.list('keys')).map((f) => ({ kind: 'keys' as const, name: f.name })),
    { kind: 'snapshots', name: snapshot.id },
    ...[...packs].map((name) => ({ kind: 'data' as const, name })),
  ];
  return backend.extendRetention(files);
}

/**
 * Throws ObjectLockedError, before anything is changed, when any of the files is still retained:
 * forget and prune remove all they planned or nothing.
 */
export async function assertRemovable(repo: Repository, files: { kind: FileKind; name: string }[], now: number, what: string): Promise<void> {
  const backend = repo.backend;
  if (!backend.retainedUntil) return;
  let latest: number | undefined;
  let count = 0;
  for (const f of files) {
    const until = await backend.retainedUntil(f.kind, f.name);
    if (until !== undefined && until > now) {
      count++;
      if (latest === undefined || until > latest) latest = until;
    }
  }
  if (count > 0) {
    throw new ObjectLockedError(
      `${what}: ${count} of the ${files.length} files to remove are under Object Lock retention (the last until ${new Date(latest!).toISOString()}); nothing was removed: run it again after that date`,
    );
  }
}
