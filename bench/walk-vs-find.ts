/**
 * Benchmark: the full walk against `find`'s stat walk of the same tree (issue 10: full walk
 * <= 1.0x find). BENCH_FILES (default "200000,1000000") small files are written in folders of 1000,
 * three levels down (l<n>/m<n>/job<n>), into a plain folder on the disk that holds /work (the
 * filesystem of the Docker volumes here). Ours is the archiver on a nothing-changed tree, which is
 * what a nightly phase 1 does (a first backup, untimed, then backups with it as parent): with the
 * native walk and with CVAT_BACKUP_NATIVE=off, each in its own process with a local repository on
 * the same disk. Warm, and alternating so both see the same load: `find DIR -printf '%s %T@ %C@
 * %i\n' >/dev/null`, then our walk, BENCH_ROUNDS (default 3) times after one warm-up of each; the
 * medians are printed, and their ratio.
 *
 * Usage: npm run build && node dist/bench/walk-vs-find.js
 * (BENCH_PROFILE=DIR writes a CPU profile of each timed walk there.)
 */
import { spawnSync } from 'node:child_process';
import { Session } from 'node:inspector/promises';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Repository } from '../src/repository/repository.js';
import { LocalBackend } from '../src/backend/local.js';
import { Archiver } from '../src/repository/archiver.js';
import { nativeHelper } from '../src/fs/native.js';
import { runBench } from './measure.js';

const SELF = fileURLToPath(import.meta.url);
const COUNTS = (process.env['BENCH_FILES'] ?? '200000,1000000').split(',').map(Number);
const ROUNDS = Number(process.env['BENCH_ROUNDS'] ?? 3);
const fastKdf = { algorithm: 'scrypt' as const, N: 1024, r: 8, p: 1 };

/** count files in folders of 1000: top/<a>/<b>/<folder of 1000>, ten folders per level. */
function buildTree(root: string, count: number): void {
  const folders = Math.ceil(count / 1000);
  for (let d = 0; d < folders; d++) {
    const dir = join(root, `l${Math.floor(d / 100)}`, `m${Math.floor(d / 10) % 10}`, `job${d}`);
    mkdirSync(dir, { recursive: true });
    for (let i = d * 1000; i < Math.min(count, (d + 1) * 1000); i++) writeFileSync(join(dir, `frame_${String(i).padStart(7, '0')}.jpg`), `{"frame": ${i}}\n`);
  }
}

