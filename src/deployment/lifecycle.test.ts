import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { DockerEngine } from '../docker/engine.js';
import type { DeploymentContainer } from './discover.js';
import { startLevels, withDeploymentStopped } from './lifecycle.js';

function container(service: string, dependsOn?: string[], state: DeploymentContainer['state'] = 'running'): DeploymentContainer {
  return { id: `id-${service}`, name: `cvat-${service}`, service, state, image: 'img', imageId: 'sha', dependsOn };
}

/** Records the order of stop/start calls; the part of an engine lifecycle needs. */
function recordingEngine(failStart: Set<string> = new Set()): { engine: DockerEngine; calls: string[] } {
  const calls: string[] = [];
  const engine = {
    stopContainer: (id: string) => {
      calls.push(`stop ${id}`);
      return Promise.resolve();
    },
    startContainer: (id: string) => {
      calls.push(`start ${id}`);
      return failStart.has(id) ? Promise.reject(new Error(`cannot start ${id}`)) : Promise.resolve();
    },
  } as unknown as DockerEngine;
  return { engine, calls };
}

void describe('startLevels', () => {
  void it("uses CVAT's tiers when compose recorded no depends_on", () => {
    const levels = startLevels([container('cvat_ui'), container('cvat_server'), container('cvat_db'), container('cvat_worker_import'), container('traefik')]);
    assert.deepEqual(
      levels.map((l) => l.map((c) => c.service).sort()),
      [['cvat_db'], ['cvat_server', 'cvat_worker_import'], ['cvat_ui', 'traefik']],
    );
  });

  void it('follows com.docker.compose.depends_on when present', () => {
    const levels = startLevels([
      container('a', ['b']),
      container('b', ['c']),
      container('c', []),
      container('d', ['c']),
    ]);
    assert.deepEqual(levels.map((l) => l.map((c) => c.service).sort()), [['c'], ['b', 'd'], ['a']]);
  });
});

void describe('withDeploymentStopped', () => {
  const deployment = [container('cvat_ui'), container('cvat_server'), container('cvat_db'), container('cvat_opa', undefined, 'exited')];

  void it('stops dependents first, starts in reverse, leaves stopped containers stopped', async () => {
    const { engine, calls } = recordingEngine();
    let clock = 1000;
    const { window } = await withDeploymentStopped(engine, deployment, () => undefined, () => Promise.resolve((clock += 500)), () => clock);
    assert.deepEqual(calls, ['stop id-cvat_ui', 'stop id-cvat_server', 'stop id-cvat_db', 'start id-cvat_db', 'start id-cvat_server', 'start id-cvat_ui']);
    assert.equal(window.downtimeMs, 500);
  });

  void it('starts everything again when the work fails, and rethrows', async () => {
    const { engine, calls } = recordingEngine();
    await assert.rejects(
      withDeploymentStopped(engine, deployment, () => undefined, () => Promise.reject(new Error('disk full'))),
      /disk full/,
    );
    assert.deepEqual(calls.filter((c) => c.startsWith('start')), ['start id-cvat_db', 'start id-cvat_server', 'start id-cvat_ui']);
  });

  void it('reports both the failure and the containers it could not start', async () => {
    const { engine } = recordingEngine(new Set(['id-cvat_server']));
    await assert.rejects(
      withDeploymentStopped(engine, deployment, () => undefined, () => Promise.reject(new Error('disk full'))),
      (error: unknown) => error instanceof AggregateError && /disk full.*could not start cvat-cvat_server/.test(error.message),
    );
  });
});
