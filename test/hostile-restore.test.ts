/**
 * Restores of archive sets and snapshots made by someone else, through the real command line on a
 * real engine: `restore DIR --via host|engine`, `import DIR` then `restore ID`, and snapshots whose
 * trees were written straight into the repository. Whatever they hold, nothing outside the volume
 * changes — canaries on the host and in every container's own filesystem keep their content,
 * inode and link count — nothing blocks (every run has a deadline), and the outcome is one of:
 * exit 8 while verifying (CVAT never stopped: the containers' start times are unchanged), exit 12
 * while writing (the previous data back, byte-exact), or success with a warning per skipped entry.
 * A restore killed with SIGKILL is rolled back by the next run, which says so.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, type FixtureDeployment } from './fixture/deployment.js';
import { run } from './fixture/engine.js';
import { startCli, type CliResult } from './fixture/cli.js';
import { snapshotTree } from './fixture/tree.js';
import { HOSTILE_CASES, gzipTar, type RawMember } from './fixture/hostile.js';
import { HOSTILE_TREES, hostileVolume, saveHostileSnapshot } from './fixture/hostile-snapshot.js';
import { Repository } from '../src/repository/repository.js';
import { LocalBackend } from '../src/backend/local.js';

const isRoot = process.getuid?.() === 0;
const PREFIX = 'home/django/data';
const PASSWORD = 'hostile-test-password';

/** A run of the command line that must end within `ms` (killed and failed otherwise: nothing may block). */
async function cli(args: string[], ms = 240_000, env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  const child = startCli(args, env);
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`cvat-backup ${args.join(' ')} did not finish within ${ms} ms`));
    }, ms);
  });
  try {
    return await Promise.race([child.result, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

function oneLine(stderr: string): void {
  const lines = stderr.trim().split('\n').filter((l) => l.startsWith('cvat-backup:'));
  assert.equal(lines.length, 1, stderr);
  assert.doesNotMatch(stderr, /\n\s+at /, 'no stack trace');
}

describe('restores of hostile archive sets and snapshots', { skip: !isRoot && 'the host path and canaries in volumes need root' }, () => {
  let f: FixtureDeployment;
  let work: string;
  /** The same absolute path on the host and in every container: the target of every escape. */
  let outside: string;
  let repoDir: string;
  let containers: string[];
  let hostCanary: string;
  const containerCanaries = new Map<string, string>();

  const startTimes = async (): Promise<string> =>
    (await run('docker', ['inspect', '-f', '{{.Name}} {{.State.Status}} {{.State.StartedAt}}', ...containers])).stdout;
  const allRunning = async (): Promise<void> => {
    const states = await f.states();
    assert.ok(Object.values(states).length === 9 && Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
  };
  /** Content, inode and link count of the canaries, what the folders around them hold, and files an escape would make. */
  const canaryState = async (container: string): Promise<string> =>
    (await run('docker', ['exec', container, 'sh', '-c', `cat ${outside}/canary; stat -c '%i %h' ${outside}/canary /etc/passwd; ls -A ${outside}; ls -A /tmp`])).stdout;
  const hostState = async (): Promise<string> => {
    const st = await stat(join(outside, 'canary'));
    return `${await readFile(join(outside, 'canary'), 'utf8')} ${st.ino} ${st.nlink} ${execFileSync('ls', ['-A', outside]).toString()}`;
  };
  const untouched = async (): Promise<void> => {
    assert.equal(await hostState(), hostCanary, 'host canary');
    for (const c of containers) assert.equal(await canaryState(c), containerCanaries.get(c), `canary in container ${c.slice(0, 12)}`);
  };

  const set = async (name: string, members: RawMember[]): Promise<string> => {
    const dir = join(work, 'sets', name);
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'cvat_data.tar.gz'), gzipTar(members));
    return dir;
  };

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'hr' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-hostile-'));
    outside = join(work, 'outside');
    await mkdir(outside);
    await writeFile(join(outside, 'canary'), 'host canary\n');
    containers = (await run('docker', ['ps', '-q', '--filter', `label=com.docker.compose.project=${f.project}`])).stdout.trim().split('\n');
    for (const c of containers) {
      await run('docker', ['exec', c, 'sh', '-c', `mkdir -p ${outside} && echo 'container canary' > ${outside}/canary`]);
      containerCanaries.set(c, await canaryState(c));
    }
    hostCanary = await hostState();
    repoDir = join(work, 'repo');
    const init = await cli(['-r', repoDir, 'init'], 60_000, { CVAT_BACKUP_PASSWORD: PASSWORD });
    assert.equal(init.code, 0, init.stderr);
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  const refusedCases = HOSTILE_CASES.filter((c) => c.outcome === 'refused');
  for (const via of ['host', 'engine'] as const) {
    it(`restore DIR --via ${via}: every hostile set is refused while verifying (exit 8, one line), CVAT never stopped, nothing outside touched`, { timeout: 900_000 }, async () => {
      const before = await startTimes();
      for (const c of refusedCases) {
        const dir = await set(`${c.id}`, c.members(PREFIX, outside));
        const r = await cli(['--project', f.project, 'restore', dir, '--cvat-version', '2.73.0', '--via', via]);
        assert.equal(r.code, 8, `${c.id}: ${r.stderr}`);
        oneLine(r.stderr);
      }
      assert.equal(await startTimes(), before, 'no container was stopped or restarted');
      await untouched();
    });
  }

  it('import DIR refuses every hostile set (exit 8) and stores no snapshot', { timeout: 600_000 }, async () => {
    for (const c of refusedCases) {
      const r = await cli(['-r', repoDir, '--project', f.project, 'import', join(work, 'sets', c.id), '--cvat-version', '2.73.0'], 120_000, { CVAT_BACKUP_PASSWORD: PASSWORD });
      assert.equal(r.code, 8, `${c.id}: ${r.stderr}`);
      oneLine(r.stderr);
    }
    const list = await cli(['-r', repoDir, '--json', 'snapshots'], 60_000, { CVAT_BACKUP_PASSWORD: PASSWORD });
    assert.deepEqual(JSON.parse(list.stdout), []);
    await untouched();
  });

  it('FIFOs and devices are skipped with a warning on every path; the rest is restored', { timeout: 900_000 }, async () => {
    const special = HOSTILE_CASES.find((c) => c.outcome === 'skipped')!;
    const dir = await set('fifo-and-devices', special.members(PREFIX, outside));
    const imported = await cli(['-r', repoDir, '--project', f.project, '--json', 'import', dir, '--cvat-version', '2.73.0'], 120_000, { CVAT_BACKUP_PASSWORD: PASSWORD });
    assert.equal(imported.code, 0, imported.stderr);
    const id = (JSON.parse(imported.stdout) as { snapshot: string }).snapshot;
    for (const [what, args] of [
      ['restore DIR --via host', ['restore', dir, '--cvat-version', '2.73.0', '--via', 'host']],
      ['restore DIR --via engine', ['restore', dir, '--cvat-version', '2.73.0', '--via', 'engine']],
      ['import + restore ID --via host', ['restore', id.slice(0, 12), '--via', 'host']],
      ['import + restore ID --via engine', ['restore', id.slice(0, 12), '--via', 'engine']],
    ] as const) {
      const r = await cli(['-r', repoDir, '--project', f.project, ...args], 240_000, { CVAT_BACKUP_PASSWORD: PASSWORD });
      assert.equal(r.code, 0, `${what}: ${r.stderr}`);
      for (const name of ['fifo', 'null', 'sda']) assert.match(r.stderr, new RegExp(`warning: not restored.*${name}`), `${what}: warns about ${name}`);
      const tree = await snapshotTree(await f.volumePath('cvat_data'));
      assert.deepEqual(Object.keys(tree).sort(), ['.', 'after.txt', 'ok', 'ok/first.txt'], what);
      await allRunning();
    }
    await untouched();
  });

  it('hostile snapshot trees in the repository: refused while verifying (exit 8, CVAT never stopped) through both paths, and nothing blocks', { timeout: 900_000 }, async () => {
    const repo = await Repository.open(new LocalBackend(repoDir), PASSWORD);
    await repo.loadIndex();
    const ids = new Map<string, string>();
    for (const c of HOSTILE_TREES) {
      const { tree, entries } = await c.build(repo, outside);
      ids.set(c.id, await saveHostileSnapshot(repo, f.project, '2.73.0', [hostileVolume(tree, entries, 'cvat_data', '/home/django/data')]));
    }
    await repo.flush();
    const before = await startTimes();
    for (const via of ['host', 'engine'] as const) {
      for (const c of HOSTILE_TREES.filter((t) => t.outcome === 'refused')) {
        const r = await cli(['-r', repoDir, '--project', f.project, 'restore', ids.get(c.id)!.slice(0, 16), '--via', via], 120_000, { CVAT_BACKUP_PASSWORD: PASSWORD });
        assert.equal(r.code, 8, `${c.id} --via ${via}: ${r.stderr}`);
        oneLine(r.stderr);
      }
    }
    assert.equal(await startTimes(), before, 'no container was stopped or restarted');
    for (const via of ['host', 'engine'] as const) {
      const r = await cli(['-r', repoDir, '--project', f.project, 'restore', ids.get('reserved-root')!.slice(0, 16), '--via', via], 240_000, { CVAT_BACKUP_PASSWORD: PASSWORD });
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /warning: cvat_data: not restored: \.cvat-backup-rollback/);
      const tree = await snapshotTree(await f.volumePath('cvat_data'));
      assert.deepEqual(Object.keys(tree).sort(), ['.', 'ok.txt']);
    }
    await untouched();
  });

  /** A guide-made set of cvat_data that takes a while to verify and write: a small file and 600 MB of zeros. */
  const bigSet = async (name: string): Promise<string> => {
    const src = join(work, `${name}-src`);
    await mkdir(join(src, PREFIX), { recursive: true });
    await writeFile(join(src, PREFIX, 'small.txt'), 'small\n');
    execFileSync('truncate', ['-s', '600M', join(src, PREFIX, 'zeros.bin')]);
    const dir = join(work, 'sets', name);
    await mkdir(dir, { recursive: true });
    execFileSync('tar', ['-C', src, '-czf', join(dir, 'cvat_data.tar.gz'), PREFIX]);
    return dir;
  };

  it('--via host: a set swapped for a hostile one after verification is refused while it is written into the staged folder, before CVAT stops (exit 8): nothing touched', { timeout: 600_000 }, async () => {
    // A good set whose verification takes a while (600 MB of zeros to decompress).
    const dir = await bigSet('swapped-staged');
    await f.exec('cvat_server', 'echo "written before" > /home/django/data/later.txt');
    const previous = await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true });
    const before = await startTimes();
    const hostile: RawMember[] = [
      { name: `${PREFIX}/`, type: '5', mode: 0o755 },
      { name: `${PREFIX}/a`, type: '2', linkName: outside },
      { name: `${PREFIX}/a/pwned`, type: '0', data: Buffer.from('pwned\n') },
      { name: `${PREFIX}/h`, type: '1', linkName: 'etc/passwd' },
      { name: 'tmp/pwned', type: '0', data: Buffer.from('pwned\n') },
    ];
    await writeFile(join(dir, 'swap.tmp'), gzipTar(hostile));
    const child = startCli(['--project', f.project, 'restore', dir, '--cvat-version', '2.73.0', '--via', 'host']);
    // Swapped while the good set is verified (its file is open): the staged write opens the hostile one.
    await child.waitForStderr('verifying cvat_data', 120_000);
    await rename(join(dir, 'swap.tmp'), join(dir, 'cvat_data.tar.gz'));
    const r = await Promise.race([child.result, new Promise<never>((_, reject) => setTimeout(() => reject(new Error('restore did not finish')), 240_000))]);
    assert.equal(r.code, 8, r.stderr);
    oneLine(r.stderr);
    assert.doesNotMatch(r.stderr, /stopping CVAT/);
    assert.equal(await startTimes(), before, 'no container was stopped or restarted');
    assert.deepEqual(await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true }), previous, 'the volume as it was, no staged folder left');
    await untouched();
  });

  for (const via of ['engine'] as const) {
    it(`--via ${via}: a set swapped for a hostile one after verification is refused while writing (exit 12), the previous data back byte-exact`, { timeout: 600_000 }, async () => {
      const good: RawMember[] = [{ name: `${PREFIX}/`, type: '5', mode: 0o755 }, { name: `${PREFIX}/kept.txt`, type: '0', data: Buffer.from('kept\n') }];
      const dir = await set(`swapped-${via}`, good);
      const r0 = await cli(['--project', f.project, 'restore', dir, '--cvat-version', '2.73.0', '--via', via]);
      assert.equal(r0.code, 0, r0.stderr);
      await f.exec('cvat_server', 'echo "written after the restore" > /home/django/data/later.txt');
      const previous = await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true });
      // The hostile set is swapped in once CVAT is stopped (after verification): escape into the container or the host.
      const hostile = [
        ...good,
        { name: `${PREFIX}/a`, type: '2', linkName: outside },
        { name: `${PREFIX}/a/pwned`, type: '0', data: Buffer.from('pwned\n') },
        { name: `${PREFIX}/h`, type: '1', linkName: 'etc/passwd' },
        { name: 'tmp/pwned', type: '0', data: Buffer.from('pwned\n') },
      ];
      await writeFile(join(dir, 'swap.tmp'), gzipTar(hostile));
      const child = startCli(['--project', f.project, 'restore', dir, '--cvat-version', '2.73.0', '--via', via]);
      await child.waitForStderr('setting rollback points', 120_000);
      await rename(join(dir, 'swap.tmp'), join(dir, 'cvat_data.tar.gz'));
      const r = await Promise.race([child.result, new Promise<never>((_, reject) => setTimeout(() => reject(new Error('restore did not finish')), 240_000))]);
      assert.equal(r.code, 12, r.stderr);
      oneLine(r.stderr);
      assert.match(r.stderr, /the previous data was put back/);
      assert.deepEqual(await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true }), previous);
      await allRunning();
      await untouched();
    });
  }

  it('a restore killed with SIGKILL while it writes the staged folder (--via host): CVAT runs on, the next run deletes the staged data silently', { timeout: 600_000 }, async () => {
    const dir = await bigSet('big-staged');
    await f.exec('cvat_server', 'echo "before the killed restore" > /home/django/data/previous.txt');
    const previous = await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true });
    const before = await startTimes();
    const child = startCli(['--project', f.project, 'restore', dir, '--cvat-version', '2.73.0', '--via', 'host']);
    await child.waitForStderr('restoring while CVAT runs cvat_data', 120_000);
    child.kill('SIGKILL');
    await child.result;
    assert.equal(await startTimes(), before, 'CVAT ran all along');
    const next = await cli(['--project', f.project, 'backup', '--to', join(work, 'after-kill-staged'), '--via', 'host']);
    assert.equal(next.code, 0, next.stderr);
    assert.doesNotMatch(next.stderr, /warning/);
    assert.deepEqual(await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true }), previous, 'the volume as it was, the staged folder gone');
    await allRunning();
  });

  it('a restore killed with SIGKILL while CVAT is stopped (--via engine writes in place): the next run (a backup) puts the previous data back before CVAT starts, and says so', { timeout: 600_000 }, async () => {
    const dir = await bigSet('big');
    await f.exec('cvat_server', 'echo "before the killed restore" > /home/django/data/previous.txt');
    const previous = await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true });
    const child = startCli(['--project', f.project, 'restore', dir, '--cvat-version', '2.73.0', '--via', 'engine']);
    await child.waitForStderr('restoring cvat_data', 120_000);
    child.kill('SIGKILL');
    await child.result;
    const left = Object.values(await f.states());
    assert.ok(left.some((s) => s !== 'running'), 'the killed restore left CVAT stopped');
    const next = await cli(['--project', f.project, 'backup', '--to', join(work, 'after-kill'), '--via', 'host']);
    assert.equal(next.code, 0, next.stderr);
    assert.match(next.stderr, /warning: a restore killed earlier \(pid \d+, started [^)]+\) left volumes half restored: the previous data of [^\n]*cvat_data[^\n]* was put back/);
    assert.deepEqual(await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true }), previous);
    await allRunning();
  });
});
