/**
 * Benchmark: downtime of a backup, same run, at 1x and 4x media size (BENCH_MEDIA_MB, default
 * 1024: 1 GiB and 4 GiB of incompressible 1 MiB media files, plus a pgbench database).
 *
 * For each size, with a light write load (files added in cvat_data, rows inserted) running while
 * CVAT runs, measures the time CVAT is unavailable:
 * - the floor: `docker compose stop` + `docker compose start` with nothing else to do;
 * - the guide's procedure (stop, one tar.gz helper container per volume, start);
 * - `cvat-backup backup --mode offline` (stop for the whole copy);
 * - `cvat-backup backup` (two-phase, the default);
 * - `cvat-backup backup --freeze` (containers frozen, never restarted).
 * Each mode runs twice on its own repository: the first backup (everything to copy: where
 * stopping for the copy hurts most) and a nightly one after a day's new media (1 % of the files).
 * Target: two-phase downtime ≤ floor + 3 s at both sizes. Usage: npm run bench:downtime
 *
 * Files axis (issue 10): BENCH_FILES=200000[,1000000] writes that many small files (folders of
 * 1000, like bench/many-files.ts) instead of the 1 MiB media; the nightly backup then adds 1 % new
 * small files. Two-phase and --freeze then also run with CVAT_BACKUP_NATIVE=off (no change
 * journal: the final pass walks every file, as before issue 10), same run (BENCH_WALK=0: not).
 */
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, type FixtureDeployment } from '../test/fixture/deployment.js';
import { run } from '../test/fixture/engine.js';
import { BIN } from '../test/fixture/cli.js';
import { table } from '../src/cli/render.js';
import { createDockerEngine } from '../src/docker/engine.js';
import { discoverDeployment } from '../src/deployment/discover.js';
import { withDeploymentStopped } from '../src/deployment/lifecycle.js';
import { runBench } from './measure.js';
import { guideBackup, timed } from './guide.js';

const BASE_MB = Number(process.env['BENCH_MEDIA_MB'] ?? 1024);
const DB_SCALE = Number(process.env['BENCH_DB_SCALE'] ?? 10);
const SIZES = (process.env['BENCH_SIZES'] ?? '1,4').split(',').map(Number);
const FILE_COUNTS = process.env['BENCH_FILES']?.split(',').map(Number);
const WALK = (process.env['BENCH_WALK'] ?? (FILE_COUNTS ? '1' : '0')) === '1';

/** What one row measures: media as 1 MiB files (a factor of BASE_MB), or as many small files. */
type Axis = { kind: 'bytes'; factor: number } | { kind: 'files'; count: number };

/**
 * `count` small files in folders of 1000 under `dir`, from `first` on (a multiple of 1000), written
 * from the host and given to CVAT's user. Only the new folders are chowned: a chown of the others
 * would change every file's ctime, so the next backup would read them all again.
 */
async function writeSmallFiles(dir: string, count: number, first = 0): Promise<void> {
  const folders: string[] = [];
  for (let d = 0; d * 1000 < count; d++) {
    const folder = join(dir, String(Math.floor(first / 1000) + d));
    await mkdir(folder, { recursive: true });
    folders.push(folder);
    const writes: Promise<void>[] = [];
    for (let i = d * 1000; i < Math.min(count, (d + 1) * 1000); i++) writes.push(writeFile(join(folder, `frame_${first + i}.json`), `{"frame": ${first + i}}\n`));
    await Promise.all(writes);
  }
  if (first === 0) folders.splice(0, folders.length, dir);
  for (let i = 0; i < folders.length; i += 100) await run('chown', ['-R', '1000:1000', ...folders.slice(i, i + 100)]);
}

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

type Result = {
  downtimeMs: number;
  passes: { name: string; durationMs: number; bytesRead: number; filesRead: number; journal?: { used: string[]; walked: { volume: string; reason: string }[] } }[];
};

interface Row {
  size: string;
  floor: number;
  composeFloor: number;
  guide: number;
  first: Record<string, number>;
  nightly: Record<string, number>;
  /** The final pass (CVAT stopped or frozen) of the nightly backup, per mode. */
  nightlyFinal: Record<string, number>;
}

