/** Listing snapshots and resolving `latest` or an id prefix to one snapshot. */
import { UsageError } from '../errors.js';
import type { Repository } from './repository.js';
import type { Snapshot } from './tree.js';

export async function listSnapshots(repo: Repository): Promise<(Snapshot & { id: string })[]> {
  const out: (Snapshot & { id: string })[] = [];
  for (const id of await repo.backend.list('snapshots')) {
    out.push({ ...(await repo.loadObject<Snapshot>('snapshots', id)), id });
  }
  return out.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
}

export async function resolveSnapshot(repo: Repository, ref: string, project?: string): Promise<Snapshot & { id: string }> {
  const all = await listSnapshots(repo);
  if (ref === 'latest') {
    const candidates = project === undefined ? all : all.filter((s) => s.project === project);
    const latest = candidates[candidates.length - 1];
    if (!latest) throw new UsageError(`no snapshot${project ? ` of project '${project}'` : ''} in repository ${repo.backend.location}`);
    return latest;
  }
  const matches = all.filter((s) => s.id.startsWith(ref.toLowerCase()));
  if (matches.length === 0) throw new UsageError(`no snapshot '${ref}' in repository ${repo.backend.location} (see 'cvat-backup snapshots')`);
  if (matches.length > 1) throw new UsageError(`snapshot id '${ref}' is ambiguous: give more characters`);
  return matches[0]!;
}

export function shortId(id: string): string {
  return id.slice(0, 8);
}
