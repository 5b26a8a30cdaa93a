/**
 * Benchmark: downtime of a backup, same run, at 1x and 4x media size (BENCH_MEDIA_MB, default
 * 1024: 1 GiB and 4 GiB of incompressible 1 MiB media files, plus a pgbench database).
 *
 * For each size, with a light write load (files added in cvat_data, rows inserted) running while
 * CVAT runs, measures the time CVAT is unavailable:
 * - the floor: `docker compose stop` + `docker compose start` with nothing else to do;
 * - the guide's procedure (stop, one tar.gz helper container per volume, start);
 * - `cvat-backup backup --mode offline` (stop for the whole copy; a parent snapshot exists);
 * - `cvat-backup backup` (two-phase, the default);
 * - `cvat-backup backup --freeze` (containers frozen, never restarted).
 * Each backup starts from a repository that already holds yesterday's snapshot, as a nightly run
 * does, and after a day's worth of new media (1 % of the files). Target: two-phase downtime ≤
 * floor + 3 s at both sizes. Usage: npm run bench:downtime
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, type FixtureDeployment } from '../test/fixture/deployment.js';
import { run } from '../test/fixture/engine.js';
import { BIN } from '../test/fixture/cli.js';
import { table } from '../src/cli/render.js';
import { runBench } from './measure.js';
import { guideBackup, timed } from './guide.js';

const BASE_MB = Number(process.env['BENCH_MEDIA_MB'] ?? 1024);
const DB_SCALE = Number(process.env['BENCH_DB_SCALE'] ?? 10);
const SIZES = (process.env['BENCH_SIZES'] ?? '1,4').split(',').map(Number);

/** Light write load while CVAT runs: a media file every 100 ms and a row every ~50 ms. Dies with the containers. */
async function startLoad(f: FixtureDeployment): Promise<() => void> {
  const server = await f.container('cvat_server');
  const db = await f.container('cvat_db');
  const children = [
    spawn('docker', ['exec', server, '/bin/sh', '-c', 'd=/home/django/data/data/upload; mkdir -p $d; while true; do head -c 200000 /dev/urandom > $d/$(date +%s%N).jpg; sleep 0.1; done'], { stdio: 'ignore' }),
    spawn('docker', ['exec', db, '/bin/sh', '-c', `while true; do su postgres -s /bin/sh -c "/usr/lib/postgresql/15/bin/psql -X -q -h /var/run/postgresql -d cvat -c 'INSERT INTO bench_load (note) VALUES (now()::text)'"; sleep 0.05; done`], { stdio: 'ignore' }),
  ];
  return () => children.forEach((c) => c.kill());
}

async function addDayOfMedia(mediaDir: string, files: number, day: number): Promise<void> {
  const n = Math.max(1, Math.round(files * 0.01));
  await run('sh', ['-c', `mkdir -p ${mediaDir}/day${day} && for i in $(seq 1 ${n}); do head -c 1048576 /dev/urandom > ${mediaDir}/day${day}/$i.jpg; done; chown -R 1000:1000 ${mediaDir}/day${day}`]);
}

interface Row {
  size: string;
  floor: number;
  guide: number;
  offline: number;
  twoPhase: number;
  freeze: number;
  twoPhaseDelta: number;
}

