/**
 * Stopping and starting a deployment in dependency order, and the guarantee that what was running
 * runs again: `withDeploymentStopped` starts every container it stopped whatever happens inside —
 * an error, a full disk, or an abort (Ctrl-C) — before it returns or rethrows.
 *
 * Order: compose v2 records `com.docker.compose.depends_on` on each container; where it did, the
 * dependency graph gives levels (a service's level is one more than its deepest dependency). Where
 * it did not, CVAT's known tiers are used. Start goes level by level upwards, stop downwards; the
 * containers of one level start or stop in parallel.
 */
import type { DockerEngine } from '../docker/engine.js';
import type { ProgressListener } from '../events.js';
import type { DeploymentContainer } from './discover.js';
import { startTier } from './cvat.js';

export function startLevels(containers: DeploymentContainer[]): DeploymentContainer[][] {
  const useLabels = containers.some((c) => c.dependsOn !== undefined);
  const services = new Map(containers.map((c) => [c.service, c]));
  const levelOf = new Map<string, number>();
  const visiting = new Set<string>();
  const level = (service: string): number => {
    const known = levelOf.get(service);
    if (known !== undefined) return known;
    const container = services.get(service);
    if (!useLabels || !container) return startTier(service);
    if (visiting.has(service)) return startTier(service); // a cycle: fall back rather than loop
    visiting.add(service);
    const deps = (container.dependsOn ?? []).filter((d) => services.has(d));
    const value = deps.length === 0 ? 0 : Math.max(...deps.map(level)) + 1;
    visiting.delete(service);
    levelOf.set(service, value);
    return value;
  };
  const groups = new Map<number, DeploymentContainer[]>();
  for (const c of containers) {
    const l = level(c.service);
    groups.set(l, [...(groups.get(l) ?? []), c]);
  }
  return [...groups.entries()].sort((a, b) => a[0] - b[0]).map(([, group]) => group);
}

export function isRunningState(state: string): boolean {
  return state === 'running' || state === 'restarting' || state === 'paused';
}

/** Stops the running containers, dependents first; returns those it stopped. */
export async function stopContainers(
  engine: DockerEngine,
  containers: DeploymentContainer[],
  onProgress: ProgressListener,
): Promise<DeploymentContainer[]> {
  const stopped: DeploymentContainer[] = [];
  for (const group of startLevels(containers).reverse()) {
    const running = group.filter((c) => isRunningState(c.state));
    const results = await Promise.allSettled(
      running.map(async (c) => {
        await engine.stopContainer(c.id);
        stopped.push(c);
        onProgress({ type: 'container-stopped', service: c.service, name: c.name });
      }),
    );
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw Object.assign(failed.reason as Error, { stoppedSoFar: stopped });
  }
  return stopped;
}

export class StartFailure extends Error {
  constructor(
    readonly failed: { container: DeploymentContainer; error: unknown }[],
  ) {
    super(
      `could not start ${failed.map((f) => f.container.name).join(', ')}: ${failed
        .map((f) => (f.error as Error).message)
        .join('; ')}`,
    );
    this.name = 'StartFailure';
  }
}

/** Starts containers level by level; tries every one (twice) even if some fail. */
export async function startContainers(
  engine: DockerEngine,
  containers: DeploymentContainer[],
  onProgress: ProgressListener,
): Promise<void> {
  const failed: { container: DeploymentContainer; error: unknown }[] = [];
  for (const group of startLevels(containers)) {
    await Promise.all(
      group.map(async (c) => {
        for (let attempt = 1; ; attempt++) {
          try {
            await engine.startContainer(c.id);
            onProgress({ type: 'container-started', service: c.service, name: c.name });
            return;
          } catch (error) {
            if (attempt >= 2) {
              failed.push({ container: c, error });
              onProgress({ type: 'container-start-failed', service: c.service, name: c.name, error: (error as Error).message });
              return;
            }
            await new Promise((resolve) => setTimeout(resolve, 1000));
          }
        }
      }),
    );
  }
  if (failed.length > 0) throw new StartFailure(failed);
}

