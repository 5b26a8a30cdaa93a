import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readdirSync, readlinkSync, writeFileSync } from 'node:fs';
import { link, mkdir, mkdtemp, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { JournalResult } from './change-journal.js';
import { startFanotifyJournal, type FanotifyJournal, type FanotifyJournalOptions } from './fanotify-journal.js';

// Real fanotify on the filesystem that holds the temp folder (here the same as /var/lib/docker's):
// needs root and the native helper; with CVAT_BACKUP_NATIVE=off only the fallback test runs.
const off = process.env['CVAT_BACKUP_NATIVE'] === 'off';

/** Runs a shell command in another process (so its events are not this process's own). */
function sh(cwd: string, script: string): void {
  execFileSync('sh', ['-c', `set -e\n${script}`], { cwd, stdio: ['ignore', 'ignore', 'inherit'] });
}

/** A result as plain data: folder -> sorted names or 'all'. */
function plain(result: JournalResult | undefined): Record<string, string[] | 'all'> | string {
  assert.ok(result, 'no result for the volume');
  if (!result.ok) return `not ok: ${result.reason}`;
  const out: Record<string, string[] | 'all'> = {};
  for (const [folder, names] of [...result.changes.folders].sort(([a], [b]) => (a < b ? -1 : 1)))
    out[folder] = names === 'all' ? 'all' : [...names].sort();
  return out;
}

async function start(roots: string[], options: FanotifyJournalOptions = {}): Promise<FanotifyJournal> {
  const started = await startFanotifyJournal(roots, options);
  assert.ok(started.ok, started.ok ? '' : started.reason);
  return started.journal;
}

function fanotifyFds(): number {
  let n = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:[fanotify]') n++;
    } catch {
      // the listing's own fd, gone by now
    }
  }
  return n;
}

