/**
 * Backups with seconds of downtime, on a real engine with real PostgreSQL under a write load:
 *
 * - two-phase: files are written, renamed and deleted, folders created and renamed, a file
 *   rewritten in place with the same size and mtime, hard links made, and rows inserted, updated
 *   and deleted while phase 1 copies; the snapshot must be identical (same tree blobs, so same
 *   names, owners, modes, times and bytes) to an offline copy taken at the instant CVAT was
 *   stopped. On every path of the final pass: the change journal (fanotify; the volume with hard
 *   links falls back to a full walk), a journal that overflows, and no journal (the walk). Run
 *   with CVAT_BACKUP_NATIVE=off, the journal case takes the walk path and must still be equal.
 * - freeze: PostgreSQL keeps inserting rows until the containers are frozen; the snapshot,
 *   restored, starts (PostgreSQL replays its WAL) and holds every row committed before the freeze.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readlinkSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, type FixtureDeployment } from './fixture/deployment.js';
import { run } from './fixture/engine.js';
import { runCli, startCli } from './fixture/cli.js';
import { createDockerEngine } from '../src/docker/engine.js';
import { LocalBackend } from '../src/backend/local.js';
import { Repository } from '../src/repository/repository.js';
import { Archiver } from '../src/repository/archiver.js';
import { backupToRepository, type RepositoryBackupOptions } from '../src/backup/repository-backup.js';
import { startFanotifyJournal } from '../src/fs/fanotify-journal.js';
import { restoreFromSnapshot } from '../src/restore/snapshot-restore.js';
import type { ProgressEvent } from '../src/events.js';

const isRoot = process.getuid?.() === 0;
const PSQL = '/usr/lib/postgresql/15/bin/psql -X -q -At -h /var/run/postgresql -d cvat';

/** A shell loop inside a service's container; it dies with the container (stop) and stalls with it (freeze). */
function load(containerId: string, script: string): { child: ChildProcess; lines: string[] } {
  const child = spawn('docker', ['exec', containerId, '/bin/sh', '-c', script], { stdio: ['ignore', 'pipe', 'ignore'] });
  const lines: string[] = [];
  let partial = '';
  child.stdout.on('data', (data: Buffer) => {
    const parts = (partial + data.toString()).split('\n');
    partial = parts.pop()!;
    lines.push(...parts);
  });
  return { child, lines };
}

