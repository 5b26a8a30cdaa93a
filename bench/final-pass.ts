/**
 * Benchmark: the archiver's final pass, with and without a change journal, same run, no Docker.
 *
 * BENCH_FILES (default 200000) small files in folders of 1000 are written to a temporary folder;
 * a tolerant pass copies them (phase 1); then BENCH_CHANGED (default 8) files are written, in as
 * many folders, and the final pass runs twice against phase 1's tree: as today (a full walk that
 * compares every file's metadata) and with the changes as a journal reports them. Both must give
 * the same tree. Prints each pass's time and what it looked at, and the ratio.
 *
 * Usage: npm run build && node dist/bench/final-pass.js
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LocalBackend } from '../src/backend/local.js';
import { Repository } from '../src/repository/repository.js';
import { Archiver } from '../src/repository/archiver.js';
import { backupPoolSize } from '../src/repository/chunk-pool.js';
import { runBench } from './measure.js';

const FILES = Number(process.env['BENCH_FILES'] ?? 200_000);
const CHANGED = Number(process.env['BENCH_CHANGED'] ?? 8);
const ROUNDS = Number(process.env['BENCH_ROUNDS'] ?? 3);

/** The folder of the c-th changed file of a round: spread over the folders. */
function folderOf(c: number, round: number): string {
  return String(Math.floor(((c * 7919 + round * 104729) % FILES) / 1000));
}

async function main(): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'cvat-backup-final-pass-'));
  try {
    const volume = join(work, 'volume');
    for (let d = 0; d * 1000 < FILES; d++) {
      await mkdir(join(volume, String(d)), { recursive: true });
      const writes: Promise<void>[] = [];
      for (let i = d * 1000; i < Math.min(FILES, (d + 1) * 1000); i++) writes.push(writeFile(join(volume, String(d), `f${i}.json`), `{"frame": ${i}}\n`));
      await Promise.all(writes);
    }
    const repo = await Repository.init(new LocalBackend(join(work, 'repo')), 'pw', { kdf: { algorithm: 'scrypt', N: 1024, r: 8, p: 1 } });
    const pool = repo.createChunkPool(backupPoolSize());
    try {
      await pool.ready();
      let t = process.hrtime.bigint();
      const phase1 = new Archiver(repo, { pool, tolerateChanges: true });
      const parent = await phase1.archive(volume, undefined);
      await repo.flushPacksOnly();
      const facts = phase1.passFacts!;
      process.stdout.write(`${FILES} files in ${Math.ceil(FILES / 1000)} folders; phase 1: ${(Number(process.hrtime.bigint() - t) / 1e9).toFixed(2)} s\n`);
      const walkTimes: number[] = [];
      const journalTimes: number[] = [];
      for (let round = 0; round < ROUNDS; round++) {
        for (let c = 0; c < CHANGED; c++) {
          await writeFile(join(volume, folderOf(c, round), `changed-${round}-${c}.bin`), Buffer.alloc(2_000_000, round * CHANGED + c + 1));
        }
        t = process.hrtime.bigint();
        const walker = new Archiver(repo, { pool });
        const walked = await walker.archive(volume, parent.tree);
        walkTimes.push(Number(process.hrtime.bigint() - t) / 1e6);
        t = process.hrtime.bigint();
        const journaled = new Archiver(repo, { pool });
        const changes = new Map<string, ReadonlySet<string>>();
        // Every change since phase 1 (this round's and the earlier rounds').
        for (let r = 0; r <= round; r++) {
          for (let c = 0; c < CHANGED; c++) {
            const d = folderOf(c, r);
            changes.set(d, new Set([...(changes.get(d) ?? []), `changed-${r}-${c}.bin`]));
          }
        }
        const viaJournal = await journaled.archive(volume, parent.tree, { changes: { folders: changes }, parentPass: facts });
        journalTimes.push(Number(process.hrtime.bigint() - t) / 1e6);
        if (viaJournal.tree !== walked.tree || !viaJournal.journal?.used) throw new Error(`round ${round}: the journal pass differs from the walk (${JSON.stringify(viaJournal.journal)})`);
        process.stdout.write(
          `  round ${round + 1}: walk ${walkTimes.at(-1)!.toFixed(0)} ms (${walker.visits.lookups} lookups, ${walker.visits.foldersListed} folders listed, ${walker.visits.treesLoaded} trees loaded); ` +
            `journal ${journalTimes.at(-1)!.toFixed(0)} ms (${journaled.visits.lookups} lookups, ${journaled.visits.foldersListed} listed, ${journaled.visits.treesLoaded} trees loaded); same tree\n`,
        );
        await repo.flushPacksOnly();
      }
      const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
      const w = median(walkTimes);
      const j = median(journalTimes);
      process.stdout.write(`final pass, median of ${ROUNDS}: walk ${(w / 1000).toFixed(2)} s, journal ${(j / 1000).toFixed(3)} s; journal / walk = ${(j / w).toFixed(4)}\n`);
    } finally {
      await pool.close();
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

runBench(main);