/** Mode name, arguments, and whether the change journal is turned off (the walk, as before issue 10). */
const MODES: (readonly [string, readonly string[], boolean])[] = [
  ['offline', ['--mode', 'offline'], false],
  ['two-phase', [], false],
  ['freeze', ['--freeze'], false],
  ...(WALK
    ? ([
        ['two-phase, walk', [], true],
        ['freeze, walk', ['--freeze'], true],
      ] as const)
    : []),
];

async function measureSize(axis: Axis): Promise<Row> {
  const mediaMb = axis.kind === 'bytes' ? BASE_MB * axis.factor : 0;
  const work = await mkdtemp(join(tmpdir(), 'cvat-backup-downtime-'));
  const f = await createFixtureDeployment({ prefix: 'dt' });
  const walkOf = new Map(MODES.map(([mode, , walk]) => [mode, walk]));
  const envFor = (mode: string): NodeJS.ProcessEnv => ({
    ...process.env,
    CVAT_BACKUP_REPO: join(work, `repo-${mode.replace(/\W+/g, '-')}`),
    CVAT_BACKUP_PASSWORD: 'bench-pw',
    ...(walkOf.get(mode) ? { CVAT_BACKUP_NATIVE: 'off' } : {}),
  });
  const backup = async (mode: string, args: readonly string[]): Promise<Result> => {
    await f.waitForDatabase();
    const stop = await startLoad(f);
    try {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const r = await run(process.execPath, [BIN, '--project', f.project, '--json', 'backup', ...args], { env: envFor(mode) });
      const result = JSON.parse(r.stdout) as Result;
      const journal = result.passes.find((p) => p.journal)?.journal;
      process.stdout.write(
        `  ${mode}: downtime ${(result.downtimeMs / 1000).toFixed(2)} s; ${result.passes.map((p) => `${p.name} ${(p.durationMs / 1000).toFixed(2)} s / ${p.filesRead} files / ${(p.bytesRead / 2 ** 20).toFixed(0)} MiB`).join(', ')}` +
          `${journal ? `; journal: ${journal.used.join(', ') || 'none'}${journal.walked.length ? ` (walked: ${journal.walked.map((w) => `${w.volume}: ${w.reason}`).join('; ')})` : ''}` : ''}\n`,
      );
      return result;
    } finally {
      stop();
    }
  };
  try {
    const mediaDir = join(await f.volumePath('cvat_data'), 'data', 'bench');
    if (axis.kind === 'bytes') {
      process.stdout.write(`\n${axis.factor}x: ${mediaMb} MiB media in ${mediaMb} files, pgbench scale ${DB_SCALE}\n`);
      await run('sh', ['-c', `mkdir -p ${mediaDir} && cd ${mediaDir} && i=0; while [ $i -lt ${mediaMb} ]; do d=$((i / 250)); mkdir -p $d; head -c 1048576 /dev/urandom > $d/frame_$i.jpg; i=$((i + 1)); done; chown -R 1000:1000 ${mediaDir}`]);
    } else {
      process.stdout.write(`\n${axis.count} small files in folders of 1000, pgbench scale ${DB_SCALE}\n`);
      await writeSmallFiles(mediaDir, axis.count);
    }
    await f.exec('cvat_db', `su postgres -s /bin/sh -c '/usr/lib/postgresql/15/bin/pgbench -q -i -s ${DB_SCALE} -h /var/run/postgresql cvat' >/dev/null 2>&1`);
    await f.psql('CREATE TABLE bench_load (id serial PRIMARY KEY, note text);');

    // The floor: stop and start the project with nothing to do, the way cvat-backup does it (in
    // dependency order, each level in parallel) and the way compose does it.
    const engine = createDockerEngine();
    const deployment = await discoverDeployment(engine, { project: f.project });
    const floor = await timed(() => withDeploymentStopped(engine, deployment.containers, () => undefined, () => Promise.resolve()));
    await f.waitForDatabase();
    const composeFloor = await timed(async () => {
      await f.compose(['stop']);
      await f.compose(['start']);
    });
    await f.waitForDatabase();
    process.stdout.write(`  floor: ${(floor.ms / 1000).toFixed(1)} s (docker compose stop + start: ${(composeFloor.ms / 1000).toFixed(1)} s)\n`);

    const guideDir = join(work, 'guide');
    await run('mkdir', ['-p', guideDir]);
    const stopLoad = await startLoad(f);
    const guide = await timed(() => guideBackup(f, guideDir));
    stopLoad();
    await rm(guideDir, { recursive: true, force: true });
    process.stdout.write(`  guide's procedure: ${(guide.ms / 1000).toFixed(1)} s\n`);

    const first: Record<string, number> = {};
    const nightly: Record<string, number> = {};
    const nightlyFinal: Record<string, number> = {};
    process.stdout.write('  first backup (empty repository):\n');
    for (const [mode, args] of MODES) {
      await run(process.execPath, [BIN, 'init'], { env: envFor(mode) });
      first[mode] = (await backup(mode, args)).downtimeMs;
    }
    process.stdout.write(`  nightly backup (1 % new ${axis.kind === 'bytes' ? 'media' : 'files'} since the last snapshot):\n`);
    let day = 1;
    let next = axis.kind === 'files' ? Math.ceil(axis.count / 1000) * 1000 : 0;
    for (const [mode, args] of MODES) {
      if (axis.kind === 'bytes') await addDayOfMedia(mediaDir, mediaMb, day++);
      else {
        const n = Math.max(1, Math.round(axis.count * 0.01));
        await writeSmallFiles(mediaDir, n, next);
        next += Math.ceil(n / 1000) * 1000;
      }
      const result = await backup(mode, args);
      nightly[mode] = result.downtimeMs;
      nightlyFinal[mode] = result.passes.find((p) => p.name === 'final')?.durationMs ?? NaN;
    }
    const size = axis.kind === 'bytes' ? `${axis.factor}x (${(mediaMb / 1024).toFixed(1)} GiB)` : `${axis.count >= 1e6 ? `${axis.count / 1e6} M` : `${axis.count / 1000} k`} files`;
    return { size, floor: floor.ms, composeFloor: composeFloor.ms, guide: guide.ms, first, nightly, nightlyFinal };
  } finally {
    await f.destroy();
    await rm(work, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const rows: Row[] = [];
  const axes: Axis[] = FILE_COUNTS ? FILE_COUNTS.map((count) => ({ kind: 'files', count })) : SIZES.map((factor) => ({ kind: 'bytes', factor }));
  for (const axis of axes) rows.push(await measureSize(axis));
  const s = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
  process.stdout.write('\ndowntime (CVAT unavailable), same run, with a light write load while CVAT runs:\n\n');
  const lines: string[][] = [['', ...rows.map((r) => r.size)]];
  lines.push(['floor: stop + start, nothing else', ...rows.map((r) => `${s(r.floor)} (compose ${s(r.composeFloor)})`)]);
  lines.push(["guide's procedure", ...rows.map((r) => s(r.guide))]);
  const label = (mode: string): string =>
    ({ offline: '--mode offline', 'two-phase': 'two-phase (default)', freeze: '--freeze', 'two-phase, walk': 'two-phase, no journal', 'freeze, walk': '--freeze, no journal' })[mode] ?? mode;
  for (const kind of ['first', 'nightly'] as const) {
    for (const [mode] of MODES) lines.push([`${kind} backup, ${label(mode)}`, ...rows.map((r) => s(r[kind][mode]!))]);
  }
  for (const [mode] of MODES.filter(([m]) => m !== 'offline')) lines.push([`nightly final pass, ${label(mode)}`, ...rows.map((r) => s(r.nightlyFinal[mode]!))]);
  if (WALK) {
    lines.push(['nightly two-phase downtime: journal / no journal', ...rows.map((r) => (r.nightly['two-phase']! / r.nightly['two-phase, walk']!).toFixed(3))]);
    lines.push(['nightly frozen time: journal / no journal', ...rows.map((r) => (r.nightly['freeze']! / r.nightly['freeze, walk']!).toFixed(3))]);
  }
  lines.push([
    'two-phase ≤ floor + 3 s (first, nightly)',
    ...rows.map((r) => `${r.first['two-phase']! <= r.floor + 3000 ? 'met' : 'NOT met'}, ${r.nightly['two-phase']! <= r.floor + 3000 ? 'met' : 'NOT met'}`),
  ]);
  lines.push(["two-phase / guide's (first backup)", ...rows.map((r) => (r.first['two-phase']! / r.guide).toFixed(3))]);
  lines.push(["--freeze / guide's (first backup)", ...rows.map((r) => (r.first['freeze']! / r.guide).toFixed(3))]);
  process.stdout.write(`${table(lines)}\n`);
}

runBench(main);
