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
import { processAlive } from '../host.js';
import type { ProgressListener } from '../events.js';
import type { Deployment } from './discover.js';
import { isRunningState, startContainers } from './lifecycle.js';

const LABEL = 'io.cvat-backup.lock';

export interface ProjectLock {
  release(): Promise<void>;
  /**
   * Containers a killed cvat-backup had found running and may have left stopped: the new holder
   * starts them again before it looks at the deployment.
   */
  leftStoppedByDeadHolder: string[];
}

export function lockName(project: string): string {
  return `cvat-backup-lock-${project.replace(/[^a-zA-Z0-9_.-]/g, '_')}`;
}

export async function acquireProjectLock(
  engine: DockerEngine,
  project: string,
  image: string,
  operation: string,
  runningContainerIds: string[],
  now: () => Date = () => new Date(),
): Promise<ProjectLock> {
  const name = lockName(project);
  const labels: Record<string, string> = {
    [LABEL]: project,
    'io.cvat-backup.pid': String(process.pid),
    'io.cvat-backup.host': hostname(),
    'io.cvat-backup.operation': operation,
    'io.cvat-backup.started': now().toISOString(),
    'io.cvat-backup.running': runningContainerIds.join(','),
  };
  let leftStopped: string[] = [];
  for (let attempt = 0; attempt < 2; attempt++) {
    // What a dead holder left stopped stays recorded until it is running again, even if we die too.
    labels['io.cvat-backup.running'] = [...new Set([...runningContainerIds, ...leftStopped])].join(',');
    if (await engine.createMarker(name, image, labels)) {
      return { release: () => engine.removeContainer(name), leftStoppedByDeadHolder: leftStopped };
    }
    const holder = await engine.inspectMarker(name);
    if (holder === undefined) continue; // released between our two calls
    const pid = Number(holder['io.cvat-backup.pid']);
    const sameHost = holder['io.cvat-backup.host'] === hostname();
    if (sameHost && Number.isInteger(pid) && !processAlive(pid)) {
      leftStopped = (holder['io.cvat-backup.running'] ?? '').split(',').filter((id) => id !== '');
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

/**
 * Takes the project lock for an operation on `deployment`. If the previous holder was killed
 * (SIGKILL, power cut) while CVAT was stopped, the containers it had found running are started
 * again first, and the deployment is looked at anew.
 */
export async function lockDeployment(
  engine: DockerEngine,
  deployment: Deployment,
  operation: string,
  onProgress: ProgressListener,
  rediscover: () => Promise<Deployment>,
): Promise<{ lock: ProjectLock; deployment: Deployment }> {
  const image = deployment.version.serverImage ?? deployment.containers[0]?.image;
  if (image === undefined) throw new LockedError(`project '${deployment.project}' has no container image to hold the lock`);
  // Paused by the user is not running: a holder that dies must not unpause what it did not freeze.
  const running = deployment.containers.filter((c) => c.state === 'running' || c.state === 'restarting').map((c) => c.id);
  const lock = await acquireProjectLock(engine, deployment.project, image, operation, running);
  const left = new Set(lock.leftStoppedByDeadHolder);
  const toStart = deployment.containers.filter((c) => left.has(c.id) && !isRunningState(c.state));
  try {
    // The container list can show a frozen container as running (Docker 20.10): unpause asks the
    // engine itself, and is a no-op for one that is not frozen.
    let thawed = 0;
    for (const c of deployment.containers.filter((c) => left.has(c.id) && isRunningState(c.state))) {
      if (await engine.unpauseContainer(c.id)) thawed++;
    }
    if (toStart.length === 0 && thawed === 0) return { lock, deployment };
    onProgress({
      type: 'warning',
      message: `a previous cvat-backup was killed and left ${toStart.length + thawed} container(s) stopped or frozen: starting them again`,
    });
    await startContainers(engine, toStart, onProgress);
    return { lock, deployment: await rediscover() };
  } catch (error) {
    await lock.release().catch(() => undefined);
    throw error;
  }
}
