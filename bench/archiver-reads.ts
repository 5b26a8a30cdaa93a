/**
 * Micro-benchmark of the archiver alone (no Docker, no CVAT): a first backup of a folder into a
 * fresh LocalBackend repository with the worker pool, as `backup` runs it. Two data sets, built
 * once in a temp folder (page cache warm): BENCH_TINY (default 100000) small files in folders of
 * 1000, and BENCH_BIG_MB (default 2048) MiB of incompressible 1 MiB files.
 *
 * With `BENCH_BASELINE=<other checkout>/dist/src` the same runs are made with that build's
 * Archiver and Repository too, alternating, and the ratio is printed (e.g. before/after a change
 * to how the archiver reads). BENCH_ROUNDS (default 3) runs of each; the median counts. Every run
 * is a process of its own (two builds in one process would share the zstd WebAssembly state).
 *
 * Usage: npm run build && BENCH_BASELINE=/path/to/other/checkout/dist/src node dist/bench/archiver-reads.js
 */
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { run } from '../test/fixture/engine.js';
import { runBench } from './measure.js';
import type * as RepositoryModule from '../src/repository/repository.js';
import type * as BackendModule from '../src/backend/local.js';
import type * as ArchiverModule from '../src/repository/archiver.js';
import type { Repository } from '../src/repository/repository.js';
import type { ChunkPool } from '../src/repository/chunk-pool.js';

const TINY = Number(process.env['BENCH_TINY'] ?? 100_000);
const BIG_MB = Number(process.env['BENCH_BIG_MB'] ?? 2048);
const ROUNDS = Number(process.env['BENCH_ROUNDS'] ?? 3);
const FAST_KDF = { algorithm: 'scrypt', N: 1024, r: 8, p: 1 };

/** The few calls the benchmark needs, from whichever build it loads. */
interface Build {
  name: string;
  init(location: string): Promise<{ repo: unknown; pool: { close: () => Promise<void> }; flush: () => Promise<void> }>;
  archive(repo: unknown, pool: unknown, folder: string): Promise<void>;
}

async function load(name: string, srcDir: string): Promise<Build> {
  const url = (path: string): string => pathToFileURL(join(resolve(srcDir), path)).href;
  const { Repository: Repo } = (await import(url('repository/repository.js'))) as typeof RepositoryModule;
  const { LocalBackend } = (await import(url('backend/local.js'))) as typeof BackendModule;
  const { Archiver } = (await import(url('repository/archiver.js'))) as typeof ArchiverModule;
  return {
    name,
    init: async (location) => {
      const repo = await Repo.init(new LocalBackend(location), 'pw', { kdf: FAST_KDF as { algorithm: 'scrypt'; N: number; r: number; p: number } });
      const pool = repo.createChunkPool();
      return { repo, pool, flush: () => repo.flush() };
    },
    archive: async (repo, pool, folder) => {
      await new Archiver(repo as Repository, { pool: pool as ChunkPool }).archive(folder, undefined);
    },
  };
}

async function makeData(work: string): Promise<{ tiny: string; big: string }> {
  const tiny = join(work, 'tiny');
  for (let d = 0; d * 1000 < TINY; d++) {
    await mkdir(join(tiny, String(d)), { recursive: true });
    const writes: Promise<void>[] = [];
    for (let i = d * 1000; i < Math.min(TINY, (d + 1) * 1000); i++) {
      writes.push(writeFile(join(tiny, String(d), `f${i}.json`), `{"frame": ${i}, "pad": "${randomBytes(20 + (i % 400)).toString('hex')}"}\n`));
    }
    await Promise.all(writes);
  }
  const big = join(work, 'big');
  await mkdir(big);
  for (let i = 0; i < BIG_MB; i++) await writeFile(join(big, `${i}.jpg`), randomBytes(1 << 20));
  return { tiny, big };
}

/** Wall seconds, and CPU seconds of the whole process (all threads: main, workers, I/O pool). */
async function measureHere(build: Build, folder: string, work: string): Promise<{ wall: number; cpu: number }> {
  const location = join(work, `repo-${build.name}`);
  const { repo, pool, flush } = await build.init(location);
  try {
    const start = process.hrtime.bigint();
    const cpu = process.cpuUsage();
    await build.archive(repo, pool, folder);
    await flush();
    const used = process.cpuUsage(cpu);
    return { wall: Number(process.hrtime.bigint() - start) / 1e9, cpu: (used.user + used.system) / 1e6 };
  } finally {
    await pool.close();
    await rm(location, { recursive: true, force: true });
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** One run in a child process: `node archiver-reads.js measure <name> <src dir> <folder> <work>`. */
async function timeOne(build: { name: string; src: string }, folder: string, work: string): Promise<{ wall: number; cpu: number }> {
  const r = await run(process.execPath, [fileURLToPath(import.meta.url), 'measure', build.name, build.src, folder, work]);
  return JSON.parse(r.stdout) as { wall: number; cpu: number };
}

async function main(): Promise<void> {
  if (process.argv[2] === 'measure') {
    const [name, src, folder, work] = process.argv.slice(3) as [string, string, string, string];
    process.stdout.write(JSON.stringify(await measureHere(await load(name, src), folder, work)));
    return;
  }
  const builds = [{ name: 'this build', src: fileURLToPath(new URL('../src', import.meta.url)) }];
  const baseline = process.env['BENCH_BASELINE'];
  if (baseline) builds.unshift({ name: 'baseline', src: baseline });
  const work = await mkdtemp(join(tmpdir(), 'cvat-backup-bench-reads-'));
  try {
    const data = await makeData(work);
    for (const [label, folder] of [
      [`${TINY} small files`, data.tiny],
      [`${BIG_MB} MiB in 1 MiB files`, data.big],
    ] as const) {
      const times = new Map<string, { wall: number; cpu: number }[]>(builds.map((b) => [b.name, []]));
      for (let round = 0; round < ROUNDS; round++) {
        // Order alternates (ABBA), so neither build always runs right after the other's cleanup.
        for (const build of round % 2 === 0 ? builds : [...builds].reverse()) {
          times.get(build.name)!.push(await timeOne(build, folder, work));
          await run('sync', []);
        }
      }
      const medians = builds.map((b) => {
        const runs = times.get(b.name)!;
        return { name: b.name, wall: median(runs.map((r) => r.wall)), cpu: median(runs.map((r) => r.cpu)), runs };
      });
      const line = medians
        .map((m) => `${m.name} ${m.wall.toFixed(2)} s, cpu ${m.cpu.toFixed(2)} s (wall ${m.runs.map((r) => r.wall.toFixed(2)).join(', ')})`)
        .join(' | ');
      const ratio =
        medians.length === 2 ? ` | ratio wall ${(medians[1]!.wall / medians[0]!.wall).toFixed(2)}, cpu ${(medians[1]!.cpu / medians[0]!.cpu).toFixed(2)}` : '';
      process.stdout.write(`${label}: ${line}${ratio}\n`);
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

runBench(main);
