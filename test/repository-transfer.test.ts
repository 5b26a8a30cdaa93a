/**
 * The repository and archive sets, both ways, and repository backups through the engine:
 * backup --via engine into the repository and restore it; export a snapshot to a seed-compatible
 * set that verify and restore accept; import a set made with the guide's tar commands.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { SERVER_IMAGE, run } from './fixture/engine.js';
import { snapshotTree, type TreeEntry } from './fixture/tree.js';
import { runCli } from './fixture/cli.js';

describe('repository ⇄ archive sets, and repository backups through the engine', () => {
  let f: FixtureDeployment;
  let work: string;
  let env: NodeJS.ProcessEnv;
  let rows: string;
  let media: Record<string, TreeEntry>;

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'tr' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-transfer-'));
    env = { CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'pw-transfer' };
    const init = await runCli(['init'], env);
    assert.equal(init.code, 0, init.stderr);
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('backup --via engine into the repository, then restore --via engine', async () => {
    const b = await runCli(['--project', f.project, '--json', 'backup', '--via', 'engine'], env);
    assert.equal(b.code, 0, b.stderr);
    rows = await databaseFingerprint(f);
    media = await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true });
    await f.psql('DELETE FROM engine_labeledshape WHERE id > 5;');
    await f.exec('cvat_server', 'rm -rf /home/django/data/data');
    const r = await runCli(['--project', f.project, 'restore', 'latest', '--via', 'engine'], env);
    assert.equal(r.code, 0, r.stderr);
    await f.waitForDatabase();
    assert.equal(await databaseFingerprint(f), rows);
    assert.deepEqual(await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true }), media);
  });

  it('export latest writes a set that verify accepts and restore DIR restores', async () => {
    const dir = join(work, 'exported');
    const e = await runCli(['export', 'latest', '--to', dir], env);
    assert.equal(e.code, 0, e.stderr);
    assert.deepEqual((await readdir(dir)).sort(), ['cvat_data.tar.gz', 'cvat_db.tar.gz', 'cvat_events_db.tar.gz', 'cvat_inmem_db.tar.gz', 'cvat_keys.tar.gz', 'cvat_logs.tar.gz', 'manifest.json']);
    const v = await runCli(['verify', dir], env);
    assert.equal(v.code, 0, v.stderr);
    await f.psql('TRUNCATE engine_labeledshape;');
    const r = await runCli(['--project', f.project, 'restore', dir], env);
    assert.equal(r.code, 0, r.stderr);
    await f.waitForDatabase();
    assert.equal(await databaseFingerprint(f), rows);
    assert.deepEqual(await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true }), media);
  });

  it("import of a set made with the guide's tar commands becomes a snapshot that restores", async () => {
    const handMade = join(work, 'hand-made');
    await run('mkdir', ['-p', handMade]);
    await f.compose(['stop']);
    for (const [volume, service, path] of [
      ['cvat_db', 'cvat_db', '/var/lib/postgresql/data'],
      ['cvat_data', 'cvat_server', '/home/django/data'],
    ] as const) {
      await run('docker', ['run', '--rm', '--network', 'none', '--volumes-from', await f.container(service), '-v', `${handMade}:/backup`, '-v', '/usr:/usr:ro', SERVER_IMAGE, 'tar', '-czf', `/backup/${volume}.tar.gz`, path]);
    }
    await f.compose(['start']);
    await f.waitForDatabase();
    const noProject = await runCli(['import', handMade], env);
    assert.equal(noProject.code, 2, noProject.stderr);
    const i = await runCli(['--project', f.project, '--json', 'import', handMade, '--cvat-version', '2.73.0'], env);
    assert.equal(i.code, 0, i.stderr);
    const imported = JSON.parse(i.stdout) as { snapshot: string; cvatVersion: string };
    assert.equal(imported.cvatVersion, '2.73.0');

    await f.psql('TRUNCATE engine_labeledshape;');
    await f.exec('cvat_server', 'rm -rf /home/django/data/data');
    const r = await runCli(['--project', f.project, 'restore', imported.snapshot.slice(0, 10)], env);
    assert.equal(r.code, 0, r.stderr);
    await f.waitForDatabase();
    assert.equal(await databaseFingerprint(f), rows);
    assert.deepEqual(await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true }), media);
    const check = await runCli(['check', '--read-data'], env);
    assert.equal(check.code, 0, check.stderr);
  });
});
