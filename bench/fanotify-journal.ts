/**
 * Benchmark: the fanotify change journal (src/fs/fanotify-journal.ts) under a writer that makes
 * BENCH_WRITES (default 200000) small writes, in another process, while the journal runs:
 *  - "new files": BENCH_WRITES files created and written in folders of 1000;
 *  - "rewrites": BENCH_WRITES appends spread over 1000 existing files (what the dedup set is for);
 *  - "spread": one append to a file in each of BENCH_FOLDERS (default 20000) existing folders (what
 *    collect()'s mapping of folders to paths costs).
 * Prints, per scenario: the writer's time without and with the journal (ratio), events read, the
 * distinct names collected against those expected (drop rate), the reader thread's CPU time, the
 * native sets' heap and the process's RSS growth, and collect()'s time (drain, path mapping, total).
 * Needs root and the native helper (sh scripts/build-native.sh).
 *
 * Usage: npx tsc -p tsconfig.json && node dist/bench/fanotify-journal.js
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { startFanotifyJournal } from '../src/fs/fanotify-journal.js';

const WRITES = Number(process.env['BENCH_WRITES'] ?? '200000');
const PER_FOLDER = 1000;
const SPREAD = Number(process.env['BENCH_FOLDERS'] ?? '20000');
type Scenario = 'new' | 'rewrite' | 'spread';
const LABEL: Record<Scenario, string> = { new: 'new files', rewrite: 'rewrites', spread: 'spread' };

function seconds(since: bigint): number {
  return Number(process.hrtime.bigint() - since) / 1e9;
}

/** CPU seconds (user + system) of one thread of this process. */
function threadCpu(tid: number): number {
  const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in USER_HZ (100)
}

/** The writer: another Node process making WRITES synchronous writes (open, write, close each). */
function writer(scenario: Scenario, root: string, round: string): number {
  const script =
    scenario === 'spread'
      ? `const fs = require('node:fs');
for (let d = 0; d < ${SPREAD}; d++) fs.appendFileSync('spread/' + d + '/f', '${round}');`
      : scenario === 'new'
      ? `const fs = require('node:fs');
for (let d = 0; d * ${PER_FOLDER} < ${WRITES}; d++) {
  fs.mkdirSync('${round}-' + d);
  for (let i = 0; i < ${PER_FOLDER}; i++) fs.writeFileSync('${round}-' + d + '/f' + i, String(i));
}`
      : `const fs = require('node:fs');
for (let n = 0; n * ${PER_FOLDER} < ${WRITES}; n++) for (let i = 0; i < ${PER_FOLDER}; i++) fs.appendFileSync('rewrite/f' + i, String(n));`;
  const start = process.hrtime.bigint();
  execFileSync(process.execPath, ['-e', script], { cwd: root, stdio: 'inherit' });
  return seconds(start);
}

const ROUNDS = Number(process.env['BENCH_ROUNDS'] ?? '2');

async function scenario(name: Scenario, root: string): Promise<void> {
  if (name === 'spread') {
    for (let d = 0; d < SPREAD; d++) {
      await mkdir(join(root, 'spread', String(d)), { recursive: true });
      await writeFile(join(root, 'spread', String(d), 'f'), '');
    }
  }
  if (name === 'rewrite') {
    await mkdir(join(root, 'rewrite'), { recursive: true });
    await Promise.all(Array.from({ length: PER_FOLDER }, (_, i) => writeFile(join(root, 'rewrite', `f${i}`), '')));
  }
  // Rounds alternate the writer without and with a journal (the machine is shared): best of each.
  let without = Infinity;
  let withJournal = Infinity;
  for (let round = 0; round < ROUNDS; round++) {
    without = Math.min(without, writer(name, root, `plain-${round}`));
    const rssBefore = process.memoryUsage().rss;
    const started = await startFanotifyJournal([root]);
    if (!started.ok) throw new Error(started.reason);
    const journal = started.journal;
    try {
      // The reader thread's id, once it runs (collect() reports it).
      let tid = 0;
      while (!tid) {
        await journal.collect();
        tid = journal.counters?.readerTid ?? 0;
        if (!tid) await new Promise((resolve) => setTimeout(resolve, 10));
      }
      const cpu0 = threadCpu(tid);
      const took = writer(name, root, `journaled-${round}`);
      withJournal = Math.min(withJournal, took);
      const cpu = threadCpu(tid) - cpu0;
      const t = process.hrtime.bigint();
      const results = await journal.collect();
      const collectS = seconds(t);
      const c = journal.counters!;
      const result = results.get(root);
      if (!result?.ok) throw new Error('journal not ok');
      // Distinct entries the native set must hold (folders with changes + names), none dropped:
      // new files: each file and each new folder's name, each new folder and the root;
      // rewrites: each file, and its folder.
      const folders = Math.ceil(WRITES / PER_FOLDER);
      const expected = name === 'new' ? WRITES + 2 * folders + 1 : name === 'rewrite' ? PER_FOLDER + 1 : SPREAD * 2;
      if (name === 'new' && result.changes.folders.get(`journaled-${round}-${folders - 1}`) !== 'all') throw new Error('last folder missing');
      if (name === 'rewrite') {
        const set = result.changes.folders.get('rewrite');
        if (set === undefined || set === 'all' || set.size !== PER_FOLDER) throw new Error('rewrites missing');
      }
      const rss = (process.memoryUsage().rss - rssBefore) / 2 ** 20;
      console.log(`${LABEL[name]}, round ${round + 1}: writer ${took.toFixed(2)} s with the journal`);
      console.log(`  events read ${c.events} (own ${c.ownEvents}, outside the volume ${c.outsideEvents}); distinct entries ${c.entries} of ${expected} expected (drop rate ${((expected - c.entries) / expected).toFixed(6)})`);
      console.log(`  reader thread CPU ${cpu.toFixed(2)} s (${((cpu / took) * 100).toFixed(0)}% of one core while the writer ran); native sets ${(c.bytes / 2 ** 20).toFixed(1)} MiB for ${c.entries} entries; RSS +${rss.toFixed(1)} MiB`);
      console.log(`  collect ${(collectS * 1000).toFixed(0)} ms (queue drain ${c.drainMs.toFixed(1)} ms, path mapping ${c.resolveMs.toFixed(1)} ms; ${c.resolutions} path resolutions in all)`);
    } finally {
      await journal.close();
    }
  }
  console.log(`${LABEL[name]}: ${name === 'spread' ? SPREAD : WRITES} writes; writer best ${without.toFixed(2)} s without the journal, ${withJournal.toFixed(2)} s with (x${(withJournal / without).toFixed(2)})`);
}

async function main(): Promise<void> {
  console.log(`load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}; ${WRITES} writes per scenario`);
  for (const name of (process.env['BENCH_SCENARIOS'] ?? 'new,rewrite,spread').split(',') as Scenario[]) {
    const root = await mkdtemp(join(tmpdir(), 'cvat-backup-journal-bench-'));
    try {
      await scenario(name, root);
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  }
}

await main();
