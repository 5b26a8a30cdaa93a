/**
 * Compatibility both ways with the guide's literal commands (../shared/seed/backup_guide.ja.md):
 * our archives restore with its `tar -xvf … --strip N`, and archives made with its `tar -czvf`
 * restore with `cvat-backup restore`. The guide's `ubuntu` image is the fixture's Ubuntu-like
 * server image (GNU tar from the host's /usr), since no image can be pulled here.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { SERVER_IMAGE, run } from './fixture/engine.js';
import { snapshotTree } from './fixture/tree.js';
import { runCli } from './fixture/cli.js';

/** `docker run --rm --volumes-from <service> -v <dir>:/backup ubuntu bash -c "<command>"` */
async function guide(f: FixtureDeployment, service: string, dir: string, command: string): Promise<void> {
  await run('docker', [
    'run', '--rm', '--network', 'none',
    '--volumes-from', await f.container(service),
    '-v', `${dir}:/backup`, '-v', '/usr:/usr:ro',
    SERVER_IMAGE, 'bash', '-c', command,
  ]);
}

const GUIDE_VOLUMES = [
  { volume: 'cvat_db', service: 'cvat_db', path: '/var/lib/postgresql/data', strip: 4 },
  { volume: 'cvat_data', service: 'cvat_server', path: '/home/django/data', strip: 3 },
  { volume: 'cvat_events_db', service: 'cvat_clickhouse', path: '/var/lib/clickhouse', strip: 3 },
] as const;

describe("compatibility with the guide's tar commands", () => {
  let a: FixtureDeployment;
  let b: FixtureDeployment;
  let work: string;

  before(async () => {
    a = await createFixtureDeployment({ prefix: 'ga' });
    b = await createFixtureDeployment({ prefix: 'gb', seed: false });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-guide-'));
  });
  after(async () => {
    await a?.destroy();
    await b?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it("our archives restore with the guide's own tar -xvf --strip commands", async () => {
    const ours = join(work, 'ours');
    const r = await runCli(['--project', a.project, 'backup', '--to', ours]);
    assert.equal(r.code, 0, r.stderr);
    const rows = await databaseFingerprint(a);
    const mediaTree = await snapshotTree(await a.volumePath('cvat_data'), { directoryTimes: true });

    // The guide's restore, into another deployment: stop, (empty,) extract with --strip, start.
    await b.compose(['stop']);
    for (const g of GUIDE_VOLUMES) {
      await guide(b, g.service, ours, `cd ${g.path} && find . -mindepth 1 -delete && tar -xvf /backup/${g.volume}.tar.gz --strip ${g.strip}`);
    }
    await b.compose(['start']);
    await b.waitForDatabase();
    assert.equal(await databaseFingerprint(b), rows);
    assert.deepEqual(await snapshotTree(await b.volumePath('cvat_data'), { directoryTimes: true }), mediaTree);
  });

  it("archives made with the guide's tar -czvf restore with cvat-backup restore", async () => {
    const handMade = join(work, 'hand-made');
    await run('mkdir', ['-p', handMade]);
    await a.compose(['stop']);
    for (const g of GUIDE_VOLUMES) {
      await guide(a, g.service, handMade, `tar -czvf /backup/${g.volume}.tar.gz ${g.path}`);
    }
    await a.compose(['start']);
    await a.waitForDatabase();
    assert.deepEqual((await readdir(handMade)).sort(), ['cvat_data.tar.gz', 'cvat_db.tar.gz', 'cvat_events_db.tar.gz']);
    const rows = await databaseFingerprint(a);
    const mediaTree = await snapshotTree(await a.volumePath('cvat_data'), { directoryTimes: true });

    await a.psql(`TRUNCATE engine_labeledshape; DELETE FROM engine_task WHERE id > 10;`);
    await a.exec('cvat_server', 'rm -rf /home/django/data/data/1/raw');

    // Without a manifest the version is unknown: the guide's rule needs it named.
    const refused = await runCli(['--project', a.project, 'restore', handMade]);
    assert.equal(refused.code, 9, refused.stderr);
    assert.match(refused.stderr, /--cvat-version/);
    assert.ok(Object.values(await a.states()).every((s) => s === 'running'));

    const wrong = await runCli(['--project', a.project, 'restore', handMade, '--cvat-version', '2.72.0']);
    assert.equal(wrong.code, 9, wrong.stderr);
    assert.match(wrong.stderr, /backup is CVAT 2\.72\.0 but the deployment runs CVAT 2\.73\.0.*CVAT_VERSION=v2\.72\.0/);

    const r = await runCli(['--project', a.project, 'restore', handMade, '--cvat-version', '2.73.0']);
    assert.equal(r.code, 0, r.stderr);
    await a.waitForDatabase();
    assert.equal(await databaseFingerprint(a), rows);
    assert.deepEqual(await snapshotTree(await a.volumePath('cvat_data'), { directoryTimes: true }), mediaTree);
    assert.ok(Object.values(await a.states()).every((s) => s === 'running'));
  });
});