describe('backups with seconds of downtime', { skip: !isRoot && 'reads volume folders: needs root' }, () => {
  let f: FixtureDeployment;
  let work: string;
  let repo: Repository;
  const engine = createDockerEngine();

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'on' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-online-'));
    repo = await Repository.init(new LocalBackend(join(work, 'repo')), 'pw', { kdf: { algorithm: 'scrypt', N: 1024, r: 8, p: 1 } });
    // Enough media that phase 1 takes a while, so the load really runs during it.
    const media = join(await f.volumePath('cvat_data'), 'data', 'bulk');
    await run('sh', ['-c', `mkdir -p ${media} && for i in $(seq 1 150); do head -c 1048576 /dev/urandom > ${media}/$i.jpg; done; chown -R 1000:1000 ${media}`]);
    await f.psql('CREATE TABLE load_rows (id integer PRIMARY KEY, note text); CREATE TABLE load_acks (id integer PRIMARY KEY);');
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  const nativeOff = process.env['CVAT_BACKUP_NATIVE'] === 'off';

  /**
   * A two-phase backup under load; the snapshot must equal an offline copy at the stop. Returns
   * the final pass's report of the change journal.
   */
  const twoPhaseUnderLoad = async (
    journal: Pick<RepositoryBackupOptions, 'startJournal'>,
    target: Repository,
  ): Promise<{ used: string[]; walked: { volume: string; reason: string }[] }> => {
    const repo = target;
    await f.waitForDatabase();
    await f.psql('TRUNCATE load_rows;');
    const server = await f.container('cvat_server');
    const db = await f.container('cvat_db');
    const files = load(
      server,
      `d=/home/django/data/data/load; l=/home/django/logs/load; mkdir -p $d $l; i=0
       head -c 4096 /dev/urandom > $d/fixed.bin
       while true; do i=$((i+1))
         head -c $((1000 + i * 37 % 50000)) /dev/urandom > $d/new_$i.bin
         echo "line $i" >> $d/append.log
         if [ $i -gt 3 ]; then mv $d/new_$((i-3)).bin $d/renamed_$i.bin; fi
         if [ $i -gt 6 ]; then rm -f $d/renamed_$((i-3)).bin; fi
         chown 1000:1000 $d/new_$i.bin; chmod $((i % 2 * 2 + 640)) $d/new_$i.bin 2>/dev/null || true
         mkdir -p $d/dir_$i/sub; echo "a $i" > $d/dir_$i/sub/a; echo "b $i" > $d/dir_$i/b
         if [ $i -gt 2 ]; then mv $d/dir_$((i-2)) $d/moved_$i; fi
         if [ $i -gt 4 ]; then rm -rf $d/moved_$((i-2)); fi
         touch -r $d/fixed.bin $d/fixed.ref; head -c 4096 /dev/urandom | dd of=$d/fixed.bin conv=notrunc 2>/dev/null; touch -r $d/fixed.ref $d/fixed.bin
         echo "log $i" > $l/log_$i; ln -f $l/log_$i $l/link_$((i % 3))
         echo $i
       done`,
    );
    const rows = load(
      db,
      `i=0; while true; do i=$((i+1))
         su postgres -s /bin/sh -c "${PSQL} -c \\"INSERT INTO load_rows VALUES ($i, 'n$i'); UPDATE load_rows SET note = 'u$i' WHERE id = $i - 2; DELETE FROM load_rows WHERE id = $i - 5;\\"" || exit 1
         echo $i
       done`,
    );
    try {
      await new Promise((resolve) => setTimeout(resolve, 1500));
      const events: ProgressEvent[] = [];
      let offline: Map<string, { tree: string; root: unknown }> | undefined;
      let atPhase2 = { files: 0, rows: 0 };
      const result = await backupToRepository(engine, repo, {
        project: f.project,
        ...journal,
        onProgress: (e) => {
          events.push(e);
          if (e.type === 'phase' && e.message.startsWith('phase 2')) atPhase2 = { files: files.lines.length, rows: rows.lines.length };
        },
        // CVAT is stopped here: copy every volume from scratch, offline, into the same repository.
        whileHeld: async () => {
          offline = new Map();
          for (const v of ['cvat_data', 'cvat_db', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db']) {
            offline.set(v, await new Archiver(repo).archive(await f.volumePath(v), undefined));
          }
        },
      });
      assert.equal(result.mode, 'two-phase');
      assert.deepEqual(result.passes.map((p) => `${p.name}/${p.cvat}`), ['precopy/running', 'final/stopped']);
      // The load really ran during phase 1, and phase 2 found its changes.
      assert.ok(atPhase2.files > 5 && atPhase2.rows > 5, `load during phase 1: ${JSON.stringify(atPhase2)}`);
      assert.ok(result.passes[1]!.filesRead > 0, 'phase 2 read the files changed during phase 1');
      assert.ok(result.passes[1]!.bytesRead < result.passes[0]!.bytesRead, 'phase 2 read less than phase 1');
      assert.ok(result.snapshot.downtimeMs > 0 && result.snapshot.downtimeMs < result.snapshot.durationMs);
      assert.equal(result.snapshot.mode, 'two-phase');
      for (const volume of result.snapshot.volumes) {
        const copy = offline!.get(volume.composeName)!;
        assert.equal(volume.tree, copy.tree, `${volume.composeName}: snapshot tree equals the offline copy's`);
        assert.deepEqual(volume.root, copy.root, `${volume.composeName}: volume root`);
      }
      const states = await f.states();
      assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
      // Said once, and the same as the final pass's record.
      const said = events.filter((e) => e.type === 'change-journal');
      assert.equal(said.length, 1);
      assert.deepEqual(result.passes[1]!.journal, { used: said[0]!.used, walked: said[0]!.walked });
      return result.passes[1]!.journal;
    } finally {
      files.child.kill();
      rows.child.kill();
    }
  };

  /** Each path's first backup into its own repository: phase 1 copies everything. */
  const freshRepository = (name: string): Promise<Repository> => Repository.init(new LocalBackend(join(work, `repo-${name}`)), 'pw', { kdf: { algorithm: 'scrypt', N: 1024, r: 8, p: 1 } });

  /** Why each volume was walked in full, by name. */
  const walkedWhy = (use: { walked: { volume: string; reason: string }[] }): Record<string, string> => Object.fromEntries(use.walked.map((w) => [w.volume, w.reason]));

  it('two-phase with the change journal: writes, renames, deletes, new and renamed folders, rewrites in place, hard links; the snapshot equals an offline copy at the stop', async () => {
    const use = await twoPhaseUnderLoad({}, repo);
    const why = walkedWhy(use);
    for (const v of ['cvat_db', 'cvat_events_db', 'cvat_inmem_db']) assert.match(why[v] ?? '', /shared memory maps/, v);
    if (nativeOff) {
      // No journal: the walk path, and still the same snapshot.
      assert.deepEqual(use.used, []);
      assert.match(why['cvat_data'] ?? '', /native helper is turned off/);
    } else {
      assert.deepEqual(use.used.sort(), ['cvat_data', 'cvat_keys']);
      assert.match(why['cvat_logs'] ?? '', /hard links/, 'the volume with hard links is walked in full');
    }
  });

  it('two-phase with a change journal that overflows: every volume walked in full, the same snapshot', { skip: nativeOff && 'needs the native helper' }, async () => {
    // The journal's own bound on what it keeps, set so low that the load exceeds it.
    const use = await twoPhaseUnderLoad({ startJournal: (folders) => startFanotifyJournal(folders, { maxEntries: 10 }) }, await freshRepository('overflow'));
    assert.deepEqual(use.used, []);
    for (const v of ['cvat_data', 'cvat_keys', 'cvat_logs']) assert.match(walkedWhy(use)[v] ?? '', /overflow/, v);
  });

  it('two-phase without a change journal: the walk, the same snapshot', async () => {
    const use = await twoPhaseUnderLoad({ startJournal: () => Promise.resolve({ ok: false, reason: 'none here (test)' }) }, await freshRepository('walk'));
    assert.deepEqual(use.used, []);
    assert.equal(walkedWhy(use)['cvat_data'], 'none here (test)');
  });

  it('Ctrl-C during phase 1: the change journal is closed, CVAT runs on', { skip: nativeOff && 'needs the native helper' }, async () => {
    const fanotifyFds = (): number =>
      readdirSync('/proc/self/fd').filter((fd) => {
        try {
          return readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:[fanotify]';
        } catch {
          return false; // the listing's own descriptor, closed by now
        }
      }).length;
    const before = fanotifyFds();
    const abort = new AbortController();
    let during = 0;
    await assert.rejects(
      backupToRepository(engine, repo, {
        project: f.project,
        signal: abort.signal,
        onProgress: (e) => {
          if (e.type === 'phase' && e.message.startsWith('phase 1')) {
            during = fanotifyFds();
            abort.abort();
          }
        },
      }),
      (error: Error) => error.name === 'AbortError',
    );
    assert.ok(during > before, 'the journal ran during phase 1');
    assert.equal(fanotifyFds(), before, 'and is closed');
    const states = await f.states();
    assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
  });

  it('freeze: PostgreSQL under load; restored, it starts and holds every row committed before the freeze', async () => {
    await f.waitForDatabase();
    await f.psql('TRUNCATE load_acks;');
    const db = await f.container('cvat_db');
    const rows = load(
      db,
      `i=0; while true; do i=$((i+1))
         su postgres -s /bin/sh -c "${PSQL} -c 'INSERT INTO load_acks VALUES ($i)'" || exit 1
         echo $i
       done`,
    );
    let ackedBeforeFreeze: number[] = [];
    try {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const result = await backupToRepository(engine, repo, {
        project: f.project,
        mode: 'freeze',
        onProgress: (e) => {
          // Acknowledged (committed) before the containers are frozen; lines still in the pipe
          // arrive later and are left out, so this is a subset of what was committed in time.
          if (e.type === 'phase' && e.message === 'freezing CVAT') ackedBeforeFreeze = rows.lines.map(Number);
        },
      });
      assert.equal(result.mode, 'freeze');
      assert.deepEqual(result.passes.map((p) => `${p.name}/${p.cvat}`), ['precopy/running', 'final/frozen']);
      assert.ok(result.snapshot.downtimeMs > 0);
      // Nothing was restarted: the load survived the freeze and went on.
      await new Promise((resolve) => setTimeout(resolve, 500));
      const after = rows.lines.length;
      assert.ok(after > ackedBeforeFreeze.length, 'the load went on after the thaw');
      assert.equal(rows.child.exitCode, null, 'the load was never interrupted');
    } finally {
      rows.child.kill();
    }
    assert.ok(ackedBeforeFreeze.length > 10, `rows committed before the freeze: ${ackedBeforeFreeze.length}`);

    await restoreFromSnapshot(engine, repo, 'latest', { project: f.project });
    await f.waitForDatabase();
    const restored = (await f.psql('SELECT id FROM load_acks ORDER BY id;')).trim().split('\n').map(Number);
    const present = new Set(restored);
    const missing = ackedBeforeFreeze.filter((id) => !present.has(id));
    assert.deepEqual(missing, [], 'every row committed before the freeze is in the restored database');
    // Autocommit inserts one after another: what survives is a prefix 1..n, nothing half-applied.
    assert.deepEqual(restored, restored.map((_, i) => i + 1));
    const log = await run('docker', ['logs', db], { allowFailure: true });
    assert.match(log.stdout + log.stderr, /not properly shut down|automatic recovery|redo/i, 'PostgreSQL recovered from its WAL');
  });

  it('--repeat-precopy: more passes while CVAT runs, the same snapshot', async () => {
    let offline: Map<string, string> | undefined;
    const result = await backupToRepository(engine, repo, {
      project: f.project,
      repeatPrecopyAfterMs: 0, // every pass counts as long: the most passes
      whileHeld: async () => {
        offline = new Map();
        for (const v of ['cvat_data', 'cvat_keys']) offline.set(v, (await new Archiver(repo).archive(await f.volumePath(v), undefined)).tree);
      },
    });
    assert.deepEqual(result.passes.map((p) => p.name), ['precopy', 'precopy', 'precopy', 'final']);
    for (const [name, tree] of offline!) assert.equal(result.snapshot.volumes.find((v) => v.composeName === name)?.tree, tree, name);
  });

  /**
   * A 300 MB file whose mtime lies an hour ahead: it always counts as possibly changed (racy), so
   * phase 2 reads it again and the freeze lasts long enough to interrupt.
   */
  const bigRecentFile = async (): Promise<void> => {
    const path = `${await f.volumePath('cvat_data')}/data/big-recent.bin`;
    await run('sh', ['-c', `head -c 300000000 /dev/urandom > ${path} && touch -d @$(( $(date +%s) + 3600 )) ${path}`]);
  };
  /** Frozen containers, asked of each container (Docker 20.10's list can show them as running). */
  const paused = async (): Promise<string[]> => {
    const ids = (await run('docker', ['ps', '-aq', '--filter', `label=com.docker.compose.project=${f.project}`])).stdout.trim().split('\n');
    const lines = (await run('docker', ['inspect', '-f', '{{.Name}} {{.State.Paused}}', ...ids])).stdout.trim().split('\n');
    return lines.filter((l) => l.endsWith(' true')).map((l) => l.split(' ')[0]!);
  };
  const env = (): NodeJS.ProcessEnv => ({ CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'pw' });

  it('Ctrl-C while frozen: exit 130, every container thawed and running', async () => {
    await bigRecentFile();
    const cli = startCli(['--project', f.project, 'backup', '--freeze'], env());
    await cli.waitForStderr(/froze \d+ containers/, 120000);
    cli.kill('SIGINT');
    const r = await cli.result;
    assert.equal(r.code, 130, r.stderr);
    assert.deepEqual(await paused(), []);
    const states = await f.states();
    assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
  });

  it('SIGKILL while frozen: the containers stay frozen until the next cvat-backup, which thaws them and succeeds', async () => {
    await bigRecentFile();
    const cli = startCli(['--project', f.project, 'backup', '--freeze'], env());
    await cli.waitForStderr(/froze \d+ containers/, 120000);
    cli.kill('SIGKILL');
    await cli.result;
    assert.ok((await paused()).length > 0, 'killed while frozen');
    const next = await runCli(['--project', f.project, 'backup'], env());
    assert.equal(next.code, 0, next.stderr);
    assert.match(next.stderr, /killed and left \d+ container\(s\) stopped or frozen/);
    assert.deepEqual(await paused(), []);
    const states = await f.states();
    assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
    await run('rm', ['-f', `${await f.volumePath('cvat_data')}/data/big-recent.bin`]);
  });

  it('--mode offline stops CVAT for the whole copy; --freeze with --mode offline is a usage error', async () => {
    const env = { CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'pw' };
    const r = await runCli(['--project', f.project, '--json', 'backup', '--mode', 'offline'], env);
    assert.equal(r.code, 0, r.stderr);
    const json = JSON.parse(r.stdout) as { mode: string; passes: { name: string; cvat: string }[]; downtimeMs: number };
    assert.equal(json.mode, 'offline');
    assert.deepEqual(json.passes.map((p) => `${p.name}/${p.cvat}`), ['final/stopped']);
    const bad = await runCli(['--project', f.project, 'backup', '--mode', 'offline', '--freeze'], env);
    assert.equal(bad.code, 2, bad.stderr);
  });
});
