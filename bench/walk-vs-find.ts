/**
 * Benchmark: the full walk against `find`'s stat walk of the same tree (issue 10: full walk
 * <= 1.0x find). BENCH_FILES (default "200000,1000000") small files are written in folders of 1000,
 * spread over a few nested levels, into a plain folder on the disk that holds /work (the same
 * filesystem as the Docker volumes here). Warm: `find DIR -printf '%s %T@ %C@ %i\n'` is run twice
 * and the second run is timed. Ours is the archiver on a nothing-changed tree, which is what a
 * nightly phase 1 does: a first backup is made (untimed), then a second one with it as parent is
 * timed (twice, the second counted), with the native walk and with CVAT_BACKUP_NATIVE=off, each in
 * its own process. The local repository sits on the same disk.
 *
 * Usage: npm run build && node dist/bench/walk-vs-find.js
 * (BENCH_PROFILE=DIR writes a CPU profile of each timed walk there.)
 */
import { spawnSync } from 'node:child_process';
import { Session } from 'node:inspector/promises';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Repository } from '../src/repository/repository.js';
import { LocalBackend } from '../src/backend/local.js';
import { Archiver } from '../src/repository/archiver.js';
import { nativeHelper } from '../src/fs/native.js';
import { runBench } from './measure.js';

const SELF = fileURLToPath(import.meta.url);
const COUNTS = (process.env['BENCH_FILES'] ?? '200000,1000000').split(',').map(Number);
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

function timeFind(dir: string): number {
  const start = process.hrtime.bigint();
  const r = spawnSync('sh', ['-c', `find "$1" -printf '%s %T@ %C@ %i\\n' >/dev/null`, 'sh', dir], { stdio: 'inherit' });
  if (r.status !== 0) throw new Error('find failed');
  return seconds(start);
}

/** Child: first backup (untimed), then nothing-changed backups; prints the last one's seconds. */
async function child(repoPath: string, volume: string, label: string): Promise<void> {
  const repo = await Repository.init(new LocalBackend(repoPath), 'pw', { kdf: fastKdf });
  const pool = repo.createChunkPool(2);
  try {
    const first = await new Archiver(repo, { pool }).archive(volume, undefined);
    await repo.flush();
    let walk = 0;
    let tree = '';
    const profile = process.env['BENCH_PROFILE'];
    const session = new Session();
    for (let round = 0; round < 2; round++) {
      if (profile && round === 1) {
        session.connect();
        await session.post('Profiler.enable');
        await session.post('Profiler.start');
      }
      const start = process.hrtime.bigint();
      tree = (await new Archiver(repo, { pool }).archive(volume, first.tree)).tree;
      walk = seconds(start);
    }
    if (profile) {
      const { profile: taken } = await session.post('Profiler.stop');
      writeFileSync(join(profile, `${label}.cpuprofile`), JSON.stringify(taken));
      session.disconnect();
    }
    process.stdout.write(`${JSON.stringify({ walk, tree, native: nativeHelper() !== undefined })}\n`);
  } finally {
    await pool.close();
  }
}

function ours(work: string, volume: string, native: boolean, label: string): { walk: number; tree: string; native: boolean } {
  const repoPath = join(work, `repo-${label}`);
  const r = spawnSync(process.execPath, [SELF, 'child', repoPath, volume, label], {
    env: { ...process.env, CVAT_BACKUP_NATIVE: native ? 'on' : 'off' },
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 1 << 20,
  });
  rmSync(repoPath, { recursive: true, force: true });
  if (r.status !== 0) throw new Error(`archiver child failed (${r.status})`);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as { walk: number; tree: string; native: boolean };
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
      timeFind(volume);
      const find = timeFind(volume);
      const native = ours(work, volume, true, `native-${count}`);
      const plain = ours(work, volume, false, `js-${count}`);
      if (native.tree !== plain.tree) throw new Error(`tree ids differ: native ${native.tree}, pure JS ${plain.tree}`);
      const find2 = timeFind(volume);
      process.stdout.write(
        `${count} files: find ${find.toFixed(2)} s (again after: ${find2.toFixed(2)} s) | ours, nothing changed: native ${native.walk.toFixed(2)} s = ${(native.walk / find).toFixed(2)}x find` +
          `${native.native ? '' : ' (NATIVE HELPER NOT LOADED)'} | CVAT_BACKUP_NATIVE=off ${plain.walk.toFixed(2)} s = ${(plain.walk / find).toFixed(2)}x find | same tree id: yes\n`,
      );
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  }
}

runBench(main);
