/**
 * Locks and prune under real concurrency: cvat-backup processes started against one local
 * repository so that they overlap — writers (`import`, and `backup` of the fixture deployment),
 * readers (`export`, `check`, `snapshots`, `restore`), exclusive maintenance (`forget --prune`,
 * `prune`) — some killed with SIGKILL at random points, some with their clock moved forward
 * (faketime) or another host name (a UTS namespace). Overlap is shown, not assumed: a sampler
 * reads the lock folder every few milliseconds. At the end, `check --read-data` and a byte-exact
 * export (and restore, for the deployment) of every surviving snapshot.
 *
 * Iteration counts: CONCURRENCY_ITERATIONS (waves of import/export/check/prune, default 4) and
 * CONCURRENCY_DOCKER_ITERATIONS (backups of the fixture deployment, default 2);
 * CONCURRENCY_SEED replays a run. `npm run soak` runs it with large counts.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BIN } from './fixture/cli.js';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { snapshotTree, type TreeEntry } from './fixture/tree.js';
import { processAlive } from '../src/host.js';

const ITERATIONS = Number(process.env['CONCURRENCY_ITERATIONS'] ?? 4);
const DOCKER_ITERATIONS = Number(process.env['CONCURRENCY_DOCKER_ITERATIONS'] ?? 2);
const SEED = Number(process.env['CONCURRENCY_SEED'] ?? Date.now() % 1_000_000);
const isRoot = process.getuid?.() === 0;
const hasFaketime = spawnSync('faketime', ['-f', '+1h', 'true']).status === 0;
const OTHER_HOST = 'other-host';
const SKEWS = ['+45m', '+3h', '+26h'];

/** A seeded random source, so a failing run can be replayed (the seed is in every message). */
function random(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 0x1_0000_0000;
  };
}
const rnd = random(SEED);
const pick = <T>(items: T[]): T => items[Math.floor(rnd() * items.length)]!;

function prngBytes(seed: number, length: number): Buffer {
  const next = random(seed);
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) out.writeUInt32LE(Math.floor(next() * 0x1_0000_0000), Math.min(i, length - 4));
  return out;
}

type Role = 'writer' | 'reader' | 'exclusive';

interface Run {
  role: Role;
  label: string;
  args: string[];
  /** The spawned process (unless `wrapped`: the cvat-backup process itself, whose pid its lock shows). */
  pid: number;
  wrapped: boolean;
  /** stderr as it came, with times. */
  events: { t: number; text: string }[];
  host?: string;
  skew?: string;
  killAfterMs?: number;
  start: number;
  end: number;
  code: number | null;
  killed: boolean;
  stdout: string;
  stderr: string;
}

interface LockSample {
  t: number;
  /** `parent`: the holder's parent process when sampled (a clock-moved run's lock is its wrapper's child's). */
  locks: { operation: string; pid: number; parent?: number; hostname: string; exclusive: boolean }[];
}

/** The parent pid of a running process (from /proc/PID/stat), or undefined once it is gone. */
async function parentPid(pid: number): Promise<number | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  const fields = stat?.slice(stat.lastIndexOf(')') + 2).split(' ');
  return fields?.[1] === undefined ? undefined : Number(fields[1]);
}

/** Reads the lock folder every few milliseconds: which locks existed when. */
class LockSampler {
  readonly samples: LockSample[] = [];
  private timer: NodeJS.Timeout | undefined;
  private busy = false;

  constructor(private readonly dir: string) {}

  start(): void {
    this.timer = setInterval(() => {
      if (this.busy) return;
      this.busy = true;
      void this.sample().finally(() => (this.busy = false));
    }, 15);
  }

  stop(): void {
    clearInterval(this.timer);
  }

  private async sample(): Promise<void> {
    const t = Date.now();
    const locks: LockSample['locks'] = [];
    for (const name of await readdir(this.dir).catch(() => [])) {
      if (name.startsWith('.')) continue;
      const text = await readFile(join(this.dir, name), 'utf8').catch(() => undefined);
      if (text === undefined) continue;
      try {
        const l = JSON.parse(text) as LockSample['locks'][number];
        const parent = await parentPid(l.pid);
        locks.push({ operation: l.operation, pid: l.pid, ...(parent === undefined ? {} : { parent }), hostname: l.hostname, exclusive: l.exclusive });
      } catch {
        // half-read while being replaced: the next sample sees it
      }
    }
    this.samples.push({ t, locks });
  }
}

