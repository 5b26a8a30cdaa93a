/**
 * `status` finds the deployment through the engine alone: the project by compose labels, every
 * named volume with its mount, bind mounts with the reason they are left out, and the CVAT version
 * from the image tag, or from cvat/__init__.py inside the (stopped) server container.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createFixtureDeployment, type FixtureDeployment } from './fixture/deployment.js';
import { SERVER_DEV_IMAGE, run } from './fixture/engine.js';
import { runCli } from './fixture/cli.js';

interface StatusJson {
  project: string;
  containers: { service: string; state: string }[];
  volumes: { composeName: string; name: string; mountPath: string; mountedBy: string[]; backedUpByDefault: boolean }[];
  binds: { service: string; destination: string; reason: string }[];
  version: { version: string | null; source: string };
}

async function status(args: string[]): Promise<StatusJson> {
  const r = await runCli(['--json', ...args, 'status']);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as StatusJson;
}

describe('status', () => {
  let release: FixtureDeployment;
  let dev: FixtureDeployment;

  before(async () => {
    release = await createFixtureDeployment({ prefix: 'st', seed: false });
    dev = await createFixtureDeployment({ prefix: 'sd', seed: false, serverImage: SERVER_DEV_IMAGE });
  });
  after(async () => {
    await release?.destroy();
    await dev?.destroy();
  });

  it('lists containers, every named volume with its real name and mount, and bind mounts with reasons', async () => {
    const s = await status(['--project', release.project]);
    assert.equal(s.project, release.project);
    assert.equal(s.containers.length, 9);
    assert.ok(s.containers.every((c) => c.state === 'running'));
    const mounts = Object.fromEntries(s.volumes.map((v) => [v.composeName, v.mountPath]));
    assert.deepEqual(mounts, {
      cvat_cache_db: '/var/lib/kvrocks',
      cvat_data: '/home/django/data',
      cvat_db: '/var/lib/postgresql/data',
      cvat_events_db: '/var/lib/clickhouse',
      cvat_inmem_db: '/data',
      cvat_keys: '/home/django/keys',
      cvat_logs: '/home/django/logs',
    });
    assert.equal(s.volumes.find((v) => v.composeName === 'cvat_db')?.name, `${release.project}_cvat_db`);
    assert.deepEqual(s.volumes.find((v) => v.composeName === 'cvat_data')?.mountedBy, ['cvat_server', 'cvat_worker_annotation', 'cvat_worker_import']);
    assert.equal(s.volumes.find((v) => v.composeName === 'cvat_cache_db')?.backedUpByDefault, false);
    const share = s.binds.find((b) => b.destination === '/home/django/share');
    assert.match(share?.reason ?? '', /not CVAT's data/);
    assert.deepEqual(s.version, { ...s.version, version: '2.73.0', source: 'image-tag' });

    const table = await runCli(['--project', release.project, 'status']);
    assert.match(table.stdout, /CVAT\s+2\.73\.0 \(from image tag cvat\/server:v2\.73\.0\)/);
    assert.match(table.stdout, /cvat_cache_db .* no: regenerable chunk cache \(--include-cache\)/);
  });

  it('reads the version from cvat/__init__.py of a dev image, also with every container stopped', async () => {
    await dev.compose(['stop', '-t', '2']);
    const s = await status(['--project', dev.project]);
    assert.ok(s.containers.every((c) => c.state === 'exited'), JSON.stringify(s.containers));
    assert.equal(s.version.version, '2.74.0-alpha');
    assert.equal(s.version.source, 'version-file');
  });

  it('without --project, refuses to guess between several CVAT projects', async () => {
    const r = await runCli(['status']);
    assert.equal(r.code, 4, r.stderr);
    assert.match(r.stderr, /several CVAT compose projects found .*--project/);
    assert.match(r.stderr, new RegExp(release.project));
  });

  it('without --project, picks the only CVAT project', async () => {
    await dev.destroy();
    const others = (await run('docker', ['ps', '-a', '--format', '{{.Image}} {{.Label "com.docker.compose.project"}}'])).stdout
      .split('\n')
      .filter((l) => l.startsWith('cvat/server') && !l.endsWith(release.project));
    assert.deepEqual(others, [], 'this test needs the engine to itself (other CVAT projects are running)');
    const s = await status([]);
    assert.equal(s.project, release.project);
  });
});
