/**
 * Off-site repositories through restic's REST protocol, end to end with the real command line and
 * a real CVAT-shaped deployment: `rclone:` (rclone started by us, over a local-folder remote) from
 * init to a byte-exact restore; `rest:` on an append-only `rclone serve restic` with a user and
 * password (backups work, forget and prune refuse with one line), and the secrets never in the
 * process list or in anything printed.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startRcloneServer, type RcloneServer } from '../src/backend/rclone-server.js';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { snapshotTree, type TreeEntry } from './fixture/tree.js';
import { runCli, startCli, type CliResult } from './fixture/cli.js';

const FILE_VOLUMES = ['cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];
const isRoot = process.getuid?.() === 0;
const REPO_SECRET = 'repo-secret-Hq27-never-shown';
const REST_SECRET = 'rest-secret-Vb93-never-shown';

describe('repositories over the REST protocol (rclone:, rest:)', { skip: !isRoot && 'repository backups read volume folders: needs root' }, () => {
  let f: FixtureDeployment;
  let work: string;
  let server: RcloneServer;
  const printed: string[] = [];
  const run = async (args: string[], env: NodeJS.ProcessEnv): Promise<CliResult> => {
    const r = await runCli(args, env);
    printed.push(r.stdout, r.stderr);
    return r;
  };
  const capture = async (): Promise<{ rows: string; trees: Record<string, Record<string, TreeEntry>> }> => {
    const trees: Record<string, Record<string, TreeEntry>> = {};
    for (const v of FILE_VOLUMES) trees[v] = await snapshotTree(await f.volumePath(v), { directoryTimes: true });
    return { rows: await databaseFingerprint(f), trees };
  };

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'rr' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-rest-'));
    server = await startRcloneServer({ appendOnly: true, user: { name: 'backup', password: REST_SECRET } });
  });
  after(async () => {
    await server?.stop();
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('rclone: init, backup, check --read-data, and a byte-exact restore; rclone ends with the command', async () => {
    await writeFile(join(work, 'rclone.conf'), '');
    const env = {
      CVAT_BACKUP_REPO: `rclone:testlocal:${work}/rclone-repo`,
      CVAT_BACKUP_PASSWORD: REPO_SECRET,
      RCLONE_CONFIG: join(work, 'rclone.conf'),
      RCLONE_CONFIG_TESTLOCAL_TYPE: 'local',
    };
    const init = await run(['init'], env);
    assert.equal(init.code, 0, init.stderr);
    const backup = await run(['--project', f.project, '--json', 'backup'], env);
    assert.equal(backup.code, 0, backup.stderr);
    assert.equal((JSON.parse(backup.stdout) as { repository: string }).repository, `rclone:testlocal:${work}/rclone-repo`);
    const before = await capture();
    const check = await run(['check', '--read-data'], env);
    assert.equal(check.code, 0, check.stderr + check.stdout);

    // Damage after the backup: a changed file, a removed one, a changed row.
    const data = await f.volumePath('cvat_data');
    await writeFile(join(data, 'data', '1', 'changed-after-backup.txt'), 'not in the snapshot');
    await f.psql("UPDATE engine_task SET name = 'renamed after backup'");
    const restore = await run(['--project', f.project, 'restore', 'latest'], env);
    assert.equal(restore.code, 0, restore.stderr);
    await f.waitForDatabase();
    const after = await capture();
    assert.equal(after.rows, before.rows);
    for (const v of FILE_VOLUMES) assert.deepEqual(after.trees[v], before.trees[v], v);
    const left = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' });
    assert.ok(!left.includes(`${work}/rclone-repo`), 'no rclone left running');
  });

  it('rest: on an append-only server with a password: backup works; forget and prune refuse with one line (exit 17); no secret in ps or output', async () => {
    const env = {
      CVAT_BACKUP_REPO: `rest:${server.url}/cvat`,
      CVAT_BACKUP_PASSWORD: REPO_SECRET,
      CVAT_BACKUP_REST_USERNAME: 'backup',
      CVAT_BACKUP_REST_PASSWORD: REST_SECRET,
    };
    const wrong = await run(['snapshots'], { ...env, CVAT_BACKUP_REST_PASSWORD: 'not-it' });
    assert.equal(wrong.code, 17, wrong.stderr);
    assert.match(wrong.stderr, /401/);
    assert.equal(wrong.stderr.trim().split('\n').length, 1, wrong.stderr);

    const init = await run(['init'], env);
    assert.equal(init.code, 0, init.stderr);
    const backup = startCli(['--project', f.project, 'backup'], env);
    let samples = 0;
    let seen = '';
    const sample = setInterval(() => {
      seen += execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' });
      samples++;
    }, 100);
    const result = await backup.result;
    clearInterval(sample);
    printed.push(result.stdout, result.stderr);
    assert.equal(result.code, 0, result.stderr);
    assert.ok(samples > 0 && seen.includes('cvat-backup'), 'the process list was sampled while the backup ran');
    assert.ok(!seen.includes(REST_SECRET) && !seen.includes(REPO_SECRET), 'no secret in ps');

    for (const args of [['forget', '--keep-last', '1', '--prune'], ['prune']]) {
      const refused = await run(args, env);
      assert.equal(refused.code, 17, `${args.join(' ')}: ${refused.stderr}`);
      // Progress lines, then the reason in one line.
      const errors = refused.stderr.trim().split('\n').filter((l) => l.startsWith('cvat-backup:'));
      assert.equal(errors.length, 1, refused.stderr);
      assert.match(errors[0]!, /refuses to delete repository files \(403\): it is append-only, so forget and prune cannot run/);
    }
    const list = await run(['--json', 'snapshots'], env);
    assert.equal((JSON.parse(list.stdout) as unknown[]).length, 1);
    assert.deepEqual(execFileSync('ls', [join(server.dir, 'cvat', 'locks')], { encoding: 'utf8' }), '', 'every lock was removed');
    const all = printed.join('\n');
    assert.ok(!all.includes(REST_SECRET) && !all.includes(REPO_SECRET), 'no secret printed');
  });
});
