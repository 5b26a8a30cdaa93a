/**
 * Benchmark: time and peak memory of backups as the number of files grows, cvat-backup against
 * restic in the same run. BENCH_FILES (default "10000,1000000") small files are written in folders
 * of 1000 into the media volume of a fresh fixture deployment. Both tools back up all volumes with
 * CVAT stopped around them, stop and start counted for both: ours as `backup --mode offline`,
 * restic as `docker compose stop` + `restic backup` + `docker compose start`.
 *
 * For each count: the first backup (empty repository), a backup with nothing changed (issue 10:
 * ours ≤ 0.5× restic), then a nightly backup in our default mode (two-phase, change journal) after
 * 1 % new files, for its peak memory (issue 10: ≤ 300 MiB at 2 M files, first and nightly).
 *
 * Usage: npm run bench:files   (BENCH_FILES=1000000,2000000 for issue 10's rows)
 */
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, type FixtureDeployment } from '../test/fixture/deployment.js';
import { run } from '../test/fixture/engine.js';
import { BIN } from '../test/fixture/cli.js';
import { table } from '../src/cli/render.js';
import { measure, runBench, type Measure } from './measure.js';

const COUNTS = (process.env['BENCH_FILES'] ?? '10000,1000000').split(',').map(Number);
const VOLUMES = ['cvat_db', 'cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];

/** `count` small files in folders of 1000 under `root`, folder names from `first / 1000` on. */
async function writeFiles(root: string, count: number, first = 0): Promise<void> {
  for (let d = 0; d * 1000 < count; d++) {
    const folder = join(root, String(first / 1000 + d));
    await mkdir(folder, { recursive: true });
    const writes: Promise<void>[] = [];
    for (let i = d * 1000; i < Math.min(count, (d + 1) * 1000); i++) writes.push(writeFile(join(folder, `f${first + i}.json`), `{"frame": ${first + i}}\n`));
    await Promise.all(writes);
  }
}

/** restic in our mode: the project stopped around it, stop and start counted. */
async function resticStopped(f: FixtureDeployment, folders: string[], env: NodeJS.ProcessEnv): Promise<Measure> {
  const start = process.hrtime.bigint();
  await f.compose(['stop']);
  try {
    const r = await measure('restic', ['backup', '-q', ...folders], env);
    return { seconds: Number(process.hrtime.bigint() - start) / 1e9, maxRssMiB: r.maxRssMiB };
  } finally {
    await f.compose(['start']);
  }
}

interface Row {
  count: number;
  first: [Measure, Measure];
  unchanged: [Measure, Measure];
  nightly: Measure;
}

async function main(): Promise<void> {
  const rows: Row[] = [];
  const say = (label: string, o: Measure, r?: Measure): void => {
    process.stdout.write(`  ${label}: cvat-backup ${o.seconds.toFixed(1)} s, peak ${o.maxRssMiB.toFixed(0)} MiB${r ? ` | restic ${r.seconds.toFixed(1)} s, peak ${r.maxRssMiB.toFixed(0)} MiB` : ''}\n`);
  };
  for (const count of COUNTS) {
    const f = await createFixtureDeployment({ prefix: 'mf', seed: false });
    const work = await mkdtemp(join(tmpdir(), 'cvat-backup-many-'));
    try {
      process.stdout.write(`${count} files (folders of 1000), all volumes, CVAT stopped around both tools:\n`);
      const root = join(await f.volumePath('cvat_data'), 'many');
      await writeFiles(root, count);
      const ours = { CVAT_BACKUP_REPO: join(work, 'ours'), CVAT_BACKUP_PASSWORD: 'pw' };
      const restic = { RESTIC_REPOSITORY: join(work, 'restic'), RESTIC_PASSWORD: 'pw' };
      await run(process.execPath, [BIN, 'init'], { env: { ...process.env, ...ours } });
      await run('restic', ['init', '--repository-version', '2'], { env: { ...process.env, ...restic } });
      const folders = await Promise.all(VOLUMES.map((v) => f.volumePath(v)));
      const offline = [BIN, '--project', f.project, 'backup', '--mode', 'offline'];
      await run('sync', []);
      const first: [Measure, Measure] = [await measure(process.execPath, offline, ours), await resticStopped(f, folders, restic)];
      say('first backup', ...first);
      await run('sync', []);
      const unchanged: [Measure, Measure] = [await measure(process.execPath, offline, ours), await resticStopped(f, folders, restic)];
      say('nothing changed', ...unchanged);
      await writeFiles(root, Math.round(count / 100), Math.ceil(count / 1000) * 1000);
      await run('sync', []);
      const nightly = await measure(process.execPath, [BIN, '--project', f.project, 'backup'], ours);
      say('nightly, 1 % new files, two-phase (default)', nightly);
      rows.push({ count, first, unchanged, nightly });
    } finally {
      await f.destroy();
      await rm(work, { recursive: true, force: true });
    }
  }
  const s = (m: Measure): string => `${m.seconds.toFixed(1)} s, ${m.maxRssMiB.toFixed(0)} MiB`;
  const lines: string[][] = [['files', 'first: ours | restic', 'ratio', 'nothing changed: ours | restic', 'ratio', 'nightly two-phase (ours)']];
  for (const r of rows) {
    lines.push([
      String(r.count),
      `${s(r.first[0])} | ${s(r.first[1])}`,
      (r.first[0].seconds / r.first[1].seconds).toFixed(2),
      `${s(r.unchanged[0])} | ${s(r.unchanged[1])}`,
      (r.unchanged[0].seconds / r.unchanged[1].seconds).toFixed(2),
      s(r.nightly),
    ]);
  }
  process.stdout.write(`\nsame run, stop and start counted for both (targets at 1 M: first ≤ 1.0×, nothing changed ≤ 0.5×; peak ≤ 300 MiB at 2 M):\n${table(lines)}\n`);
}

runBench(main);