function seconds(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/** find's wall time and CPU time (user + system, from the shell's `times`). */
function timeFind(dir: string): { wall: number; cpu: number } {
  const start = process.hrtime.bigint();
  const r = spawnSync('sh', ['-c', `find "$1" -printf '%s %T@ %C@ %i\\n' >/dev/null; times`, 'sh', dir], { stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' });
  const wall = seconds(start);
  if (r.status !== 0) throw new Error('find failed');
  // Second line of `times`: the children's user and system time, as 0m1.234s 0m0.567s.
  const children = r.stdout.trim().split('\n').pop()!.split(/\s+/).map((t) => {
    const m = /^(\d+)m([\d.]+)s$/.exec(t);
    return m ? Number(m[1]) * 60 + Number(m[2]) : NaN;
  });
  return { wall, cpu: children[0]! + children[1]! };
}

/**
 * Child: a first backup (untimed), then ROUNDS times: find's stat walk, then a nothing-changed
 * backup, timed one after the other so both see the same load. A warm-up of each comes first.
 */
async function child(repoPath: string, volume: string, label: string): Promise<void> {
  const repo = await Repository.init(new LocalBackend(repoPath), 'pw', { kdf: fastKdf });
  const pool = repo.createChunkPool(2);
  try {
    const first = await new Archiver(repo, { pool }).archive(volume, undefined);
    await repo.flush();
    const finds: number[] = [];
    const walks: number[] = [];
    const findCpus: number[] = [];
    const walkCpus: number[] = [];
    let tree = '';
    const profile = process.env['BENCH_PROFILE'];
    const session = new Session();
    for (let round = 0; round <= ROUNDS; round++) {
      const find = timeFind(volume);
      if (profile && round === ROUNDS) {
        session.connect();
        await session.post('Profiler.enable');
        await session.post('Profiler.start');
      }
      const start = process.hrtime.bigint();
      // All of this process's threads (libuv's pool and the workers too).
      const cpu = process.cpuUsage();
      tree = (await new Archiver(repo, { pool }).archive(volume, first.tree)).tree;
      const walk = seconds(start);
      const used = process.cpuUsage(cpu);
      if (round === 0) continue; // warm-up
      finds.push(find.wall);
      walks.push(walk);
      findCpus.push(find.cpu);
      walkCpus.push((used.user + used.system) / 1e6);
    }
    if (profile) {
      const { profile: taken } = await session.post('Profiler.stop');
      writeFileSync(join(profile, `${label}.cpuprofile`), JSON.stringify(taken));
      session.disconnect();
    }
    process.stdout.write(`${JSON.stringify({ find: median(finds), walk: median(walks), findCpu: median(findCpus), walkCpu: median(walkCpus), tree, native: nativeHelper() !== undefined } satisfies ChildResult)}\n`);
  } finally {
    await pool.close();
  }
}

interface ChildResult {
  find: number;
  walk: number;
  /** CPU seconds (user + system), medians: less bent by other work on the machine than wall time. */
  findCpu: number;
  walkCpu: number;
  tree: string;
  native: boolean;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

function ours(work: string, volume: string, native: boolean, label: string): ChildResult {
  const repoPath = join(work, `repo-${label}`);
  const r = spawnSync(process.execPath, [SELF, 'child', repoPath, volume, label], {
    env: { ...process.env, CVAT_BACKUP_NATIVE: native ? 'on' : 'off' },
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 1 << 20,
  });
  rmSync(repoPath, { recursive: true, force: true });
  if (r.status !== 0) throw new Error(`archiver child failed (${r.status})`);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as ChildResult;
}

async function main(): Promise<void> {
  if (process.argv[2] === 'child') return child(process.argv[3]!, process.argv[4]!, process.argv[5]!);
  mkdirSync('/work/tmp', { recursive: true });
  for (const count of COUNTS) {
    const work = mkdtempSync('/work/tmp/cvat-backup-walk-');
    try {
      // BENCH_TREE=DIR keeps the tree there between runs (DIR/<count>), to measure again without rebuilding it.
      const kept = process.env['BENCH_TREE'];
      const volume = kept ? join(kept, String(count)) : join(work, 'volume');
      if (!kept || !existsSync(join(volume, 'complete'))) {
        const built = process.hrtime.bigint();
        rmSync(volume, { recursive: true, force: true });
        buildTree(volume, count);
        if (kept) mkdirSync(join(volume, 'complete'));
        process.stdout.write(`${count} files written in ${seconds(built).toFixed(0)} s\n`);
      }
      const native = ours(work, volume, true, `native-${count}`);
      // BENCH_NATIVE_ONLY=1: the native walk only (to try its settings).
      const plain = process.env['BENCH_NATIVE_ONLY'] ? native : ours(work, volume, false, `js-${count}`);
      if (native.tree !== plain.tree) throw new Error(`tree ids differ: native ${native.tree}, pure JS ${plain.tree}`);
      process.stdout.write(
        `${count} files (median of ${ROUNDS}, find and ours alternating; load ${loadavg()[0]!.toFixed(1)}): ` +
          `native walk ${native.walk.toFixed(2)} s vs find ${native.find.toFixed(2)} s = ${(native.walk / native.find).toFixed(2)}x${native.native ? '' : ' (NATIVE HELPER NOT LOADED)'} ` +
          `(CPU ${native.walkCpu.toFixed(2)} s vs ${native.findCpu.toFixed(2)} s = ${(native.walkCpu / native.findCpu).toFixed(2)}x) | ` +
          `CVAT_BACKUP_NATIVE=off ${plain.walk.toFixed(2)} s vs find ${plain.find.toFixed(2)} s = ${(plain.walk / plain.find).toFixed(2)}x | same tree id: yes\n`,
      );
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  }
}

runBench(main);
