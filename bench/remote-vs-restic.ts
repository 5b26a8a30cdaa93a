/**
 * Benchmark: remote repositories against restic 0.14 (Debian's package), same data, same run.
 *
 * Reference deployment as in bench/repository-vs-restic.ts: the test fixture + BENCH_MEDIA_MB
 * (default 2048) of incompressible media in files of 1 MiB, a pgbench database (BENCH_DB_SCALE,
 * default 20, ~15 MB per unit) and a ClickHouse-like folder. Two remote stores, both on this
 * machine (they share its cores with both tools):
 * - SFTP: a real OpenSSH sshd on loopback (test/support/sshd.ts); ours with `--sftp-args "-F
 *   <config>"`, restic with `-o sftp.command="ssh -F <config> <alias> -s sftp"` (same key, same
 *   known_hosts, same server);
 * - S3: the Ceph RADOS Gateway of scripts/ceph-rgw.sh (credentials from its env file), a new bucket
 *   per repository; restic as `s3:http://127.0.0.1:7480/<bucket>`, same credentials.
 * Both tools back up the same volume folders with CVAT stopped around them: ours as `backup --mode
 * offline`, restic as `docker compose stop` + `restic backup` + `docker compose start`. Measured
 * for each store and tool: first backup (empty repository), backup with nothing changed, restore
 * of the media volume (CVAT stopped around both, the volume emptied for restic as ours replaces
 * it; restic's also followed by a `sync`, timed apart: ours syncs its writes before CVAT stops,
 * restic leaves them in the page cache), peak memory (GNU time's max RSS). Ours keeps the media
 * files the volume still holds unchanged (restic 0.14 has no such mode: it rewrites every file),
 * so its restore is measured twice: over the deployment as it is ("restore of the media volume")
 * and into the media volume emptied first, the disaster case with nothing to keep ("restore into
 * the emptied media volume"; restic's row is the same restores, which always start empty). BENCH_RUNS rounds (default 3), each into new repositories
 * with new caches (repositories are deleted after their round: the Ceph store is in memory);
 * medians are printed.
 *
 * Then the two-phase downtime (the default mode) into a local, an SFTP and an S3 repository, with
 * new media written while phase 1 runs (as bench/remote-downtime.ts, but with the real servers and
 * the CLI): the first backup and BENCH_RUNS nightly ones (1 % new media). Target (issue 9): remote
 * downtime ≤ local + 1 s.
 *
 * BENCH_TARGETS=sftp,s3 picks the stores; BENCH_DOWNTIME=0 leaves the downtime part out, and
 * BENCH_COMPARE=0 the comparison with restic;
 * BENCH_RESTORES=k restores each repository k times per round (each counts for the median: the
 * restore is the noisiest row on a shared machine); BENCH_CPU_PROF=DIR runs our first backups and
 * restores with node's --cpu-prof into DIR.
 * Usage: npm run bench:remote   (a quick run: BENCH_MEDIA_MB=256 BENCH_DB_SCALE=2 BENCH_RUNS=1)
 */
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, type FixtureDeployment } from '../test/fixture/deployment.js';
import { run } from '../test/fixture/engine.js';
import { BIN } from '../test/fixture/cli.js';
import { startSshd, type SshServer } from '../test/support/sshd.js';
import { emptyPrefix, rawClient, testS3, uniqueBucket, type TestS3 } from '../src/backend/s3-testing.js';
import { table } from '../src/cli/render.js';
import { measure, type Measure, runBench } from './measure.js';

