/**
 * copy between repositories with the real command line and a real CVAT-shaped deployment (the
 * 3-2-1 setup the README recommends): back up into A, make B with A's chunker parameters, copy
 * A → B, restore from B byte for byte; copying again sends nothing; the next backup's copy sends
 * only what changed; a copy killed with SIGKILL leaves B sound and a re-run finishes; a damaged
 * snapshot of A is skipped, named, and the others are copied. Passwords never show in the output.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmod, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { snapshotTree, type TreeEntry } from './fixture/tree.js';
import { runCli, startCli, type CliResult } from './fixture/cli.js';

const FILE_VOLUMES = ['cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];
const isRoot = process.getuid?.() === 0;
const PASSWORD_A = 'source-secret-7f3a91';
const PASSWORD_B = 'target-secret-c2d804';

interface CopyJson {
  snapshots: { status: 'copied' | 'present' | 'damaged'; source: string; target?: string; error?: string }[];
  blobsCopied: number;
  bytesCopied: number;
  bytesProcessed: number;
}

describe('copy between repositories (CLI, real deployment)', { skip: !isRoot && 'repository backups read volume folders: needs root' }, () => {
  let f: FixtureDeployment;
  let work: string;
  let envA: NodeJS.ProcessEnv;
  let envB: NodeJS.ProcessEnv;
  let repoA: string;
  let repoB: string;
  let passwordFileA: string;
  const outputs: CliResult[] = [];

  const cli = async (args: string[], env: NodeJS.ProcessEnv): Promise<CliResult> => {
    const r = await runCli(args, env);
    outputs.push(r);
    return r;
  };
  /** copy A → B (the source's password from a file, as a cron job would). */
  const copyAB = (extra: string[] = []): Promise<CliResult> => cli(['-r', repoB, '--json', 'copy', '--from-repo', repoA, '--from-password-file', passwordFileA, ...extra], envB);
  const capture = async (): Promise<{ rows: string; trees: Record<string, Record<string, TreeEntry>> }> => {
    const trees: Record<string, Record<string, TreeEntry>> = {};
    for (const v of FILE_VOLUMES) trees[v] = await snapshotTree(await f.volumePath(v), { directoryTimes: true });
    return { rows: await databaseFingerprint(f), trees };
  };
  const filesOf = async (repo: string): Promise<string[]> => {
    const out: string[] = [];
    for (const kind of ['index', 'snapshots', 'keys']) out.push(...(await readdir(join(repo, kind))).map((n) => `${kind}/${n}`));
    for (const sub of await readdir(join(repo, 'data'))) out.push(...(await readdir(join(repo, 'data', sub))).map((n) => `data/${n}`));
    return out.sort();
  };
  const backupA = async (): Promise<string> => {
    const r = await cli(['--project', f.project, '--json', 'backup'], envA);
    assert.equal(r.code, 0, r.stderr);
    return (JSON.parse(r.stdout) as { snapshot: string }).snapshot;
  };

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'cp' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-copy-'));
    repoA = join(work, 'local-repo');
    repoB = join(work, 'offsite-repo');
    passwordFileA = join(work, 'source-password');
    await writeFile(passwordFileA, `${PASSWORD_A}\n`);
    await chmod(passwordFileA, 0o600);
    envA = { CVAT_BACKUP_REPO: repoA, CVAT_BACKUP_PASSWORD: PASSWORD_A };
    envB = { CVAT_BACKUP_REPO: repoB, CVAT_BACKUP_PASSWORD: PASSWORD_B };
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('backup into A, init B with A\'s chunker parameters, copy A → B, restore from B byte for byte', async () => {
    assert.equal((await cli(['init'], envA)).code, 0);
    const source = await backupA();
    const before = await capture();

    const init = await cli(['init', '--from-repo', repoA, '--copy-chunker-params'], { ...envB, CVAT_BACKUP_FROM_PASSWORD: PASSWORD_A });
    assert.equal(init.code, 0, init.stderr);

    const c = await copyAB();
    assert.equal(c.code, 0, c.stderr);
    const copied = JSON.parse(c.stdout) as CopyJson;
    assert.deepEqual(copied.snapshots.map((s) => [s.source, s.status]), [[source, 'copied']]);
    assert.ok(copied.blobsCopied > 0);

    // Lose the deployment's data, then restore it from the copy alone.
    await f.psql('DELETE FROM engine_labeledshape WHERE id > 3;');
    await f.exec('cvat_server', 'rm -rf /home/django/data/data');
    const r = await cli(['-r', repoB, '--project', f.project, 'restore', 'latest'], envB);
    assert.equal(r.code, 0, r.stderr);
    await f.waitForDatabase();
    const after = await capture();
    assert.equal(after.rows, before.rows);
    for (const v of FILE_VOLUMES) assert.deepEqual(after.trees[v], before.trees[v], v);
    const check = await cli(['-r', repoB, 'check', '--read-data'], envB);
    assert.equal(check.code, 0, check.stderr);
  });

  it('copying again sends nothing and writes nothing', async () => {
    const before = await filesOf(repoB);
    const again = await copyAB();
    assert.equal(again.code, 0, again.stderr);
    const result = JSON.parse(again.stdout) as CopyJson;
    assert.deepEqual(result.snapshots.map((s) => s.status), ['present']);
    assert.equal(result.blobsCopied, 0);
    assert.deepEqual(await filesOf(repoB), before);
    const text = await cli(['-r', repoB, 'copy', '--from-repo', repoA], { ...envB, CVAT_BACKUP_FROM_PASSWORD: PASSWORD_A });
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /Nothing to copy/);
  });

  it('takes a lock on both repositories: an exclusive lock on either makes copy refuse (exit 10), naming which', async () => {
    const before = await filesOf(repoB);
    for (const repo of [repoA, repoB]) {
      // A prune running on this host (a live process: this test's), as its lock file says.
      const name = 'f'.repeat(64);
      const now = new Date().toISOString();
      const lock = { version: 1, exclusive: true, operation: 'prune', hostname: hostname(), pid: process.pid, created: now, time: now };
      await writeFile(join(repo, 'locks', name), JSON.stringify(lock));
      try {
        const c = await copyAB();
        assert.equal(c.code, 10, c.stderr);
        assert.match(c.stderr, new RegExp(`repository ${repo} is locked by prune`));
      } finally {
        await rm(join(repo, 'locks', name));
      }
    }
    assert.deepEqual(await filesOf(repoB), before);
  });

  it('the next backup\'s copy sends only what changed; a copy killed with SIGKILL leaves B sound and a re-run finishes', async () => {
    await f.exec('cvat_server', 'set -e; cd /home/django/data/data/1; head -c 300000 /dev/urandom > raw/frame_000002.jpg; chown 1000:1000 raw/frame_000002.jpg');
    await backupA();
    const small = await copyAB();
    assert.equal(small.code, 0, small.stderr);
    const incremental = JSON.parse(small.stdout) as CopyJson;
    assert.deepEqual(incremental.snapshots.map((s) => s.status), ['present', 'copied']);
    assert.ok(incremental.bytesCopied < incremental.bytesProcessed / 4, `${incremental.bytesCopied} of ${incremental.bytesProcessed} bytes sent`);

    // Enough new data that a copy can be killed in the middle.
    await writeFile(join(await f.volumePath('cvat_data'), 'data/1/raw/video.mp4'), randomBytes(64_000_000));
    await backupA();
    let killedMidway = 0;
    for (let trial = 0; trial < 3; trial++) {
      const before = await filesOf(repoB);
      const run = startCli(['-r', repoB, 'copy', '--from-repo', repoA, '--from-password-file', passwordFileA], envB);
      await run.waitForStderr(/copying snapshot/, 60_000).catch(() => undefined);
      // Early enough that a kill lands while the copy sends packs (it takes about a second).
      await new Promise((resolve) => setTimeout(resolve, [50, 150, 300][trial]));
      run.kill('SIGKILL');
      await run.result;
      const left = await filesOf(repoB);
      const added = left.filter((n) => !before.includes(n));
      if (added.some((n) => n.startsWith('data/')) && !added.some((n) => n.startsWith('snapshots/'))) killedMidway++;
      const check = await cli(['-r', repoB, 'check'], envB);
      assert.equal(check.code, 0, `after kill ${trial}: ${check.stderr}`);
    }
    assert.ok(killedMidway > 0, 'at least one copy was killed after writing packs and before its snapshot');
    const finish = await copyAB();
    assert.equal(finish.code, 0, finish.stderr);
    // The last killed run may have finished before its kill (a quick machine): then there is nothing left to copy.
    const statuses = (JSON.parse(finish.stdout) as CopyJson).snapshots.map((s) => s.status);
    assert.deepEqual(statuses.slice(0, 2), ['present', 'present']);
    assert.ok(statuses[2] === 'copied' || statuses[2] === 'present', statuses.join(','));
    assert.equal(statuses.length, 3);
    const check = await cli(['-r', repoB, 'check', '--read-data'], envB);
    assert.equal(check.code, 0, check.stderr);
  });

  it('a damaged snapshot of A is skipped with a warning that names it; the others are copied (exit 8)', async () => {
    const damaged = await backupA();
    const good = await backupA();
    const file = join(repoA, 'snapshots', damaged);
    const bytes = await readFile(file);
    bytes[bytes.length - 5]! ^= 0x40;
    await writeFile(file, bytes);

    const c = await copyAB();
    assert.equal(c.code, 8, c.stderr);
    const result = JSON.parse(c.stdout) as CopyJson;
    const byId = new Map(result.snapshots.map((s) => [s.source, s.status]));
    assert.equal(byId.get(damaged), 'damaged');
    assert.equal(byId.get(good), 'copied');
    assert.match(c.stderr, new RegExp(`warning: source snapshot ${damaged.slice(0, 8)} is damaged and was not copied`));
    assert.match(c.stderr, new RegExp(`damaged and were not copied \\(${damaged.slice(0, 8)}\\)`));
    const list = await cli(['-r', repoB, '--json', 'snapshots'], envB);
    assert.equal((JSON.parse(list.stdout) as unknown[]).length, 4);
  });

  it('passwords never show in what the commands print', () => {
    for (const o of outputs) {
      for (const secret of [PASSWORD_A, PASSWORD_B]) {
        assert.ok(!o.stdout.includes(secret) && !o.stderr.includes(secret), 'a password was printed');
      }
    }
    assert.ok(outputs.length > 10);
  });
});