export interface DowntimeWindow {
  /** First container stopped → last container started, in ms; 0 when nothing was running. */
  downtimeMs: number;
  stopped: DeploymentContainer[];
}

/**
 * Runs `work` with the deployment stopped and always starts again what was running.
 * `now` is injected so tests and callers share one clock.
 */
export async function withDeploymentStopped<T>(
  engine: DockerEngine,
  containers: DeploymentContainer[],
  onProgress: ProgressListener,
  work: (stopped: DeploymentContainer[]) => Promise<T>,
  now: () => number = Date.now,
): Promise<{ result: T; window: DowntimeWindow }> {
  const began = now();
  let stopped: DeploymentContainer[] = [];
  let result: T;
  try {
    onProgress({ type: 'phase', message: 'stopping CVAT' });
    stopped = await stopContainers(engine, containers, onProgress);
    result = await work(stopped);
  } catch (error) {
    const partial = (error as { stoppedSoFar?: DeploymentContainer[] }).stoppedSoFar;
    const toStart = stopped.length > 0 ? stopped : (partial ?? []);
    onProgress({ type: 'phase', message: 'starting CVAT again' });
    try {
      await startContainers(engine, toStart, onProgress);
    } catch (startError) {
      throw new AggregateError([error, startError], `${(error as Error).message}; and ${(startError as Error).message}`, {
        cause: error,
      });
    }
    throw error;
  }
  onProgress({ type: 'phase', message: 'starting CVAT again' });
  await startContainers(engine, stopped, onProgress);
  return { result, window: { downtimeMs: stopped.length > 0 ? now() - began : 0, stopped } };
}

/**
 * Runs `work` with the deployment's running containers frozen (`docker pause`: the cgroup
 * freezer; no process notices, clients see a stall) and always thaws them again, also on error
 * and abort. All are frozen at once: what `work` reads is the state one instant of a power cut
 * would leave. Containers the user had paused stay paused.
 */
export async function withDeploymentFrozen<T>(
  engine: DockerEngine,
  containers: DeploymentContainer[],
  onProgress: ProgressListener,
  work: () => Promise<T>,
  now: () => number = Date.now,
): Promise<{ result: T; window: DowntimeWindow }> {
  const running = containers.filter((c) => c.state === 'running');
  const frozen: DeploymentContainer[] = [];
  const thaw = async (): Promise<void> => {
    const results = await Promise.allSettled(frozen.map((c) => engine.unpauseContainer(c.id)));
    const failed = results.flatMap((r, i) => (r.status === 'rejected' ? [{ container: frozen[i]!, error: r.reason as unknown }] : []));
    if (failed.length > 0) {
      // One more try each, as startContainers does.
      const again = await Promise.allSettled(failed.map((f) => engine.unpauseContainer(f.container.id)));
      const still = failed.filter((_, i) => again[i]!.status === 'rejected');
      if (still.length > 0) throw new StartFailure(still);
    }
    onProgress({ type: 'containers-thawed', count: frozen.length });
  };
  onProgress({ type: 'phase', message: 'freezing CVAT' });
  const began = now();
  let result: T;
  try {
    await Promise.all(
      running.map(async (c) => {
        await engine.pauseContainer(c.id);
        frozen.push(c);
      }),
    );
    onProgress({ type: 'containers-frozen', count: frozen.length });
    result = await work();
  } catch (error) {
    try {
      await thaw();
    } catch (thawError) {
      throw new AggregateError([error, thawError], `${(error as Error).message}; and ${(thawError as Error).message}`, { cause: error });
    }
    throw error;
  }
  await thaw();
  return { result, window: { downtimeMs: frozen.length > 0 ? now() - began : 0, stopped: frozen } };
}