/**
 * Starts the real command line as its own process group (wrappers included), optionally on
 * another host name, with a clock moved forward, and killed with SIGKILL after a while.
 */
function launch(
  role: Role,
  args: string[],
  env: NodeJS.ProcessEnv,
  options: {
    host?: string;
    skew?: string;
    killAfterMs?: number;
    delayMs?: number;
    /** SIGKILL once it holds a lock in this folder. */
    killOnceLockedIn?: string;
    /** SIGSTOP once it holds a lock in `dir`, SIGCONT when `until` settles: a run slow at the worst moment. */
    pauseOnceLockedIn?: { dir: string; until: Promise<unknown>; paused: () => void };
    /** Called with each piece of stderr as it comes. */
    onStderr?: (text: string) => void;
  } = {},
): Promise<Run> {
  return new Promise((resolve, reject) => {
    setTimeout(() => {
      let argv = [process.execPath, BIN, ...args];
      if (options.skew) argv = ['faketime', '-f', options.skew, ...argv];
      if (options.host) argv = ['unshare', '--uts', 'sh', '-c', `hostname ${options.host} && exec "$@"`, 'sh', ...argv];
      const run: Run = {
        role,
        label: `${args.filter((a) => !a.startsWith('/')).join(' ')}${options.host ? ` @${options.host}` : ''}${options.skew ? ` clock${options.skew}` : ''}`,
        args,
        ...(options.host ? { host: options.host } : {}),
        ...(options.skew ? { skew: options.skew } : {}),
        ...(options.killAfterMs !== undefined ? { killAfterMs: options.killAfterMs } : {}),
        pid: -1,
        // faketime runs the command as its child; unshare and sh exec it (the pid stays).
        wrapped: options.skew !== undefined,
        events: [],
        start: Date.now(),
        end: 0,
        code: null,
        killed: false,
        stdout: '',
        stderr: '',
      };
      const child = spawn(argv[0]!, argv.slice(1), { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
      child.stdout.on('data', (c: Buffer) => (run.stdout += c.toString()));
      run.pid = child.pid ?? -1;
      child.stderr.on('data', (c: Buffer) => {
        run.stderr += c.toString();
        run.events.push({ t: Date.now(), text: c.toString() });
        options.onStderr?.(c.toString());
      });
      let killer: NodeJS.Timeout | undefined;
      if (options.killAfterMs !== undefined) {
        killer = setTimeout(() => {
          run.killed = true;
          try {
            process.kill(-child.pid!, 'SIGKILL');
          } catch {
            // already gone
          }
        }, options.killAfterMs);
      }
      let watcher: NodeJS.Timeout | undefined;
      const watched = options.killOnceLockedIn ?? options.pauseOnceLockedIn?.dir;
      if (watched !== undefined) {
        // Killed or paused at the worst moment for the others: while it holds its repository lock.
        let seen = false;
        watcher = setInterval(() => {
          void (async () => {
            for (const name of await readdir(watched).catch(() => [])) {
              if (name.startsWith('.')) continue; // a lock file being written is not a lock yet
              const text = await readFile(join(watched, name), 'utf8').catch(() => '');
              if (!text.includes(`"pid":${child.pid},`) || seen) continue;
              seen = true;
              clearInterval(watcher);
              if (options.killOnceLockedIn !== undefined) {
                run.killed = true;
                process.kill(-child.pid!, 'SIGKILL');
              } else {
                const pause = options.pauseOnceLockedIn!;
                process.kill(-child.pid!, 'SIGSTOP');
                pause.paused();
                void pause.until.finally(() => process.kill(-child.pid!, 'SIGCONT'));
              }
            }
          })();
        }, 5);
      }
      child.on('error', reject);
      child.on('close', (code) => {
        clearTimeout(killer);
        clearInterval(watcher);
        run.end = Date.now();
        run.code = code;
        resolve(run);
      });
    }, options.delayMs ?? 0);
  });
}

/** Exit codes each kind of process may end with when it was not killed. */
const ALLOWED: Record<Role, number[]> = {
  // 10: the lock was busy (and the wait, if any, ran out); 16: the lock was lost (only possible
  // after a lock was taken for stale).
  writer: [0, 10, 16],
  reader: [0, 10, 16],
  exclusive: [0, 10, 16],
};

function assertAllowed(run: Run): void {
  if (run.killed) return;
  assert.ok(ALLOWED[run.role].includes(run.code ?? -1), `seed ${SEED}: '${run.label}' exited ${run.code}:\n${run.stderr}`);
  assert.doesNotMatch(run.stderr, /internal error/, `seed ${SEED}: '${run.label}'`);
}

/** When a maintenance run had its lock: its first phase line comes right after. */
function lockedAt(run: Run): number | undefined {
  return run.events.find((e) => /finding data in use/.test(e.text))?.t;
}

/**
 * The run that a sampled lock belongs to: the process we started, or for a wrapped run (faketime
 * runs cvat-backup as its child) the child of that process.
 */
function runOf(runs: Run[], lock: { pid: number; parent?: number }, t: number): Run | undefined {
  return runs.find((r) => (r.wrapped ? r.pid === lock.parent : r.pid === lock.pid) && r.start <= t && t <= r.end);
}

/**
 * Overlap shown by the lock samples: a writer's and a reader's locks present at one instant, each
 * held by a process of ours that went on to succeed, and no exclusive lock beside them.
 */
function overlapSeen(samples: LockSample[], runs: Run[]): { t: number; writer: string; reader: string } | undefined {
  for (const s of samples) {
    if (s.locks.some((l) => l.exclusive)) continue;
    const held = s.locks.map((l) => runOf(runs, l, s.t)).filter((r): r is Run => r !== undefined && r.code === 0 && !r.killed);
    const writer = held.find((r) => r.role === 'writer');
    const reader = held.find((r) => r.role === 'reader');
    if (writer && reader) return { t: s.t, writer: writer.label, reader: reader.label };
  }
  return undefined;
}

/**
 * A maintenance run that met shared locks held by processes of ours when it first tried to take
 * its lock: it either refused (exit 10, naming a holder) or waited — and took its lock only after
 * every one of those holders had ended.
 */
function exclusiveBehaved(samples: LockSample[], runs: Run[], run: Run): 'refused' | 'waited' | 'wrong' | undefined {
  if (run.killed || run.wrapped) return undefined;
  const firstTry = run.code === 10 ? run.end : run.events.find((e) => /waiting up to/.test(e.text))?.t;
  if (firstTry === undefined) return undefined; // nothing was in its way
  const holders = new Set<Run>();
  for (const s of samples.filter((x) => x.t >= firstTry - 300 && x.t <= firstTry)) {
    for (const l of s.locks) {
      const holder = !l.exclusive ? runOf(runs, l, s.t) : undefined;
      if (holder && holder !== run) holders.add(holder);
    }
  }
  if (holders.size === 0) return undefined;
  if (run.code === 10) return /is locked by/.test(run.stderr) ? 'refused' : 'wrong';
  const at = lockedAt(run);
  if (run.code !== 0 || at === undefined) return undefined;
  return [...holders].every((h) => h.end <= at + 50) ? 'waited' : 'wrong';
}

/** Removes, as an operator would, the lock files of killed processes of another host (stale only after 30 min). */
async function clearOtherHostLeftovers(locksDir: string): Promise<number> {
  let removed = 0;
  for (const name of await readdir(locksDir)) {
    const text = await readFile(join(locksDir, name), 'utf8').catch(() => undefined);
    if (!text) continue;
    const lock = JSON.parse(text) as { hostname: string; pid: number };
    if (lock.hostname === OTHER_HOST && !processAlive(lock.pid)) {
      await rm(join(locksDir, name), { force: true });
      removed++;
    }
  }
  return removed;
}

function contentOf(tree: Record<string, TreeEntry>): Record<string, Omit<TreeEntry, 'mtime' | 'uid' | 'gid' | 'linkGroup'>> {
  const out: Record<string, Omit<TreeEntry, 'mtime' | 'uid' | 'gid' | 'linkGroup'>> = {};
  for (const [path, e] of Object.entries(tree)) {
    if (path === '.') continue;
    out[path] = { type: e.type, mode: e.mode, size: e.size, ...(e.sha256 ? { sha256: e.sha256 } : {}), ...(e.target ? { target: e.target } : {}) };
  }
  return out;
}

describe('concurrent writers, readers and prunes on one repository (processes)', { skip: !hasFaketime && 'needs faketime (apt-get install faketime)' }, () => {
  let work: string;
  let env: NodeJS.ProcessEnv;
  let sampler: LockSampler;
  const sets: string[] = [];
  const runs: Run[] = [];
  const SETS = 6;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-concurrency-'));
    env = { CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'pw-concurrency' };
    const init = await launch('writer', ['init'], env);
    assert.equal(init.code, 0, init.stderr);
    // Archive sets made with tar, as the guide makes them: set i holds a base every set shares,
    // groups i and i+1 (so forgetting a set leaves packs partly used), a marker naming the set,
    // and small files.
    for (let i = 0; i < SETS; i++) {
      const src = join(work, `src-${i}`);
      const data = join(src, 'home/django/data');
      await mkdir(join(data, 'small'), { recursive: true });
      for (let b = 0; b < 3; b++) await writeFile(join(data, `base-${b}.bin`), prngBytes(1000 + b, 2 << 20));
      for (const g of [i, i + 1]) for (let k = 0; k < 2; k++) await writeFile(join(data, `group-${g}-${k}.bin`), prngBytes(2000 + g * 10 + k, 2_000_000 + ((g * 7 + k * 3) % 10) * 200_000));
      for (let k = 0; k < 10; k++) await writeFile(join(data, 'small', `f${k}.txt`), `set ${i} file ${k}\n`);
      await writeFile(join(data, 'SET'), String(i));
      const set = join(work, `set-${i}`);
      await mkdir(set);
      const tar = spawnSync('tar', ['-czf', join(set, 'cvat_data.tar.gz'), '-C', src, 'home/django/data']);
      assert.equal(tar.status, 0, tar.stderr.toString());
      sets.push(set);
    }
    const first = await launch('writer', ['--project', 'conc', 'import', sets[0]!, '--cvat-version', '2.73.0'], env);
    assert.equal(first.code, 0, first.stderr);
    sampler = new LockSampler(join(work, 'repo', 'locks'));
    sampler.start();
  });
  after(async () => {
    sampler?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it(`${ITERATIONS} waves of overlapping imports, exports, checks and prunes, with kills, skewed clocks and another host (seed ${SEED})`, async () => {
    for (let wave = 0; wave < ITERATIONS; wave++) {
      const importArgs = (): string[] => ['--project', 'conc', 'import', pick(sets), '--cvat-version', '2.73.0'];
      const reader = (): string[] =>
        pick([
          ['export', 'latest', '--to', join(work, `export-${wave}-${Math.floor(rnd() * 1e9)}`)],
          ['check', '--read-data'],
          ['check'],
          ['snapshots'],
        ]);
      const exclusive = (): string[] =>
        pick([
          ['prune', '--max-unused', pick(['0%', '5%', '20%'])],
          ['forget', '--keep-last', String(2 + Math.floor(rnd() * 3)), '--prune', '--max-unused', pick(['0%', '5%'])],
        ]);
      const plan: { role: Role; args: string[] }[] = [
        { role: 'writer', args: importArgs() },
        { role: 'writer', args: importArgs() },
        { role: 'reader', args: reader() },
        { role: 'reader', args: ['export', 'latest', '--to', join(work, `export-${wave}-b`)] },
        { role: 'exclusive', args: exclusive() },
      ];
      // Every wave: one process killed at a random point, one with its clock moved forward, one
      // on another host (as root), and the exclusive one started while the others run, waiting
      // for the lock every other wave.
      // Every other wave the maintenance process itself is spared (so that its meeting with the
      // shared locks can be judged); a killed process of another host leaves a lock that is stale
      // only after 30 minutes — that case has its own step below.
      const candidates = wave % 2 === 0 ? plan.length - 1 : plan.length;
      const killed = Math.floor(rnd() * candidates);
      const skewed = Math.floor(rnd() * candidates);
      const remote = (killed + 1 + Math.floor(rnd() * (candidates - 1))) % candidates;
      const started = plan.map((p, i) => {
        const retry = p.role === 'exclusive' ? (wave % 2 === 0 ? ['--retry-lock', '2m'] : []) : rnd() < 0.5 ? ['--retry-lock', '1m'] : [];
        return launch(p.role, [...retry, ...p.args], env, {
          delayMs: p.role === 'exclusive' ? 300 + Math.floor(rnd() * 700) : Math.floor(rnd() * 300),
          ...(i === killed ? { killAfterMs: 100 + Math.floor(rnd() * 2500) } : {}),
          ...(i === skewed ? { skew: pick(SKEWS) } : {}),
          ...(i === remote && isRoot ? { host: OTHER_HOST } : {}),
        });
      });
      const done = await Promise.all(started);
      runs.push(...done);
      for (const r of done) assertAllowed(r);
      await clearOtherHostLeftovers(join(work, 'repo', 'locks'));
      // Between waves, with nothing running, the repository is sound.
      const check = await launch('reader', ['check'], env);
      assert.equal(check.code, 0, `seed ${SEED}, after wave ${wave}: ${check.stderr}\n${done.map((r) => `${r.label}: ${r.killed ? 'killed' : r.code}`).join('\n')}`);
    }
    sampler.stop();

    // Shown, not assumed: a writer and a reader held their locks at the same instant …
    const overlap = overlapSeen(sampler.samples, runs);
    if (process.env['CONCURRENCY_DEBUG']) {
      for (const sample of sampler.samples.filter((x) => x.locks.length > 1)) process.stderr.write(`${sample.t} ${JSON.stringify(sample.locks)}\n`);
      for (const r of runs) process.stderr.write(`${r.pid} ${r.start}-${r.end} ${r.label} ${r.killed ? 'killed' : r.code} ${JSON.stringify(r.events.map((e) => [e.t, e.text.slice(0, 60)]))}\n`);
    }
    assert.ok(overlap, `seed ${SEED}: no sample shows a writer and a reader holding locks at once`);
    // … and maintenance met shared locks and refused or waited for them to go.
    const behaved = runs.filter((r) => r.role === 'exclusive').map((r) => exclusiveBehaved(sampler.samples, runs, r));
    assert.ok(!behaved.includes('wrong'), `seed ${SEED}: a prune went on while a shared lock was held: ${JSON.stringify(behaved)}`);
    assert.ok(behaved.some((b) => b === 'refused' || b === 'waited'), `seed ${SEED}: no prune met a shared lock (${JSON.stringify(behaved)})`);
    const ran = {
      killed: runs.filter((r) => r.killed).length,
      skewed: runs.filter((r) => r.skew).length,
      otherHost: runs.filter((r) => r.host).length,
      prunesWaited: behaved.filter((b) => b === 'waited').length,
      prunesRefused: behaved.filter((b) => b === 'refused').length,
      exits: Object.fromEntries(['writer', 'reader', 'exclusive'].map((role) => [role, runs.filter((r) => r.role === role).map((r) => (r.killed ? 'k' : String(r.code))).join('')])),
    };
    process.stderr.write(`concurrency (seed ${SEED}): ${runs.length} processes, ${JSON.stringify(ran)}; overlap: ${JSON.stringify(overlap)}\n`);
    assert.ok(ran.skewed >= ITERATIONS && ran.otherHost >= (isRoot ? ITERATIONS : 0));
  });

  it("a killed process's lock: gone at once on its own host, kept 30 minutes from another host", { skip: !isRoot && 'another host name needs a UTS namespace (root)' }, async () => {
    const locks = join(work, 'repo', 'locks');
    const local = await launch('writer', ['--project', 'conc', 'import', sets[1]!, '--cvat-version', '2.73.0'], env, { killOnceLockedIn: locks });
    assert.ok(local.killed);
    const remote = await launch('writer', ['--project', 'conc', 'import', sets[2]!, '--cvat-version', '2.73.0'], env, { host: OTHER_HOST, killOnceLockedIn: locks });
    assert.ok(remote.killed);
    const lockFiles = async (): Promise<string[]> => (await readdir(locks)).filter((n) => !n.startsWith('.'));
    assert.equal(
      (await lockFiles()).length,
      2,
      `the killed processes left their locks: ${(await Promise.all((await readdir(locks)).map((n) => readFile(join(locks, n), 'utf8')))).join('\n')}\nlocal: ${JSON.stringify(local)}\nremote: ${JSON.stringify(remote)}`,
    );
    const before = await Promise.all((await readdir(locks)).map((n) => readFile(join(locks, n), 'utf8')));
    const refused = await launch('exclusive', ['prune'], env);
    const afterwards = await Promise.all((await readdir(locks)).map((n) => readFile(join(locks, n), 'utf8')));
    assert.equal(refused.code, 10, `${refused.stderr}\nlocks before: ${before.join('\n')}\nlocks after: ${afterwards.join('\n')}\nlocal: ${JSON.stringify(local)}\nremote: ${JSON.stringify(remote)}`);
    assert.match(refused.stderr, new RegExp(`is locked by import \\(shared, pid \\d+ on ${OTHER_HOST}`));
    assert.match(refused.stderr, /30 min after its last refresh, or remove/);
    // What the message says to do, once the operator knows that process is gone.
    assert.equal(await clearOtherHostLeftovers(locks), 1);
    const prune = await launch('exclusive', ['prune'], env);
    assert.equal(prune.code, 0, prune.stderr);
    assert.deepEqual(await lockFiles(), [], "the same host's dead lock was removed as stale");
  });

  it('afterwards: prune, check --read-data, and every surviving snapshot exports byte for byte', async () => {
    await clearOtherHostLeftovers(join(work, 'repo', 'locks'));
    const prune = await launch('exclusive', ['prune'], env);
    assert.equal(prune.code, 0, prune.stderr);
    const check = await launch('reader', ['check', '--read-data'], env);
    assert.equal(check.code, 0, check.stderr);
    const list = await launch('reader', ['--json', 'snapshots'], env);
    const snapshots = JSON.parse(list.stdout) as { id: string }[];
    assert.ok(snapshots.length >= 1);
    for (const s of snapshots) {
      const dir = join(work, `final-${s.id.slice(0, 8)}`);
      const e = await launch('reader', ['export', s.id, '--to', dir], env);
      assert.equal(e.code, 0, e.stderr);
      const out = join(dir, 'x');
      await mkdir(out);
      const tar = spawnSync('tar', ['-xzf', join(dir, 'cvat_data.tar.gz'), '-C', out]);
      assert.equal(tar.status, 0, tar.stderr.toString());
      const set = (await readFile(join(out, 'home/django/data/SET'), 'utf8')).trim();
      assert.deepEqual(
        contentOf(await snapshotTree(join(out, 'home/django/data'))),
        contentOf(await snapshotTree(join(work, `src-${set}`, 'home/django/data'))),
        `seed ${SEED}: snapshot ${s.id.slice(0, 8)} (set ${set})`,
      );
      await rm(dir, { recursive: true, force: true });
    }
    process.stderr.write(`concurrency (seed ${SEED}): ${snapshots.length} surviving snapshots exported byte for byte\n`);
  });
});

describe('concurrent backups, restores and prunes of the fixture deployment', { skip: (!isRoot && 'repository backups read volume folders: needs root') || (DOCKER_ITERATIONS === 0 && 'CONCURRENCY_DOCKER_ITERATIONS=0') }, () => {
  let f: FixtureDeployment;
  let work: string;
  let env: NodeJS.ProcessEnv;
  /** What the deployment held during each iteration (the data does not change while it runs). */
  const states: { from: number; to: number; rows: string; media: Record<string, TreeEntry> }[] = [];

  const capture = async (): Promise<{ rows: string; media: Record<string, TreeEntry> }> => ({
    rows: await databaseFingerprint(f),
    media: await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true }),
  });

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'cc' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-concurrency-docker-'));
    env = { CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'pw-concurrency-docker' };
    const init = await launch('writer', ['init'], env);
    assert.equal(init.code, 0, init.stderr);
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it(`${DOCKER_ITERATIONS} backups overlapping check and forget --prune, some killed`, async () => {
    const runs: Run[] = [];
    for (let i = 0; i < DOCKER_ITERATIONS; i++) {
      // Each iteration the deployment changes a little (new media, new rows), then holds still.
      const media = join(await f.volumePath('cvat_data'), 'data/1/raw');
      await writeFile(join(media, `iteration-${i}.bin`), prngBytes(SEED + i, 1_500_000));
      await f.waitForDatabase();
      await f.psql(`INSERT INTO engine_task (name) SELECT 'iteration ${i} task ' || g FROM generate_series(1, 20) g;`);
      const from = Date.now();
      const state = await capture();
      const kill = i % 2 === 1;
      const done = await Promise.all([
        launch('writer', ['--project', f.project, '--json', 'backup'], env, kill ? { killAfterMs: 800 + Math.floor(rnd() * 4000) } : {}),
        launch('reader', ['check', '--read-data'], env, { delayMs: 200 }),
        launch('exclusive', [...(i % 2 === 0 ? ['--retry-lock', '3m'] : []), 'forget', '--keep-last', '2', '--prune'], env, { delayMs: 500 + Math.floor(rnd() * 1000) }),
      ]);
      runs.push(...done);
      for (const r of done) assertAllowed(r);
      states.push({ from, to: Date.now(), ...state });
      // A backup killed while CVAT was stopped leaves it stopped until the next cvat-backup run
      // (or compose start): the test changes the data next, so it starts it itself.
      if (done[0].killed) await f.compose(['start']);
    }
    process.stderr.write(`concurrency with backups (seed ${SEED}): ${runs.map((r) => `${r.label}: ${r.killed ? 'killed' : r.code}`).join('; ')}\n`);
  });

  it('restore latest while a prune waits, then every surviving snapshot restores byte for byte; check --read-data is clean', async () => {
    const list = async (): Promise<{ id: string; time: string }[]> => JSON.parse((await launch('reader', ['--json', 'snapshots'], env)).stdout) as { id: string; time: string }[];
    const stateOf = (time: string): (typeof states)[number] => {
      const t = Date.parse(time);
      const s = states.find((x) => t >= x.from - 1000 && t <= x.to);
      assert.ok(s, `snapshot at ${time} belongs to no iteration`);
      return s;
    };
    const snapshots = await list();
    assert.ok(snapshots.length >= 1, 'some backup survived');
    // The restore is paused while it holds its lock until the prune says it waits: however fast
    // the restore, the prune meets its lock.
    let waiting!: () => void;
    let paused!: () => void;
    const pruneWaits = new Promise<void>((resolve) => (waiting = resolve));
    const restorePaused = new Promise<void>((resolve) => (paused = resolve));
    const locks = join(String(env.CVAT_BACKUP_REPO), 'locks');
    const restoring = launch('reader', ['--project', f.project, 'restore', 'latest'], env, { pauseOnceLockedIn: { dir: locks, until: pruneWaits, paused } });
    await Promise.race([restorePaused, restoring]);
    const pruning = launch('exclusive', ['--retry-lock', '5m', 'prune'], env, { onStderr: (text) => /waiting up to/.test(text) && waiting() });
    void pruning.finally(() => waiting()); // a prune that never waits must not leave the restore paused
    const [restore, prune] = await Promise.all([restoring, pruning]);
    assert.equal(restore.code, 0, restore.stderr);
    assert.equal(prune.code, 0, prune.stderr);
    assert.match(prune.stderr, /waiting up to/, 'the prune waited for the restore');
    assert.ok((lockedAt(prune) ?? 0) >= restore.end, 'and took its lock only after the restore ended');
    await f.waitForDatabase();
    const latest = stateOf(snapshots[snapshots.length - 1]!.time);
    const now = await capture();
    assert.equal(now.rows, latest.rows);
    assert.deepEqual(now.media, latest.media);
    for (const s of await list()) {
      const r = await launch('reader', ['--project', f.project, 'restore', s.id], env);
      assert.equal(r.code, 0, r.stderr);
      await f.waitForDatabase();
      const expected = stateOf(s.time);
      const got = await capture();
      assert.equal(got.rows, expected.rows, `snapshot ${s.id.slice(0, 8)} rows`);
      assert.deepEqual(got.media, expected.media, `snapshot ${s.id.slice(0, 8)} media`);
    }
    const states_ = await f.states();
    assert.ok(Object.values(states_).every((s) => s === 'running'), JSON.stringify(states_));
    const check = await launch('reader', ['check', '--read-data'], env);
    assert.equal(check.code, 0, check.stderr);
  });
});
