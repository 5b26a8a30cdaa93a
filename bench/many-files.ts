/**
 * Benchmark: peak memory and time of a first backup as the number of files grows, cvat-backup
 * against restic in the same run. BENCH_FILES (default "10000,1000000") small files are written in
 * folders of 1000 into the media volume of a fresh fixture deployment; both tools back up all
 * volumes with CVAT stopped (ours with --mode offline; restic with the same stop/start around it).
 *
 * Usage: npm run build && node dist/bench/many-files.js
 */
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment } from '../test/fixture/deployment.js';
import { run } from '../test/fixture/engine.js';
import { BIN } from '../test/fixture/cli.js';
import { measure, runBench } from './measure.js';

const COUNTS = (process.env['BENCH_FILES'] ?? '10000,1000000').split(',').map(Number);
const VOLUMES = ['cvat_db', 'cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];

async function main(): Promise<void> {
  for (const count of COUNTS) {
    const f = await createFixtureDeployment({ prefix: 'mf', seed: false });
    const work = await mkdtemp(join(tmpdir(), 'cvat-backup-many-'));
    try {
      const root = join(await f.volumePath('cvat_data'), 'many');
      for (let d = 0; d * 1000 < count; d++) {
        await mkdir(join(root, String(d)), { recursive: true });
        const writes: Promise<void>[] = [];
        for (let i = d * 1000; i < Math.min(count, (d + 1) * 1000); i++) writes.push(writeFile(join(root, String(d), `f${i}.json`), `{"frame": ${i}}\n`));
        await Promise.all(writes);
      }
      const ours = { CVAT_BACKUP_REPO: join(work, 'ours'), CVAT_BACKUP_PASSWORD: 'pw' };
      const restic = { RESTIC_REPOSITORY: join(work, 'restic'), RESTIC_PASSWORD: 'pw' };
      await run(process.execPath, [BIN, 'init'], { env: { ...process.env, ...ours } });
      await run('restic', ['init', '--repository-version', '2'], { env: { ...process.env, ...restic } });
      const folders = await Promise.all(VOLUMES.map((v) => f.volumePath(v)));
      const o = await measure(process.execPath, [BIN, '--project', f.project, 'backup', '--mode', 'offline'], ours);
      await f.compose(['stop']);
      const r = await measure('restic', ['backup', '-q', ...folders], restic);
      await f.compose(['start']);
      process.stdout.write(
        `${count} files: cvat-backup ${o.seconds.toFixed(1)} s, peak ${o.maxRssMiB.toFixed(0)} MiB (incl. stop/start) | restic ${r.seconds.toFixed(1)} s, peak ${r.maxRssMiB.toFixed(0)} MiB (backup only)\n`,
      );
    } finally {
      await f.destroy();
      await rm(work, { recursive: true, force: true });
    }
  }
}

runBench(main);
