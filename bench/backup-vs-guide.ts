/**
 * Benchmark: `cvat-backup backup --to` against the guide's procedure on the same data, same run.
 *
 * Reference deployment: the test fixture plus BENCH_MEDIA_MB of incompressible media in 1 MiB
 * files (camera images do not compress) and a PostgreSQL database grown with pgbench
 * (BENCH_DB_SCALE, ~15 MB per unit). The guide's procedure is run literally: `docker compose stop`,
 * one `docker run --rm --volumes-from … tar -czvf` per volume (its three, plus keys, logs and the
 * redis volume so both sides archive the same data), `docker compose start`.
 *
 * Prints wall times, archive sizes and ratios. Usage: npm run bench
 */
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment } from '../test/fixture/deployment.js';
import { run } from '../test/fixture/engine.js';
import { BIN } from '../test/fixture/cli.js';
import { runBench } from './measure.js';
import { guideBackup, timed } from './guide.js';

const MEDIA_MB = Number(process.env['BENCH_MEDIA_MB'] ?? 2048);
const DB_SCALE = Number(process.env['BENCH_DB_SCALE'] ?? 20);

async function dirBytes(dir: string): Promise<number> {
  let total = 0;
  for (const name of await readdir(dir)) total += (await stat(join(dir, name))).size;
  return total;
}

async function main(): Promise<void> {
  process.stdout.write(`reference deployment: ${MEDIA_MB} MiB media, pgbench scale ${DB_SCALE}\n`);
  const f = await createFixtureDeployment({ prefix: 'bench' });
  const work = await mkdtemp(join(tmpdir(), 'cvat-backup-bench-'));
  try {
    await f.exec(
      'cvat_server',
      `set -e; mkdir -p /home/django/data/data/bench; cd /home/django/data/data/bench
       i=0; while [ $i -lt ${MEDIA_MB} ]; do d=$((i / 500)); mkdir -p $d; head -c 1048576 /dev/urandom > $d/frame_$i.jpg; i=$((i + 1)); done
       chown -R 1000:1000 /home/django/data`,
    );
    await f.exec('cvat_db', `su postgres -s /bin/sh -c '/usr/lib/postgresql/15/bin/pgbench -q -i -s ${DB_SCALE} -h /var/run/postgresql cvat' >/dev/null 2>&1`);
    await f.psql('CHECKPOINT;');
    await run('sync', []);
    const dbSize = (await f.psql(`SELECT pg_size_pretty(pg_database_size('cvat'));`)).trim();
    process.stdout.write(`data ready: database ${dbSize}\n\n`);

    // Warm the page cache equally for both: the first read of the data is done by neither.
    await run('sh', ['-c', `cat ${await f.volumePath('cvat_data')}/data/bench/*/* > /dev/null; cat $(find ${await f.volumePath('cvat_db')} -type f) > /dev/null`]);

    const guideDir = join(work, 'guide');
    await run('mkdir', ['-p', guideDir]);
    const guide = await timed(() => guideBackup(f, guideDir));
    const results: { label: string; ms: number; downtimeMs: number; bytes: number }[] = [];
    for (const via of ['host', 'engine'] as const) {
      const dir = join(work, `ours-${via}`);
      const ours = await timed(() => run(process.execPath, [BIN, '--project', f.project, '--json', 'backup', '--to', dir, '--via', via]));
      const json = JSON.parse(ours.value.stdout) as { downtimeMs: number };
      results.push({ label: `cvat-backup --via ${via}`, ms: ours.ms, downtimeMs: json.downtimeMs, bytes: await dirBytes(dir) });
      await rm(dir, { recursive: true, force: true });
    }

    const guideBytes = await dirBytes(guideDir);
    const rows = [
      ['', 'wall time', 'archive size', 'time ratio vs guide'],
      ["guide's procedure", `${(guide.ms / 1000).toFixed(1)} s`, `${(guideBytes / 2 ** 20).toFixed(0)} MiB`, '1.00'],
      ...results.map((r) => [
        r.label,
        `${(r.ms / 1000).toFixed(1)} s (downtime ${(r.downtimeMs / 1000).toFixed(1)} s)`,
        `${(r.bytes / 2 ** 20).toFixed(0)} MiB`,
        (r.ms / guide.ms).toFixed(2),
      ]),
    ];
    for (const r of rows) process.stdout.write(`${r[0]!.padEnd(26)}${r[1]!.padEnd(32)}${r[2]!.padEnd(14)}${r[3]}\n`);
    for (const r of results) process.stdout.write(`speed-up ${r.label}: ${(guide.ms / r.ms).toFixed(1)}x (target: at least 2x)\n`);
  } finally {
    await f.destroy();
    await rm(work, { recursive: true, force: true });
  }
}

runBench(main);
