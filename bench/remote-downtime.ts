/**
 * Benchmark: a two-phase backup's downtime into a remote repository, against the same backup into a
 * local one, same run. The "remote" is a local folder behind a made-up network (FaultyBackend's
 * latency: every request waits up to 2 × BENCH_LATENCY_MS, default 30, no faults), so the numbers
 * show what the cache and the downtime spool save, not one server's speed:
 * - local: the repository folder on this machine (the reference);
 * - remote: through its cache (index, snapshots and trees local; the final pass writes to the spool
 *   and uploads once CVAT runs again);
 * - remote --no-cache: every read and write of the final pass over the network.
 * For each: the first backup (empty repository) and a nightly one (1 % new media), with new files
 * written while phase 1 runs. Target (issue 9): remote downtime ≤ local + 1 s.
 * Usage: npm run build && node dist/bench/remote-downtime.js  (BENCH_MEDIA_MB, default 256)
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, type FixtureDeployment } from '../test/fixture/deployment.js';
import { run } from '../test/fixture/engine.js';
import { table } from '../src/cli/render.js';
import { createDockerEngine } from '../src/docker/engine.js';
import type { Backend } from '../src/backend/backend.js';
import { withCache } from '../src/backend/cache.js';
import { FaultyBackend } from '../src/backend/faulty.js';
import { LocalBackend } from '../src/backend/local.js';
import { Repository } from '../src/repository/repository.js';
import { backupToRepository } from '../src/backup/repository-backup.js';

const MEDIA_MB = Number(process.env['BENCH_MEDIA_MB'] ?? 256);
const LATENCY_MS = Number(process.env['BENCH_LATENCY_MS'] ?? 30);
const KDF = { algorithm: 'scrypt' as const, N: 1024, r: 8, p: 1 };

/** New media while CVAT runs: a 200 kB file every 100 ms. Dies with the containers. */
async function startLoad(f: FixtureDeployment): Promise<() => void> {
  const server = await f.container('cvat_server');
  const child = spawn('docker', ['exec', server, '/bin/sh', '-c', 'd=/home/django/data/data/upload; mkdir -p $d; while true; do head -c 200000 /dev/urandom > $d/$(date +%s%N).jpg; sleep 0.1; done'], {
    stdio: 'ignore',
  });
  return () => child.kill();
}

/** A folder at the far end of a network: no faults, only waiting. */
const far = (dir: string): Backend => new FaultyBackend(new LocalBackend(dir), { random: { seed: 1, probability: {}, latencyMs: 2 * LATENCY_MS } });

const SETUPS: [string, (dir: string, cache: string) => Promise<Backend>][] = [
  ['local', (dir) => Promise.resolve(new LocalBackend(dir))],
  ['remote', (dir, cache) => withCache(far(dir), { dir: cache })],
  ['remote --no-cache', (dir) => Promise.resolve(far(dir))],
];

async function main(): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'cvat-backup-remote-bench-'));
  const f = await createFixtureDeployment({ prefix: 'rb' });
  const engine = createDockerEngine();
  const rows: string[][] = [['', 'downtime', 'final pass', 'upload after']];
  try {
    const media = join(await f.volumePath('cvat_data'), 'data', 'bench');
    await run('sh', ['-c', `mkdir -p ${media} && i=0; while [ $i -lt ${MEDIA_MB} ]; do head -c 1048576 /dev/urandom > ${media}/$i.jpg; i=$((i + 1)); done; chown -R 1000:1000 ${media}`]);
    process.stdout.write(`${MEDIA_MB} MiB media; remote: ${LATENCY_MS} ms a request on average\n`);
    const repos = new Map<string, Repository>();
    for (const [name, open] of SETUPS) repos.set(name, await Repository.init(await open(join(work, name.replace(/\W+/g, '-')), join(work, 'cache')), 'pw', { kdf: KDF }));
    for (const [round, what] of [
      [0, 'first'],
      [1, 'nightly'],
    ] as const) {
      if (round === 1) await run('sh', ['-c', `for i in $(seq 1 ${Math.max(1, Math.round(MEDIA_MB / 100))}); do head -c 1048576 /dev/urandom > ${media}/day-$i.jpg; done`]);
      for (const [name] of SETUPS) {
        await f.waitForDatabase();
        const stop = await startLoad(f);
        let uploadStarted = 0;
        let phaseAfter = 0;
        try {
          const result = await backupToRepository(engine, repos.get(name)!, {
            project: f.project,
            onProgress: (e) => {
              if (e.type === 'phase' && e.message.startsWith('uploading')) uploadStarted = Date.now();
              if (e.type === 'phase' && e.message === 'writing index') phaseAfter = Date.now();
            },
          });
          const final = result.passes.find((p) => p.name === 'final')!;
          const upload = uploadStarted > 0 ? `${((phaseAfter - uploadStarted) / 1000).toFixed(2)} s` : '-';
          rows.push([`${what}: ${name}`, `${(result.snapshot.downtimeMs / 1000).toFixed(2)} s`, `${(final.durationMs / 1000).toFixed(2)} s`, upload]);
          process.stdout.write(`  ${rows.at(-1)!.join('  ')}\n`);
        } finally {
          stop();
        }
      }
    }
  } finally {
    await f.destroy();
    await rm(work, { recursive: true, force: true });
  }
  process.stdout.write(`\n${table(rows)}\n`);
}

await main();
