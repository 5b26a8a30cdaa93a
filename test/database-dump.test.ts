/**
 * `backup --db dump`: a pg_dump of the running database instead of its files, and pg_restore into
 * a fresh database that replaces the old one — for the bundled cvat_db container and for CVAT's
 * external-database variant (no cvat_db at all; a real PostgreSQL on this host reached with the
 * backend's CVAT_POSTGRES_* settings and its password secret).
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { startHostPostgres, type HostPostgres } from './fixture/host-postgres.js';
import { runCli } from './fixture/cli.js';

const isRoot = process.getuid?.() === 0;

interface BackupJson {
  snapshot: string;
  volumes: { name: string }[];
  passes: { name: string; cvat: string }[];
  database: { location: string; dbname: string; bytes: number } | null;
}

describe('database dumps (--db dump)', { skip: !isRoot && 'repository backups read volume folders: needs root' }, () => {
  let work: string;
  let env: NodeJS.ProcessEnv;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-dump-'));
    env = { CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'dump-test' };
    const init = await runCli(['init'], env);
    assert.equal(init.code, 0, init.stderr);
  });
  after(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  describe('bundled cvat_db', () => {
    let f: FixtureDeployment;
    before(async () => {
      f = await createFixtureDeployment({ prefix: 'dd' });
    });
    after(async () => {
      await f?.destroy();
    });

    it('dumps the running database instead of its files, and restores it into a fresh database', async () => {
      const original = await databaseFingerprint(f);
      const r = await runCli(['--project', f.project, '--json', 'backup', '--db', 'dump'], env);
      assert.equal(r.code, 0, r.stderr);
      const json = JSON.parse(r.stdout) as BackupJson;
      assert.equal(json.database?.location, 'bundled');
      assert.equal(json.database?.dbname, 'cvat');
      assert.ok(json.database.bytes > 1000);
      assert.ok(!json.volumes.some((v) => v.name === 'cvat_db'), 'the database volume is not copied as files');
      assert.equal(json.passes[0]?.name, 'dump');
      assert.equal(json.passes[0]?.cvat, 'running');

      await f.psql('TRUNCATE engine_labeledshape, engine_task; CREATE TABLE created_after_backup (x int);');
      assert.notEqual(await databaseFingerprint(f), original);

      const restored = await runCli(['--project', f.project, '--json', 'restore', 'latest'], env);
      assert.equal(restored.code, 0, restored.stderr);
      assert.equal((JSON.parse(restored.stdout) as { database?: { dbname: string } }).database?.dbname, 'cvat');
      await f.waitForDatabase();
      assert.equal(await databaseFingerprint(f), original, 'the rows of the dump are back');
      assert.equal(await f.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'created_after_backup';"), '0\n');
      const databases = (await f.psql('SELECT datname FROM pg_database ORDER BY 1;', 'postgres')).trim().split('\n');
      assert.deepEqual(databases.filter((d) => /restoring|before_restore/.test(d)), [], 'no temporary or retired database is left');
      const states = await f.states();
      assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
    });

    it('check and prune keep the dump; export refuses it with a hint', async () => {
      const pruned = await runCli(['prune'], env);
      assert.equal(pruned.code, 0, pruned.stderr);
      const check = await runCli(['check', '--read-data'], env);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      const exported = await runCli(['--project', f.project, 'export', 'latest', '--to', join(work, 'export')], env);
      assert.equal(exported.code, 2, exported.stderr);
      assert.match(exported.stderr, /pg_dump/);
      // The dump survives prune: restoring again still works.
      const restored = await runCli(['--project', f.project, 'restore', 'latest', '--volume', 'cvat_db'], env);
      assert.equal(restored.code, 0, restored.stderr);
    });
  });

  describe('external database (docker-compose.external_db.yml)', () => {
    let pg: HostPostgres;
    let f: FixtureDeployment;
    const rows = (): Promise<string> => pg.psql("SELECT string_agg(id || ':' || name, ',' ORDER BY id) FROM engine_task;", pg.dbname);
    before(async () => {
      pg = await startHostPostgres();
      await pg.psql(
        `SET ROLE ${pg.user};
         CREATE TABLE engine_task (id serial PRIMARY KEY, name text NOT NULL);
         INSERT INTO engine_task (name) SELECT 'task ' || i FROM generate_series(1, 500) i;`,
        pg.dbname,
      );
      f = await createFixtureDeployment({
        prefix: 'dx',
        externalDatabase: { host: '127.0.0.1', port: pg.port, dbname: pg.dbname, user: pg.user, passwordFile: pg.passwordFile },
      });
    });
    after(async () => {
      await f?.destroy();
      await pg?.stop();
    });

    it('status names the external database', async () => {
      const status = await runCli(['--project', f.project, 'status']);
      assert.equal(status.code, 0, status.stderr);
      assert.match(status.stdout, new RegExp(`external PostgreSQL at 127\\.0\\.0\\.1:${pg.port}, database '${pg.dbname}'`));
      assert.ok(!status.stdout.includes(pg.password));
    });

    it('is dumped without --db (there are no files to copy), and restored; the password never shows', async () => {
      const original = await rows();
      const r = await runCli(['--project', f.project, '--json', 'backup'], env);
      assert.equal(r.code, 0, r.stderr);
      const json = JSON.parse(r.stdout) as BackupJson;
      assert.equal(json.database?.location, 'external');
      assert.equal(json.database?.dbname, pg.dbname);
      assert.ok(!r.stdout.includes(pg.password) && !r.stderr.includes(pg.password));

      await pg.psql(`SET ROLE ${pg.user}; DELETE FROM engine_task WHERE id > 10; INSERT INTO engine_task (name) VALUES ('after the backup');`, pg.dbname);
      assert.notEqual(await rows(), original);

      // Without CREATEDB the fresh database cannot be made: the restore fails (exit 12) and loses
      // nothing — the current rows stay, the volumes are put back, CVAT runs.
      const current = await rows();
      await pg.psql(`ALTER ROLE ${pg.user} NOCREATEDB;`);
      const refused = await runCli(['--project', f.project, 'restore', 'latest'], env);
      assert.equal(refused.code, 12, refused.stderr);
      assert.match(refused.stderr, /permission denied to create database/);
      assert.equal(await rows(), current, 'the database is untouched');
      const afterFailure = await f.states();
      assert.ok(Object.values(afterFailure).every((st) => st === 'running'), JSON.stringify(afterFailure));
      await pg.psql(`ALTER ROLE ${pg.user} CREATEDB;`);

      const restored = await runCli(['--project', f.project, 'restore', 'latest'], env);
      assert.equal(restored.code, 0, restored.stderr);
      assert.ok(!restored.stdout.includes(pg.password) && !restored.stderr.includes(pg.password));
      assert.equal(await rows(), original, 'the rows of the dump are back');
      const databases = (await pg.psql('SELECT datname FROM pg_database;')).trim().split('\n');
      assert.deepEqual(databases.filter((d) => /restoring|before_restore/.test(d)), []);
      // A wrong password in the secret: the dump fails with its own exit code, saying why, and
      // without the password in the message.
      await writeFile(pg.passwordFile, 'not-the-password\n');
      try {
        const wrong = await runCli(['--project', f.project, 'backup'], env);
        assert.equal(wrong.code, 15, wrong.stderr);
        assert.match(wrong.stderr, /pg_dump .* failed .*password authentication failed/);
        assert.ok(!wrong.stderr.includes('not-the-password'));
      } finally {
        await writeFile(pg.passwordFile, `${pg.password}\n`);
      }
      const states = await f.states();
      assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
    });
  });
});
