/**
 * One cvat-backup at a time per project, on the engine itself: the lock is a never-started
 * container named `cvat-backup-lock-<project>`. Creating a container with a taken name fails
 * atomically in the engine, so the lock holds across users and hosts that share the engine.
 * The labels say who holds it; a lock left by a process on this host that no longer exists
 * (killed with SIGKILL, power cut) is stale and taken over.
 */
import { hostname } from 'node:os';
import type { DockerEngine } from '../docker/engine.js';
import { LockedError } from '../errors.js';

const LABEL = 'io.cvat-backup.lock';

export interface ProjectLock {
  release(): Promise<void>;
}

export function lockName(project: string): string {
  return `cvat-backup-lock-${project.replace(/[^a-zA-Z0-9_.-]/g, '_')}`;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export async function acquireProjectLock(
  engine: DockerEngine,
  project: string,
  image: string,
  operation: string,
  now: () => Date = () => new Date(),
): Promise<ProjectLock> {
  const name = lockName(project);
  const labels = {
    [LABEL]: project,
    'io.cvat-backup.pid': String(process.pid),
    'io.cvat-backup.host': hostname(),
    'io.cvat-backup.operation': operation,
    'io.cvat-backup.started': now().toISOString(),
  };
  for (let attempt = 0; attempt < 2; attempt++) {
    if (await engine.createMarker(name, image, labels)) {
      return { release: () => engine.removeContainer(name) };
    }
    const holder = await engine.inspectMarker(name);
    if (holder === undefined) continue; // released between our two calls
    const pid = Number(holder['io.cvat-backup.pid']);
    const sameHost = holder['io.cvat-backup.host'] === hostname();
    if (sameHost && Number.isInteger(pid) && !processAlive(pid)) {
      await engine.removeContainer(name);
      continue;
    }
    throw new LockedError(
      `another cvat-backup (${holder['io.cvat-backup.operation'] ?? '?'}, pid ${holder['io.cvat-backup.pid'] ?? '?'} on ${
        holder['io.cvat-backup.host'] ?? '?'
      }, since ${holder['io.cvat-backup.started'] ?? '?'}) is working on project '${project}'; wait for it, or if it is gone run: docker rm ${name}`,
    );
  }
  throw new LockedError(`could not take the lock ${name} for project '${project}': try again`);
}
