/**
 * One cvat-backup at a time per project, on the engine itself: the lock is a never-started
 * container named `cvat-backup-lock-<project>`. Creating a container with a taken name fails
 * atomically in the engine, so the lock holds across users and hosts that share the engine.
 * The labels say who holds it; a lock left by a process on this host that no longer exists
 * (killed with SIGKILL, power cut) is stale and taken over. What the dead holder may have left
 * half done is put right before anything else: a killed restore's volumes (by a hook the restore
 * layer gives, `RestoreRecovery`), then the containers it had stopped are started again. Both are
 * carried in the new holder's labels until done, so a run killed while recovering is recovered by
 * the next one.
 */
import { hostname } from 'node:os';
import type { DockerEngine } from '../docker/engine.js';
import { LockedError } from '../errors.js';
import { processAlive } from '../host.js';
import type { ProgressListener } from '../events.js';
import type { Deployment } from './discover.js';
import { isRunningState, startContainers } from './lifecycle.js';

const LABEL = 'io.cvat-backup.lock';

/** A restore whose holder died: its id (`host/pid/started`, the mark on its committed volumes). */
export interface KilledRestore {
  id: string;
  pid: string;
  started: string;
}

/**
 * Puts right the volumes of a killed restore (rollback points) before CVAT may start: given by the
 * restore layer to every operation that takes the lock. Throwing keeps the lock marker (and with it
 * what is left to do) for the next run.
 */
export type RestoreRecovery = (engine: DockerEngine, deployment: Deployment, killed: KilledRestore, onProgress: ProgressListener) => Promise<void>;

const PENDING_RESTORE = 'io.cvat-backup.pending-restore';

function holderId(labels: Record<string, string>): string {
  return `${labels['io.cvat-backup.host'] ?? '?'}/${labels['io.cvat-backup.pid'] ?? '?'}/${labels['io.cvat-backup.started'] ?? '?'}`;
}

function parseId(id: string): KilledRestore {
  const [, pid = '?', started = '?'] = id.split('/');
  return { id, pid, started };
}

export interface ProjectLock {
  release(): Promise<void>;
  /** `host/pid/started` of this holder: a restore marks the volumes it commits with it. */
  id: string;
  /** A restore whose holder died before it was recovered (itself, or a run that died recovering it). */
  killedRestore: KilledRestore | undefined;
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
  let killedRestore: KilledRestore | undefined;
  for (let attempt = 0; attempt < 2; attempt++) {
    // What a dead holder left stopped stays recorded until it is running again, even if we die too.
    labels['io.cvat-backup.running'] = [...new Set([...runningContainerIds, ...leftStopped])].join(',');
    if (await engine.createMarker(name, image, labels)) {
      return { release: () => engine.removeContainer(name), id: holderId(labels), leftStoppedByDeadHolder: leftStopped, killedRestore };
    }
    const holder = await engine.inspectMarker(name);
    if (holder === undefined) continue; // released between our two calls
    const pid = Number(holder['io.cvat-backup.pid']);
    const sameHost = holder['io.cvat-backup.host'] === hostname();
    if (sameHost && Number.isInteger(pid) && !processAlive(pid)) {
      leftStopped = (holder['io.cvat-backup.running'] ?? '').split(',').filter((id) => id !== '');
      // A killed restore (or a run killed before it had recovered one) may have left rollback points.
      const pending = holder['io.cvat-backup.operation'] === 'restore' ? holderId(holder) : holder[PENDING_RESTORE];
      if (pending !== undefined && pending !== '') {
        killedRestore = parseId(pending);
        labels[PENDING_RESTORE] = pending;
      }
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
 * (SIGKILL, power cut) in a restore, `recover` puts its volumes right first; if it was killed
 * while CVAT was stopped, the containers it had found running are started again (only then), and
 * the deployment is looked at anew.
 */
export async function lockDeployment(
  engine: DockerEngine,
  deployment: Deployment,
  operation: string,
  onProgress: ProgressListener,
  rediscover: () => Promise<Deployment>,
  recover: RestoreRecovery,
): Promise<{ lock: ProjectLock; deployment: Deployment }> {
  const image = deployment.version.serverImage ?? deployment.containers[0]?.image;
  if (image === undefined) throw new LockedError(`project '${deployment.project}' has no container image to hold the lock`);
  // Paused by the user is not running: a holder that dies must not unpause what it did not freeze.
  const running = deployment.containers.filter((c) => c.state === 'running' || c.state === 'restarting').map((c) => c.id);
  const lock = await acquireProjectLock(engine, deployment.project, image, operation, running);
  // Not released on failure: the marker keeps what is left to do for the next run, and CVAT is
  // not started on half-restored volumes.
  if (lock.killedRestore) await recover(engine, deployment, lock.killedRestore, onProgress);
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