describe('fanotify change journal (needs root)', { skip: off }, () => {
  let work: string;
  let volA: string;
  let volB: string;
  let round = 0;

  /** A fresh pair of volumes with a few files and folders, made before any journal starts. */
  async function volumes(): Promise<{ a: string; b: string }> {
    round++;
    const a = join(work, `vol-a-${round}`);
    const b = join(work, `vol-b-${round}`);
    for (const dir of [join(a, 'a'), join(a, 'b'), join(a, 'c', 'sub'), join(b, 'x')]) await mkdir(dir, { recursive: true });
    for (const [file, body] of [
      ['a/x', '1111'],
      ['a/y', 'y'],
      ['a/keep', 'keep'],
      ['b/z', 'z'],
      ['c/1', 'one'],
      ['c/sub/2', 'two'],
    ] as const)
      await writeFile(join(a, file), body);
    await writeFile(join(b, 'x', 'f'), 'f');
    await utimes(join(a, 'a/x'), 1_000_000_000, 1_000_000_000);
    return { a, b };
  }

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'fanotify-journal-'));
    ({ a: volA, b: volB } = await volumes());
  });
  after(async () => {
    await rm(work, { recursive: true, force: true });
  });

  it('sees creates, writes, an in-place rewrite with the same size and mtime, and a chmod, per volume', async () => {
    const journal = await start([volA, volB]);
    try {
      sh(volA, `echo new > a/new
printf 2222 | dd of=a/x conv=notrunc status=none
touch -m -d @1000000000 a/x
chmod 600 b/z`);
      const results = await journal.collect();
      assert.deepEqual(plain(results.get(volA)), { '': ['a'], a: ['new', 'x'], b: ['z'] });
      assert.deepEqual(plain(results.get(volB)), {});
      assert.deepEqual([...results.keys()].sort(), [volA, volB].sort());
    } finally {
      await journal.close();
    }
  });

  it('sees renames within and across folders, a folder rename, a delete, a hard link and a folder chmod', async () => {
    const { a, b } = await volumes();
    const journal = await start([a, b]);
    try {
      sh(a, `mv a/x a/x2
mv a/y b/y
echo more >> c/1
mv c d
rm b/z
ln a/keep b/keep-link
echo through-the-link >> b/keep-link
chmod 700 a`);
      sh(b, 'chmod 700 x');
      const results = await journal.collect();
      assert.deepEqual(plain(results.get(a)), {
        '': ['a', 'b', 'c', 'd'],
        a: ['x', 'x2', 'y'],
        b: ['keep-link', 'y', 'z'],
        d: 'all',
      });
      assert.deepEqual(plain(results.get(b)), { '': ['x'] });
    } finally {
      await journal.close();
    }
  });

  it('marks a new folder with files, and one moved in from outside the volumes, for a full walk', async () => {
    const { a } = await volumes();
    await mkdir(join(work, 'outside', 'tree', 'deep'), { recursive: true });
    await writeFile(join(work, 'outside', 'tree', 'deep', 'f'), 'f');
    const journal = await start([a]);
    try {
      sh(a, `mkdir -p n/m
echo f > n/m/f
echo g > n/g
echo changed >> ../outside/tree/deep/f`);
      // Collected, so the reader has judged deep/ outside every volume and dropped its events...
      assert.deepEqual(plain((await journal.collect()).get(a)), { '': ['n'], n: 'all', 'n/m': 'all' });
      sh(a, `mv ../outside/tree b/tree
echo h > b/tree/deep/h`);
      // ...and keeps dropping them once moved in: the move makes the whole tree a full walk.
      assert.deepEqual(plain((await journal.collect()).get(a)), { '': ['b', 'n'], b: ['tree'], 'b/tree': 'all', n: 'all', 'n/m': 'all' });
    } finally {
      await journal.close();
    }
  });

  it("drops this process's own writes (its repository may share the filesystem) and keeps another process's", async () => {
    const { a } = await volumes();
    await mkdir(join(work, 'repository'), { recursive: true });
    const journal = await start([a]);
    try {
      writeFileSync(join(a, 'a', 'own-sync'), 'own'); // main thread
      await writeFile(join(a, 'b', 'own-async'), 'own'); // libuv pool thread
      await writeFile(join(work, 'repository', 'pack'), 'pack');
      sh(a, `echo theirs > a/theirs
echo pack > ../repository/their-pack`);
      const results = await journal.collect();
      assert.deepEqual(plain(results.get(a)), { '': ['a'], a: ['theirs'] });
      assert.ok((journal.counters?.ownEvents ?? 0) >= 3, `own events counted: ${JSON.stringify(journal.counters)}`);
      assert.ok((journal.counters?.outsideEvents ?? 0) >= 1, `the child's repository write is outside: ${JSON.stringify(journal.counters)}`);
    } finally {
      await journal.close();
    }
  });

  it('overflows past its memory bound, and when the kernel queue overflows: every volume falls back', async () => {
    const { a, b } = await volumes();
    const bounded = await start([a, b], { maxEntries: 10 });
    try {
      sh(a, 'for i in $(seq 1 20); do echo $i > a/f$i; done');
      const results = await bounded.collect();
      for (const root of [a, b]) assert.match(plain(results.get(root)) as string, /^not ok: the change journal overflowed: more than 10 changed entries/);
    } finally {
      await bounded.close();
    }
    const limit = Number(execFileSync('cat', ['/proc/sys/fs/fanotify/max_queued_events'], { encoding: 'utf8' }));
    const stalled = await start([a], { boundedQueueWithoutReader: true });
    try {
      sh(a, `i=0; while [ $i -le ${limit + 100} ]; do : > b/q$i; i=$((i+1)); done`);
      assert.match(plain((await stalled.collect()).get(a)) as string, /^not ok: the change journal overflowed: the kernel's fanotify queue overflowed/);
    } finally {
      await stalled.close();
    }
  });

  it('collect reads the queue up to now itself (here with no reader thread at all)', async () => {
    const { a } = await volumes();
    const journal = await start([a], { boundedQueueWithoutReader: true });
    try {
      sh(a, 'echo 1 > a/queued; chmod 600 b/z');
      assert.deepEqual(plain((await journal.collect()).get(a)), { '': ['a'], a: ['queued'], b: ['z'] });
    } finally {
      await journal.close();
    }
  });

  it('a second journal running at the same time neither steals nor adds events', async () => {
    const { a } = await volumes();
    const first = await start([a]);
    try {
      sh(a, 'echo 1 > a/before-second');
      const second = await start([a]);
      sh(a, 'echo 2 > b/with-both');
      assert.deepEqual(plain((await second.collect()).get(a)), { '': ['b'], b: ['with-both'] });
      await second.close();
      sh(a, 'echo 3 > c/after-second');
      assert.deepEqual(plain((await first.collect()).get(a)), {
        '': ['a', 'b', 'c'],
        a: ['before-second'],
        b: ['with-both'],
        c: ['after-second'],
      });
      // Collect is cumulative: everything since start, again.
      sh(a, 'echo 4 > c/sub/later');
      assert.deepEqual(plain((await first.collect()).get(a)), {
        '': ['a', 'b', 'c'],
        a: ['before-second'],
        b: ['with-both'],
        c: ['after-second', 'sub'],
        'c/sub': ['later'],
      });
    } finally {
      await first.close();
    }
  });

  it('journals volumes on two filesystems, and reports a volume whose filesystem has no file handles', async () => {
    const shm = await mkdtemp('/dev/shm/fanotify-journal-');
    try {
      const { a } = await volumes();
      const journal = await start([a, shm, '/proc']);
      try {
        assert.match(journal.unwatched.get('/proc') ?? '', /cannot report file handles/);
        sh(a, 'echo 1 > a/on-disk');
        sh(shm, 'echo 1 > in-memory');
        const results = await journal.collect();
        assert.deepEqual(plain(results.get(a)), { '': ['a'], a: ['on-disk'] });
        assert.deepEqual(plain(results.get(shm)), { '': ['in-memory'] });
        assert.match(plain(results.get('/proc')) as string, /^not ok: its filesystem cannot report file handles to fanotify/);
      } finally {
        await journal.close();
      }
    } finally {
      await rm(shm, { recursive: true, force: true });
    }
  });

  it('resolves folders through the mount their volume is reached by (a bind mount of the same filesystem)', async () => {
    const { a } = await volumes();
    const source = join(work, `bind-source-${round}`);
    const target = join(work, `bind-target-${round}`);
    await mkdir(join(source, 'vol', 'a'), { recursive: true });
    await mkdir(target);
    execFileSync('mount', ['--bind', source, target]);
    try {
      // `a` first: its mount (/) is the filesystem's first; the bound volume must not be read through it.
      const bound = join(target, 'vol');
      const journal = await start([a, bound]);
      try {
        sh(bound, 'echo 1 > a/through-the-bind-mount');
        sh(a, 'echo 1 > a/direct');
        const results = await journal.collect();
        assert.deepEqual(plain(results.get(bound)), { '': ['a'], a: ['through-the-bind-mount'] });
        assert.deepEqual(plain(results.get(a)), { '': ['a'], a: ['direct'] });
      } finally {
        await journal.close();
      }
    } finally {
      execFileSync('umount', [target]);
    }
  });

  it('does not journal a volume with another mount inside it (the mark would not cover it)', async () => {
    const { a } = await volumes();
    const outer = join(work, `mount-outer-${round}`);
    await mkdir(join(outer, 'inner'), { recursive: true });
    execFileSync('mount', ['-t', 'tmpfs', 'none', join(outer, 'inner')]);
    try {
      const journal = await start([a, outer]);
      try {
        sh(outer, 'echo 1 > inner/unseen');
        assert.match(plain((await journal.collect()).get(outer)) as string, /^not ok: another filesystem is mounted inside it \(.*\/inner\)$/);
      } finally {
        await journal.close();
      }
    } finally {
      execFileSync('umount', [join(outer, 'inner')]);
    }
  });

  it('drops a deleted folder (its removal shows in its parent) and names that are not text', async () => {
    const { a } = await volumes();
    const journal = await start([a]);
    try {
      const odd = Buffer.from([0x66, 0xff, 0x0a, 0x80]); // "f\xff\n\x80": not UTF-8, with a newline
      sh(a, `mkdir gone
echo 1 > gone/f
rm -r gone
rm -r c/sub`);
      await link(join(a, 'a', 'y'), Buffer.concat([Buffer.from(join(a, 'b') + '/'), odd]));
      sh(a, `mv b/"$(printf 'f\\377\\n\\200')" a/`);
      const results = await journal.collect();
      assert.deepEqual(plain(results.get(a)), { '': ['a', 'b', 'c', 'gone'], a: [odd.toString('latin1')], b: [odd.toString('latin1')], c: ['sub'], gone: 'all' });
    } finally {
      await journal.close();
    }
  });

  it('close is idempotent and gives the fanotify descriptor back; collect after close fails', async () => {
    const before = fanotifyFds();
    const journal = await start([volA]);
    assert.equal(fanotifyFds(), before + 1);
    await journal.close();
    await journal.close();
    assert.equal(fanotifyFds(), before);
    await assert.rejects(journal.collect(), /closed/);
  });
});

describe('without the native helper', () => {
  it('CVAT_BACKUP_NATIVE=off: the journal cannot start and says why', () => {
    const module = fileURLToPath(new URL('./fanotify-journal.js', import.meta.url));
    const script = `const { startFanotifyJournal } = await import(${JSON.stringify(module)});
process.stdout.write(JSON.stringify(await startFanotifyJournal([${JSON.stringify(tmpdir())}])));`;
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], {
      env: { ...process.env, CVAT_BACKUP_NATIVE: 'off' },
      encoding: 'utf8',
    });
    assert.deepEqual(JSON.parse(out), { ok: false, reason: 'no change journal: the native helper is turned off (CVAT_BACKUP_NATIVE=off)' });
  });
});