const MEDIA_MB = Number(process.env['BENCH_MEDIA_MB'] ?? 2048);
const DB_SCALE = Number(process.env['BENCH_DB_SCALE'] ?? 20);
const RUNS = Math.max(1, Number(process.env['BENCH_RUNS'] ?? 3));
const TARGETS = (process.env['BENCH_TARGETS'] ?? 'sftp,s3').split(',').filter((t) => t === 'sftp' || t === 's3');
const DOWNTIME = process.env['BENCH_DOWNTIME'] !== '0';
const COMPARE = process.env['BENCH_COMPARE'] !== '0';
const RESTORES = Math.max(1, Number(process.env['BENCH_RESTORES'] ?? 1));
const CPU_PROF = process.env['BENCH_CPU_PROF'];
const VOLUMES = ['cvat_db', 'cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];
const PASSWORD = 'bench-pw';

/** One repository of one tool: where it is, the environment that opens it, how to delete it. */
interface Repo {
  env: NodeJS.ProcessEnv;
  /** restic's extra arguments (`-o sftp.command=…`). */
  args: string[];
  remove(): Promise<void>;
}

interface Store {
  name: string;
  ours(round: string): Repo;
  restic(round: string): Repo;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

function sftpStore(sshd: SshServer, work: string): Store {
  const folder = (name: string): string => join(sshd.home, name);
  const removeFolder = (name: string) => () => rm(folder(name), { recursive: true, force: true });
  return {
    name: 'SFTP',
    ours: (round) => ({
      env: { CVAT_BACKUP_REPO: `sftp:${sshd.alias}:${folder(`ours-${round}`)}`, CVAT_BACKUP_SFTP_ARGS: `-F ${sshd.configFile}`, CVAT_BACKUP_CACHE_DIR: join(work, `cache-ours-sftp-${round}`) },
      args: [],
      remove: removeFolder(`ours-${round}`),
    }),
    restic: (round) => ({
      env: { RESTIC_REPOSITORY: `sftp:${sshd.alias}:${folder(`restic-${round}`)}`, RESTIC_CACHE_DIR: join(work, `cache-restic-sftp-${round}`) },
      args: ['-o', `sftp.command=ssh -F ${sshd.configFile} ${sshd.alias} -s sftp`],
      remove: removeFolder(`restic-${round}`),
    }),
  };
}

function s3Store(s3: TestS3, work: string): Store {
  const credentials = {
    AWS_ACCESS_KEY_ID: s3.owner.accessKeyId,
    AWS_SECRET_ACCESS_KEY: s3.owner.secretAccessKey,
    AWS_EC2_METADATA_DISABLED: 'true',
  };
  const repo = (who: 'ours' | 'restic', round: string): Repo => {
    const bucket = uniqueBucket(`bench-${who}`);
    const location = `s3:${s3.endpoint}/${bucket}`;
    return {
      env:
        who === 'ours'
          ? {
              ...credentials,
              CVAT_BACKUP_REPO: location,
              // Ceph 16 rejects the SDK's newer checksum headers (README: S3).
              AWS_REQUEST_CHECKSUM_CALCULATION: 'when_required',
              AWS_RESPONSE_CHECKSUM_VALIDATION: 'when_required',
              CVAT_BACKUP_CACHE_DIR: join(work, `cache-ours-s3-${round}`),
            }
          : { ...credentials, RESTIC_REPOSITORY: location, RESTIC_CACHE_DIR: join(work, `cache-restic-s3-${round}`) },
      args: [],
      remove: async () => {
        await emptyPrefix(rawClient(s3), bucket, '');
        await collectGarbage();
      },
    };
  };
  return { name: 'S3', ours: (round) => repo('ours', round), restic: (round) => repo('restic', round) };
}

/**
 * RGW frees deleted objects' data only after its garbage collection's wait (2 hours): the test
 * server's store is in memory (4 GiB), so a few rounds of a large reference fill it (and every S3
 * test on the machine then hangs). Collect now, as the gateway's admin (its ceph.conf is named
 * in the server's env file).
 */
async function collectGarbage(): Promise<void> {
  const conf = /^CEPH_CONF=(.*)$/m.exec(await readFile(process.env['CVAT_BACKUP_S3_TEST_ENV'] || '/tmp/cvat-backup-rgw/s3.env', 'utf8'))?.[1];
  await run('radosgw-admin', ['gc', 'process', '--include-all'], { env: { ...process.env, ...(conf ? { CEPH_CONF: conf } : {}) } });
}

/** New media while CVAT runs: a 200 kB file every 100 ms (as bench/remote-downtime.ts). Dies with the containers. */
async function startLoad(f: FixtureDeployment): Promise<() => void> {
  const server = await f.container('cvat_server');
  const child = spawn('docker', ['exec', server, '/bin/sh', '-c', 'd=/home/django/data/data/upload; mkdir -p $d; while true; do head -c 200000 /dev/urandom > $d/$(date +%s%N).jpg; sleep 0.1; done'], {
    stdio: 'ignore',
  });
  return () => child.kill();
}

async function machineState(): Promise<string> {
  const load = (await run('cat', ['/proc/loadavg'])).stdout.split(' ').slice(0, 3).join(' ');
  const containers = (await run('docker', ['ps', '-q'])).stdout.trim().split('\n').filter(Boolean).length;
  return `load average ${load}, ${containers} containers running`;
}

async function main(): Promise<void> {
  process.env['AWS_EC2_METADATA_DISABLED'] = 'true';
  process.env['AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED'] = 'true';
  const work = await mkdtemp(join(tmpdir(), 'cvat-backup-remote-restic-'));
  const stores: Store[] = [];
  const cleanups: (() => Promise<void>)[] = [];
  let f: FixtureDeployment | undefined;
  try {
    if (TARGETS.includes('sftp')) {
      const sshd = await startSshd();
      cleanups.push(() => sshd.stop());
      stores.push(sftpStore(sshd, work));
    }
    if (TARGETS.includes('s3')) {
      const s3 = testS3();
      if ('skip' in s3) throw new Error(s3.skip);
      stores.push(s3Store(s3, work));
    }

    f = await createFixtureDeployment({ prefix: 'rr' });
    const fx = f;
    process.stdout.write(`reference deployment: ${MEDIA_MB} MiB media in ${MEDIA_MB} files, pgbench scale ${DB_SCALE}; ${RUNS} round(s)\n`);
    const mediaDir = join(await fx.volumePath('cvat_data'), 'data', 'bench');
    await run('sh', ['-c', `mkdir -p ${mediaDir} && cd ${mediaDir} && i=0; while [ $i -lt ${MEDIA_MB} ]; do d=$((i / 250)); mkdir -p $d; head -c 1048576 /dev/urandom > $d/frame_$i.jpg; i=$((i + 1)); done; chown -R 1000:1000 ${mediaDir}`]);
    await fx.exec('cvat_db', `su postgres -s /bin/sh -c '/usr/lib/postgresql/15/bin/pgbench -q -i -s ${DB_SCALE} -h /var/run/postgresql cvat' >/dev/null 2>&1`);
    await fx.exec('cvat_clickhouse', 'mkdir -p /var/lib/clickhouse/data/cvat/events/all_2_2_0 && i=0; while [ $i -lt 200 ]; do head -c 20000 /dev/urandom > /var/lib/clickhouse/data/cvat/events/all_2_2_0/col_$i.bin; i=$((i+1)); done');
    await fx.psql('CHECKPOINT;');
    const folders = await Promise.all(VOLUMES.map((v) => fx.volumePath(v)));
    const dataBytes = (await Promise.all(folders.map(async (p) => Number((await run('du', ['-sb', p])).stdout.split('\t')[0])))).reduce((a, b) => a + b, 0);
    process.stdout.write(`data: ${(dataBytes / 2 ** 20).toFixed(0)} MiB in ${VOLUMES.length} volumes; ${await machineState()}\n\n`);
    // The setup's writes reach the disk before anything is measured; then the page cache is warm.
    await run('sync', []);
    await run('sh', ['-c', `find ${folders.join(' ')} -type f -exec cat {} + > /dev/null`]);
    const mediaVolume = await fx.volumePath('cvat_data');

    const ours = (repo: Repo, args: string[], node: string[] = []): Promise<Measure & { stdout: string }> =>
      measure(process.execPath, [...node, BIN, '--project', fx.project, ...args], { CVAT_BACKUP_PASSWORD: PASSWORD, ...repo.env });
    const profile = CPU_PROF ? ['--cpu-prof', '--cpu-prof-dir', CPU_PROF] : [];
    const restic = (repo: Repo, args: string[]): Promise<Measure> => measure('restic', [...repo.args, ...args], { RESTIC_PASSWORD: PASSWORD, ...repo.env });
    const stopped = async (what: () => Promise<unknown>): Promise<number> => {
      const start = process.hrtime.bigint();
      await fx.compose(['stop']);
      await what();
      await fx.compose(['start']);
      return Number(process.hrtime.bigint() - start) / 1e9;
    };
    type Row = 'first' | 'again' | 'restore' | 'restore-empty';
    const results = new Map<string, { seconds: number[]; rss: number[] }>();
    const note = (key: string, m: { seconds: number; maxRssMiB: number; cpuSeconds?: number | undefined }): void => {
      const r = results.get(key) ?? { seconds: [], rss: [] };
      r.seconds.push(m.seconds);
      r.rss.push(m.maxRssMiB);
      results.set(key, r);
      const cpu = m.cpuSeconds === undefined ? '' : `, CPU ${m.cpuSeconds.toFixed(1)} s`;
      process.stdout.write(`  ${key}: ${m.seconds.toFixed(1)} s${cpu}, ${m.maxRssMiB.toFixed(0)} MiB\n`);
    };

    for (let round = 1; round <= (COMPARE ? RUNS : 0); round++) {
      for (const store of stores) {
        // Each tool into a new repository that is deleted after its round. Who goes first alternates
        // by round: what the machine and the store still do from before (Ceph reclaiming the last
        // round's repositories, writeback) falls on the first run of a round, so it must not always
        // be the same tool's.
        const oursTurn = async (): Promise<void> => {
          const repo = store.ours(String(round));
          try {
            await run(process.execPath, [BIN, 'init'], { env: { ...process.env, CVAT_BACKUP_PASSWORD: PASSWORD, ...repo.env } });
            for (const row of ['first', 'again'] as Row[]) note(`${store.name} ${row} ours`, await ours(repo, ['backup', '--mode', 'offline'], row === 'first' ? profile : []));
            await run('sync', []);
            for (let k = 0; k < RESTORES; k++) {
              // --json: the downtime inside it (CVAT stopped: the writes) shows apart from the verification before.
              const m = await ours(repo, ['--json', 'restore', 'latest', '--volume', 'cvat_data'], profile);
              note(`${store.name} restore ours`, m);
              const shown = JSON.parse(m.stdout) as { downtimeMs?: number; volumes?: { keptFiles?: number }[] };
              const kept = shown.volumes?.reduce((n, v) => n + (v.keptFiles ?? 0), 0) ?? 0;
              if (shown.downtimeMs !== undefined) process.stdout.write(`    (of which CVAT down ${(shown.downtimeMs / 1000).toFixed(1)} s; ${kept} files kept)\n`);
            }
            // The disaster case: nothing of the media is left to keep (emptied while CVAT runs).
            for (let k = 0; k < RESTORES; k++) {
              await run('sh', ['-c', `find ${mediaVolume} -mindepth 1 -delete`]);
              note(`${store.name} restore-empty ours`, await ours(repo, ['--json', 'restore', 'latest', '--volume', 'cvat_data'], profile));
            }
          } finally {
            await repo.remove();
          }
        };
        const resticTurn = async (): Promise<void> => {
          const repo = store.restic(String(round));
          try {
            await run('restic', [...repo.args, 'init', '--repository-version', '2'], { env: { ...process.env, RESTIC_PASSWORD: PASSWORD, ...repo.env } });
            for (const row of ['first', 'again'] as Row[]) {
              let rss = NaN;
              const seconds = await stopped(async () => (rss = (await restic(repo, ['backup', '-q', ...folders])).maxRssMiB));
              note(`${store.name} ${row} restic`, { seconds, maxRssMiB: rss });
            }
            await run('sync', []);
            for (let k = 0; k < RESTORES; k++) {
              let rss = NaN;
              let cpu: number | undefined;
              const seconds = await stopped(async () => {
                await run('sh', ['-c', `find ${mediaVolume} -mindepth 1 -delete`]);
                ({ maxRssMiB: rss, cpuSeconds: cpu } = await restic(repo, ['restore', 'latest', '--target', '/', '--include', mediaVolume]));
              });
              note(`${store.name} restore restic`, { seconds, maxRssMiB: rss, cpuSeconds: cpu });
              note(`${store.name} restore-empty restic`, { seconds, maxRssMiB: rss });
              // restic leaves its writes in the page cache; ours syncs them before CVAT stops. What
              // restic left unwritten, timed apart (an extra row: the target row is restic's own).
              const syncStart = process.hrtime.bigint();
              await run('sync', []);
              note(`${store.name} restore+sync restic`, { seconds: seconds + Number(process.hrtime.bigint() - syncStart) / 1e9, maxRssMiB: rss });
            }
          } finally {
            await repo.remove();
          }
        };
        for (const turn of round % 2 === 1 ? [oursTurn, resticTurn] : [resticTurn, oursTurn]) await turn();
      }
    }

    const rows: string[][] = [['', 'cvat-backup', 'restic 0.14', 'ratio', 'peak RSS ours / restic']];
    for (const store of COMPARE ? stores : []) {
      for (const [row, label] of [
        ['first', 'first backup'],
        ['again', 'backup, nothing changed'],
        ['restore', 'restore of the media volume'],
        ['restore-empty', 'restore into the emptied media volume'],
      ] as const) {
        const o = results.get(`${store.name} ${row} ours`)!;
        const r = results.get(`${store.name} ${row} restic`)!;
        const [os, rs] = [median(o.seconds), median(r.seconds)];
        rows.push([`${store.name}: ${label}`, `${os.toFixed(1)} s`, `${rs.toFixed(1)} s`, (os / rs).toFixed(2), `${Math.max(...o.rss).toFixed(0)} / ${Math.max(...r.rss).toFixed(0)} MiB`]);
      }
      const synced = results.get(`${store.name} restore+sync restic`);
      const o = results.get(`${store.name} restore-empty ours`);
      if (synced && o) rows.push([`${store.name}: into the emptied volume, restic then sync (ours syncs)`, `${median(o.seconds).toFixed(1)} s`, `${median(synced.seconds).toFixed(1)} s`, (median(o.seconds) / median(synced.seconds)).toFixed(2), '']);
    }
    if (COMPARE) process.stdout.write(`\nmedian of ${RUNS}${RESTORES > 1 ? ` (restores: of ${RUNS * RESTORES})` : ''}, CVAT stopped around both (stop+start included); ${await machineState()}\n${table(rows)}\n\n`);

    if (DOWNTIME) {
      const local = join(work, 'downtime-local');
      const setups: [string, Repo][] = [['local', { env: { CVAT_BACKUP_REPO: local }, args: [], remove: () => rm(local, { recursive: true, force: true }) }]];
      for (const store of stores) setups.push([store.name, store.ours('downtime')]);
      const downtime = new Map<string, number[]>();
      try {
        for (const [, repo] of setups) {
          if (repo.env['CVAT_BACKUP_CACHE_DIR']) await mkdir(repo.env['CVAT_BACKUP_CACHE_DIR'], { recursive: true });
          await run(process.execPath, [BIN, 'init'], { env: { ...process.env, CVAT_BACKUP_PASSWORD: PASSWORD, ...repo.env } });
        }
        for (let round = 0; round <= RUNS; round++) {
          const what = round === 0 ? 'first' : 'nightly';
          if (round > 0) await run('sh', ['-c', `for i in $(seq 1 ${Math.max(1, Math.round(MEDIA_MB / 100))}); do head -c 1048576 /dev/urandom > ${mediaDir}/day${round}-$i.jpg; done`]);
          for (const [name, repo] of setups) {
            await fx.waitForDatabase();
            const stop = await startLoad(fx);
            try {
              const r = await run(process.execPath, [BIN, '--project', fx.project, '--json', 'backup'], { env: { ...process.env, CVAT_BACKUP_PASSWORD: PASSWORD, ...repo.env } });
              const seconds = (JSON.parse(r.stdout) as { downtimeMs: number }).downtimeMs / 1000;
              const key = `${what}: ${name}`;
              downtime.set(key, [...(downtime.get(key) ?? []), seconds]);
              process.stdout.write(`  ${key} downtime ${seconds.toFixed(2)} s\n`);
            } finally {
              stop();
            }
          }
        }
      } finally {
        for (const [, repo] of setups) await repo.remove();
      }
      const rows2: string[][] = [['two-phase downtime', ...setups.map(([name]) => name), 'target']];
      for (const what of ['first', 'nightly']) {
        const localDown = median(downtime.get(`${what}: local`)!);
        rows2.push([`${what}${what === 'nightly' ? ` (median of ${RUNS})` : ''}`, ...setups.map(([name]) => `${median(downtime.get(`${what}: ${name}`)!).toFixed(2)} s`), `≤ ${(localDown + 1).toFixed(2)} s`]);
      }
      process.stdout.write(`\n${table(rows2)}\n`);
    }
  } finally {
    await f?.destroy();
    for (const c of cleanups) await c();
    await rm(work, { recursive: true, force: true });
  }
}

runBench(main);