async function measureSize(factor: number): Promise<Row> {
  const mediaMb = BASE_MB * factor;
  const work = await mkdtemp(join(tmpdir(), 'cvat-backup-downtime-'));
  const f = await createFixtureDeployment({ prefix: 'dt' });
  const env = { ...process.env, CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'bench-pw' };
  const cli = async (args: string[]): Promise<{ downtimeMs: number; passes: { name: string; durationMs: number; bytesRead: number }[] }> => {
    const r = await run(process.execPath, [BIN, '--project', f.project, '--json', ...args], { env });
    return JSON.parse(r.stdout) as { downtimeMs: number; passes: { name: string; durationMs: number; bytesRead: number }[] };
  };
  try {
    const mediaDir = join(await f.volumePath('cvat_data'), 'data', 'bench');
    process.stdout.write(`\n${factor}x: ${mediaMb} MiB media in ${mediaMb} files, pgbench scale ${DB_SCALE}\n`);
    await run('sh', ['-c', `mkdir -p ${mediaDir} && cd ${mediaDir} && i=0; while [ $i -lt ${mediaMb} ]; do d=$((i / 250)); mkdir -p $d; head -c 1048576 /dev/urandom > $d/frame_$i.jpg; i=$((i + 1)); done; chown -R 1000:1000 ${mediaDir}`]);
    await f.exec('cvat_db', `su postgres -s /bin/sh -c '/usr/lib/postgresql/15/bin/pgbench -q -i -s ${DB_SCALE} -h /var/run/postgresql cvat' >/dev/null 2>&1`);
    await f.psql('CREATE TABLE bench_load (id serial PRIMARY KEY, note text);');
    await run(process.execPath, [BIN, 'init'], { env });
    await cli(['backup', '--mode', 'offline']); // yesterday's snapshot

    const floor = await timed(async () => {
      await f.compose(['stop']);
      await f.compose(['start']);
    });
    await f.waitForDatabase();
    process.stdout.write(`  floor (compose stop + start): ${(floor.ms / 1000).toFixed(1)} s\n`);

    const guideDir = join(work, 'guide');
    await run('mkdir', ['-p', guideDir]);
    let stop = await startLoad(f);
    const guide = await timed(() => guideBackup(f, guideDir));
    stop();
    await rm(guideDir, { recursive: true, force: true });
    await f.waitForDatabase();
    process.stdout.write(`  guide's procedure: ${(guide.ms / 1000).toFixed(1)} s\n`);

    const results: Record<string, { downtimeMs: number; passes: { name: string; durationMs: number; bytesRead: number }[] }> = {};
    let day = 1;
    for (const [label, args] of [
      ['offline', ['backup', '--mode', 'offline']],
      ['two-phase', ['backup']],
      ['freeze', ['backup', '--freeze']],
    ] as const) {
      await addDayOfMedia(mediaDir, mediaMb, day++);
      await f.waitForDatabase();
      stop = await startLoad(f);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      results[label] = await cli([...args]);
      stop();
      const r = results[label];
      process.stdout.write(
        `  ${label}: downtime ${(r.downtimeMs / 1000).toFixed(2)} s; ${r.passes.map((p) => `${p.name} ${(p.durationMs / 1000).toFixed(2)} s / ${(p.bytesRead / 2 ** 20).toFixed(0)} MiB`).join(', ')}\n`,
      );
    }
    const delta = results['two-phase']!.passes.find((p) => p.name === 'final')!;
    return {
      size: `${factor}x (${(mediaMb / 1024).toFixed(1)} GiB media)`,
      floor: floor.ms,
      guide: guide.ms,
      offline: results['offline']!.downtimeMs,
      twoPhase: results['two-phase']!.downtimeMs,
      freeze: results['freeze']!.downtimeMs,
      twoPhaseDelta: delta.durationMs,
    };
  } finally {
    await f.destroy();
    await rm(work, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const rows: Row[] = [];
  for (const factor of SIZES) rows.push(await measureSize(factor));
  const s = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
  process.stdout.write('\ndowntime (CVAT unavailable), same run:\n\n');
  process.stdout.write(
    `${table([
      ['size', 'floor (stop+start)', "guide's procedure", '--mode offline', 'two-phase (default)', '--freeze', 'two-phase − floor', 'target ≤ floor + 3 s'],
      ...rows.map((r) => [
        r.size,
        s(r.floor),
        s(r.guide),
        s(r.offline),
        s(r.twoPhase),
        s(r.freeze),
        s(r.twoPhase - r.floor),
        r.twoPhase <= r.floor + 3000 ? 'met' : 'NOT met',
      ]),
    ])}\n`,
  );
  for (const r of rows) {
    process.stdout.write(`${r.size}: two-phase downtime is ${(r.twoPhase / r.guide).toFixed(3)} of the guide's, --freeze ${(r.freeze / r.guide).toFixed(3)}\n`);
  }
}

runBench(main);
