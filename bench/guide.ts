/** The guide's backup procedure, run literally, for the benchmarks to measure against. */
import { SERVER_IMAGE, run } from '../test/fixture/engine.js';
import type { FixtureDeployment } from '../test/fixture/deployment.js';

export const VOLUMES = [
  { volume: 'cvat_db', service: 'cvat_db', path: '/var/lib/postgresql/data' },
  { volume: 'cvat_data', service: 'cvat_server', path: '/home/django/data' },
  { volume: 'cvat_keys', service: 'cvat_server', path: '/home/django/keys' },
  { volume: 'cvat_logs', service: 'cvat_server', path: '/home/django/logs' },
  { volume: 'cvat_events_db', service: 'cvat_clickhouse', path: '/var/lib/clickhouse' },
  { volume: 'cvat_inmem_db', service: 'cvat_redis_inmem', path: '/data' },
] as const;

export async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const start = process.hrtime.bigint();
  const value = await fn();
  return { ms: Number(process.hrtime.bigint() - start) / 1e6, value };
}

export async function guideBackup(f: FixtureDeployment, dir: string): Promise<void> {
  await f.compose(['stop']);
  for (const v of VOLUMES) {
    await run('docker', [
      'run', '--rm', '--network', 'none', '--volumes-from', await f.container(v.service),
      '-v', `${dir}:/backup`, '-v', '/usr:/usr:ro', SERVER_IMAGE,
      'tar', '-czvf', `/backup/${v.volume}.tar.gz`, v.path,
    ]);
  }
  await f.compose(['start']);
}

