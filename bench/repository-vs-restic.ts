/**
 * Benchmark: the snapshot repository against restic (Debian's package) on the same data, same run.
 *
 * Reference deployment: the test fixture + BENCH_MEDIA_MB of incompressible media in files of
 * 1 MiB (thousands of files), a pgbench database (BENCH_DB_SCALE, ~15 MB per unit) and a
 * ClickHouse-like folder. Both tools back up the same volume folders with CVAT stopped: ours as
 * `cvat-backup backup --mode offline` (stop, back up, start: the repository's own speed; the
 * two-phase default is measured for downtime in bench/downtime.ts), restic as `docker compose
 * stop` + `restic backup <volume folders>` + `docker compose start`. Measured: first backup, backup with nothing
 * changed, restore of the media volume, seven daily backups with 2 % of media files changed or
 * added each day (repository size against one backup), peak memory (GNU time's max RSS).
 * Then peak memory with BENCH_SMALL_FILES small files (default 10000; set 1000000 for the large run).
 *
 * Usage: npm run bench:restic (BENCH_NODE=<path of a node binary>: run cvat-backup under that
 * runtime, e.g. Node 22 or 24, while the benchmark itself runs under this one)
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment } from '../test/fixture/deployment.js';
import { run } from '../test/fixture/engine.js';
import { BIN } from '../test/fixture/cli.js';
import { measure, type Measure, runBench } from './measure.js';

const MEDIA_MB = Number(process.env['BENCH_MEDIA_MB'] ?? 2048);
const DB_SCALE = Number(process.env['BENCH_DB_SCALE'] ?? 20);
const SMALL_FILES = (process.env['BENCH_SMALL_FILES'] ?? '10000').split(',').map(Number);
/** The runtime cvat-backup runs under. */
const NODE = process.env['BENCH_NODE'] ?? process.execPath;
const VOLUMES = ['cvat_db', 'cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];

async function du(path: string): Promise<number> {
  return Number((await run('du', ['-sb', path])).stdout.split('\t')[0]);
}

function mib(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(0)} MiB`;
}

async function main(): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'cvat-backup-restic-'));
  const f = await createFixtureDeployment({ prefix: 'rb' });
  const ours = { CVAT_BACKUP_REPO: join(work, 'ours'), CVAT_BACKUP_PASSWORD: 'bench-pw' };
  const restic = { RESTIC_REPOSITORY: join(work, 'restic'), RESTIC_PASSWORD: 'bench-pw' };
  const rows: string[][] = [['', 'cvat-backup', 'restic', 'ratio']];
  const add = (label: string, a: number, b: number, unit: (n: number) => string): void => {
    rows.push([label, unit(a), unit(b), (a / b).toFixed(2)]);
  };
  const secs = (n: number): string => `${n.toFixed(1)} s`;
  try {
    process.stdout.write(`cvat-backup on Node ${(await run(NODE, ['--version'])).stdout.trim()}; ${(await run('restic', ['version'])).stdout.trim()}\n`);
    process.stdout.write(`reference deployment: ${MEDIA_MB} MiB media in ${MEDIA_MB} files, pgbench scale ${DB_SCALE}\n`);
    const mediaDir = join(await f.volumePath('cvat_data'), 'data', 'bench');
    await run('sh', ['-c', `mkdir -p ${mediaDir} && cd ${mediaDir} && i=0; while [ $i -lt ${MEDIA_MB} ]; do d=$((i / 250)); mkdir -p $d; head -c 1048576 /dev/urandom > $d/frame_$i.jpg; i=$((i + 1)); done; chown -R 1000:1000 ${mediaDir}`]);
    await f.exec('cvat_db', `su postgres -s /bin/sh -c '/usr/lib/postgresql/15/bin/pgbench -q -i -s ${DB_SCALE} -h /var/run/postgresql cvat' >/dev/null 2>&1`);
    await f.exec('cvat_clickhouse', 'mkdir -p /var/lib/clickhouse/data/cvat/events/all_2_2_0 && i=0; while [ $i -lt 200 ]; do head -c 20000 /dev/urandom > /var/lib/clickhouse/data/cvat/events/all_2_2_0/col_$i.bin; i=$((i+1)); done');
    await f.psql('CHECKPOINT;');
    const folders = await Promise.all(VOLUMES.map((v) => f.volumePath(v)));
    const dataBytes = (await Promise.all(folders.map(du))).reduce((a, b) => a + b, 0);
    process.stdout.write(`data: ${mib(dataBytes)} in ${VOLUMES.length} volumes\n\n`);

    await run(NODE, [BIN, 'init'], { env: { ...process.env, ...ours } });
    await run('restic', ['init', '--repository-version', '2'], { env: { ...process.env, ...restic } });
    await run('sh', ['-c', `find ${folders.join(' ')} -type f -exec cat {} + > /dev/null`]);

    const floor = await (async () => {
      const start = process.hrtime.bigint();
      await f.compose(['stop']);
      await f.compose(['start']);
      return Number(process.hrtime.bigint() - start) / 1e9;
    })();
    const ourBackup = (): Promise<Measure> => measure(NODE, [BIN, '--project', f.project, 'backup', '--mode', 'offline'], ours);
    const resticBackup = async (): Promise<Measure> => {
      const start = process.hrtime.bigint();
      await f.compose(['stop']);
      const m = await measure('restic', ['backup', '-q', ...folders], restic);
      await f.compose(['start']);
      return { seconds: Number(process.hrtime.bigint() - start) / 1e9, maxRssMiB: m.maxRssMiB };
    };

    const o1 = await ourBackup();
    const r1 = await resticBackup();
    add('first backup (incl. stop/start)', o1.seconds, r1.seconds, secs);
    const size1 = { ours: await du(ours.CVAT_BACKUP_REPO), restic: await du(restic.RESTIC_REPOSITORY) };
    add('repository after first backup', size1.ours, size1.restic, mib);
    const o2 = await ourBackup();
    const r2 = await resticBackup();
    add('backup, nothing changed', o2.seconds, r2.seconds, secs);
    add('peak memory, first backup (MiB)', o1.maxRssMiB, r1.maxRssMiB, (n) => `${n.toFixed(0)} MiB`);

    // Restore of the media volume, the whole job for both: ours verifies first, stops CVAT, keeps
    // a rollback point and starts CVAT; restic gets the same stop/start around an in-place restore
    // into the volume's folder (emptied first, as ours does).
    // Both start with the backups' dirty pages on disk, so neither pays for the other's writeback.
    await run('sync', []);
    const oR = await measure(NODE, [BIN, '--project', f.project, 'restore', 'latest', '--volume', 'cvat_data'], ours);
    await run('sync', []);
    const mediaVolume = await f.volumePath('cvat_data');
    const rR = await (async () => {
      const start = process.hrtime.bigint();
      await f.compose(['stop']);
      await run('sh', ['-c', `find ${mediaVolume} -mindepth 1 -delete`]);
      await measure('restic', ['restore', 'latest', '--target', '/', '--include', mediaVolume], restic);
      await f.compose(['start']);
      return { seconds: Number(process.hrtime.bigint() - start) / 1e9 };
    })();
    add('restore of the media volume (incl. stop/start)', oR.seconds, rR.seconds, secs);

    // Seven daily backups in all (the first above, six more): each day 1 % of media files
    // rewritten and 1 % added, and 2 % of the database's accounts updated (a contiguous range, as
    // a day of annotation touches recent rows).
    const files = (await run('sh', ['-c', `find ${mediaDir} -type f`])).stdout.trim().split('\n');
    const accounts = DB_SCALE * 100000;
    for (let day = 1; day <= 6; day++) {
      const changes = Math.max(1, Math.round(files.length * 0.01));
      for (let i = 0; i < changes; i++) {
        await writeFile(files[(day * 7919 + i * 104729) % files.length]!, randomBytes(1 << 20));
        await writeFile(join(mediaDir, `day${day}_${i}.jpg`), randomBytes(1 << 20));
      }
      const from = Math.floor(accounts * 0.02 * (day - 1));
      await f.psql(`UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > ${from} AND aid <= ${from + accounts * 0.02}; CHECKPOINT;`);
      await ourBackup();
      await resticBackup();
    }
    const size7 = { ours: await du(ours.CVAT_BACKUP_REPO), restic: await du(restic.RESTIC_REPOSITORY) };
    rows.push(['7 daily backups, 2 % changed: repo / one backup', (size7.ours / size1.ours).toFixed(2), (size7.restic / size1.restic).toFixed(2), 'target ≤ 1.15']);
    rows.push(["guide's way (7 full tar.gz)", '7.00', '', '']);
    process.stdout.write(`stop+start floor of the fixture: ${floor.toFixed(1)} s\n\n`);
    for (const r of rows) process.stdout.write(`${r[0]!.padEnd(44)}${r[1]!.padEnd(14)}${r[2]!.padEnd(14)}${r[3]}\n`);

    // Peak memory as the number of files grows.
    for (const count of SMALL_FILES) {
      const dir = join(await f.volumePath('cvat_logs'), `small-${count}`);
      await run('sh', ['-c', `mkdir -p ${dir} && cd ${dir} && i=0; while [ $i -lt ${count} ]; do d=$((i / 1000)); [ $((i % 1000)) -eq 0 ] && mkdir -p $d; echo "log line $i" > $d/f$i; i=$((i + 1)); done`]);
      const o = await ourBackup();
      const r = await resticBackup();
      process.stdout.write(`${count} more small files: peak memory cvat-backup ${o.maxRssMiB.toFixed(0)} MiB, restic ${r.maxRssMiB.toFixed(0)} MiB; time ${o.seconds.toFixed(1)} s vs ${r.seconds.toFixed(1)} s\n`);
      await rm(dir, { recursive: true, force: true });
    }
  } finally {
    await f.destroy();
    await rm(work, { recursive: true, force: true });
  }
}

runBench(main);
