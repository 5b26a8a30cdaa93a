/**
 * Every bad input and every failure a user can meet: one clear line, its own exit code, nothing
 * lost, and CVAT running again if it was running before.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { cp, mkdir, mkdtemp, open, readFile, readdir, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { hostname } from 'node:os';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { SERVER_IMAGE, run } from './fixture/engine.js';
import { runCli, startCli } from './fixture/cli.js';
import { snapshotTree } from './fixture/tree.js';

const isRoot = process.getuid?.() === 0;

async function startTimes(f: FixtureDeployment): Promise<string> {
  const ids = (await run('docker', ['ps', '-aq', '--filter', `label=com.docker.compose.project=${f.project}`])).stdout.trim().split('\n');
  return (await run('docker', ['inspect', '-f', '{{.Name}} {{.State.Status}} {{.State.StartedAt}}', ...ids])).stdout;
}

async function allRunning(f: FixtureDeployment): Promise<void> {
  const states = await f.states();
  assert.equal(Object.keys(states).length, 9, JSON.stringify(states));
  assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
}

function oneLine(stderr: string): void {
  const lines = stderr.trim().split('\n').filter((l) => l.startsWith('cvat-backup:'));
  assert.equal(lines.length, 1, stderr);
  assert.doesNotMatch(stderr, /\n\s+at /, 'no stack trace for a user error');
}

describe('errors and failures', () => {
  let f: FixtureDeployment;
  let work: string;
  let good: string;

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'fl' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-fail-'));
    // A media file big enough that the backup and restore take a few seconds: time to interrupt.
    await f.exec('cvat_server', 'head -c 400000000 /dev/urandom > /home/django/data/data/1/raw/video.mp4');
    good = join(work, 'good');
    const r = await runCli(['--project', f.project, 'backup', '--to', good]);
    assert.equal(r.code, 0, r.stderr);
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('no Docker engine: exit 3, one line', async () => {
    const r = await runCli(['status'], { DOCKER_HOST: 'unix:///tmp/no-such-docker.sock' });
    assert.equal(r.code, 3);
    oneLine(r.stderr);
    assert.match(r.stderr, /cannot reach the Docker engine at unix:\/\/\/tmp\/no-such-docker\.sock/);
  });

  it('no permission on the Docker socket: exit 3, says what to do', { skip: !isRoot && 'needs root to switch to an unprivileged user' }, async () => {
    const r = await run('su', ['nobody', '-s', '/bin/sh', '-c', `${process.execPath} ${join(process.cwd(), 'bin/cvat-backup.js')} status`], {
      allowFailure: true,
    });
    assert.equal(r.code, 3, r.stderr);
    assert.match(r.stderr, /permission denied.*docker' group/);
  });

  it('project not found: exit 4', async () => {
    const r = await runCli(['--project', 'no-such-project', 'status']);
    assert.equal(r.code, 4);
    oneLine(r.stderr);
    assert.match(r.stderr, /no compose project 'no-such-project'/);
  });

  it('DIR not empty: exit 6 and nothing is stopped', async () => {
    const before = await startTimes(f);
    const dir = join(work, 'not-empty');
    await mkdir(dir);
    await writeFile(join(dir, 'precious.txt'), 'keep me');
    const r = await runCli(['--project', f.project, 'backup', '--to', dir]);
    assert.equal(r.code, 6);
    oneLine(r.stderr);
    assert.equal(await readFile(join(dir, 'precious.txt'), 'utf8'), 'keep me');
    assert.equal(await startTimes(f), before, 'no container was restarted');
  });

  it('disk full midway: exit 7, CVAT running, nothing verify would accept', { skip: !isRoot && 'needs root to mount a small tmpfs' }, async () => {
    const mountpoint = join(work, 'small');
    await mkdir(mountpoint);
    await run('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mountpoint]);
    try {
      const dir = join(mountpoint, 'backup');
      const r = await runCli(['--project', f.project, 'backup', '--to', dir]);
      assert.equal(r.code, 7, r.stderr);
      oneLine(r.stderr);
      assert.match(r.stderr, /no space left/);
      await allRunning(f);
      assert.deepEqual(await readdir(dir), [], 'no archive and no partial file left');
      const v = await runCli(['verify', dir]);
      assert.notEqual(v.code, 0);
    } finally {
      await run('umount', [mountpoint]);
    }
  });

  it('a flipped byte: verify exit 8 naming the file; restore refuses before touching anything', async () => {
    const bad = join(work, 'flipped');
    await cp(good, bad, { recursive: true });
    const path = join(bad, 'cvat_data.tar.gz');
    const handle = await open(path, 'r+');
    const { size } = await handle.stat();
    const byte = Buffer.alloc(1);
    await handle.read(byte, 0, 1, Math.floor(size / 2));
    byte[0] = byte[0]! ^ 0x10;
    await handle.write(byte, 0, 1, Math.floor(size / 2));
    await handle.close();

    const v = await runCli(['verify', bad]);
    assert.equal(v.code, 8);
    oneLine(v.stderr);
    assert.match(v.stderr, /cvat_data\.tar\.gz/);

    await f.psql(`INSERT INTO engine_task (name) VALUES ('must survive a refused restore')`);
    const rows = await databaseFingerprint(f);
    const before = await startTimes(f);
    const r = await runCli(['--project', f.project, 'restore', bad]);
    assert.equal(r.code, 8);
    assert.match(r.stderr, /cvat_data\.tar\.gz/);
    assert.equal(await startTimes(f), before, 'nothing was stopped');
    assert.equal(await databaseFingerprint(f), rows);
  });

  it('a truncated archive: verify exit 8 naming the file', async () => {
    const bad = join(work, 'truncated');
    await cp(good, bad, { recursive: true });
    const path = join(bad, 'cvat_db.tar.gz');
    await truncate(path, Math.floor((await stat(path)).size * 0.6));
    const v = await runCli(['verify', bad]);
    assert.equal(v.code, 8);
    oneLine(v.stderr);
    assert.match(v.stderr, /cvat_db\.tar\.gz.*(corrupt|truncated)/);
  });

  it('version mismatch: exit 9 naming both versions and the way out; the flag overrides', async () => {
    const other = join(work, 'other-version');
    await cp(good, other, { recursive: true });
    const manifestPath = join(other, 'manifest.json');
    const manifest = JSON.parse(await readFile(manifestPath, 'utf8')) as { cvat: { version: string } };
    manifest.cvat.version = '2.72.0';
    await writeFile(manifestPath, JSON.stringify(manifest));
    const before = await startTimes(f);
    const r = await runCli(['--project', f.project, 'restore', other]);
    assert.equal(r.code, 9);
    oneLine(r.stderr);
    assert.match(r.stderr, /backup is CVAT 2\.72\.0 but the deployment runs CVAT 2\.73\.0/);
    assert.match(r.stderr, /CVAT_VERSION=v2\.72\.0 docker compose up -d/);
    assert.equal(await startTimes(f), before);

    const forced = await runCli(['--project', f.project, 'restore', other, '--allow-version-mismatch']);
    assert.equal(forced.code, 0, forced.stderr);
    assert.match(forced.stderr, /warning: restoring a CVAT 2\.72\.0 backup into CVAT 2\.73\.0/);
    await allRunning(f);
  });

  it('another cvat-backup on the project: exit 10; a stale lock is taken over', async () => {
    const name = `cvat-backup-lock-${f.project}`;
    const lockArgs = (pid: number): string[] => [
      'create', '--name', name, '--network', 'none',
      '--label', `io.cvat-backup.lock=${f.project}`, '--label', `io.cvat-backup.pid=${pid}`,
      '--label', `io.cvat-backup.host=${hostname()}`, '--label', 'io.cvat-backup.operation=backup',
      '--label', 'io.cvat-backup.started=2026-01-01T00:00:00.000Z', SERVER_IMAGE, 'true',
    ];
    await run('docker', lockArgs(process.pid)); // a live process holds it
    try {
      const before = await startTimes(f);
      const r = await runCli(['--project', f.project, 'backup', '--to', join(work, 'locked')]);
      assert.equal(r.code, 10);
      oneLine(r.stderr);
      assert.match(r.stderr, new RegExp(`another cvat-backup \\(backup, pid ${process.pid}.*docker rm ${name}`));
      assert.equal(await startTimes(f), before);
    } finally {
      await run('docker', ['rm', '-f', name]);
    }
    // A lock whose process is gone (killed with SIGKILL) does not block forever.
    const gone = spawn('true');
    await once(gone, 'exit');
    await run('docker', lockArgs(gone.pid!));
    const r = await runCli(['--project', f.project, 'backup', '--to', join(work, 'after-stale-lock')]);
    assert.equal(r.code, 0, r.stderr);
    const left = await run('docker', ['ps', '-aq', '--filter', `name=^/${name}$`]);
    assert.equal(left.stdout.trim(), '', 'the lock is released');
  });

  for (const via of ['host', 'engine'] as const) {
    it(`Ctrl-C during a backup (--via ${via}): exit 130, CVAT running, no archive left`, async () => {
      const dir = join(work, `interrupted-${via}`);
      const cli = startCli(['--project', f.project, 'backup', '--to', dir, '--via', via]);
      await cli.waitForStderr('archiving cvat_data');
      cli.kill('SIGINT');
      const r = await cli.result;
      assert.equal(r.code, 130, r.stderr);
      assert.match(r.stderr, /interrupted/);
      await allRunning(f);
      assert.deepEqual(await readdir(dir), []);
    });

    it(`Ctrl-C during a restore (--via ${via}): the previous data is put back and CVAT runs`, async () => {
      await f.psql(`INSERT INTO engine_task (name) VALUES ('written after the backup ' || '${via}')`);
      await f.exec('cvat_server', 'echo after > /home/django/data/after-backup.txt');
      const rows = await databaseFingerprint(f);
      const media = await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true });
      const cli = startCli(['--project', f.project, 'restore', good, '--via', via]);
      // On this host the volumes are written into staged folders while CVAT runs; through the
      // engine, in place while it is stopped.
      await cli.waitForStderr(via === 'host' ? 'restoring while CVAT runs cvat_data' : 'restoring cvat_data', 120000);
      cli.kill('SIGINT');
      const r = await cli.result;
      assert.equal(r.code, 130, r.stderr);
      if (via === 'host') assert.doesNotMatch(r.stderr, /stopping CVAT/, 'CVAT was never stopped');
      await allRunning(f);
      await f.waitForDatabase();
      assert.equal(await databaseFingerprint(f), rows, 'the rows of before the restore are back');
      assert.deepEqual(await snapshotTree(await f.volumePath('cvat_data'), { directoryTimes: true }), media);
      for (const v of ['cvat_data', 'cvat_db']) {
        const left = (await readdir(await f.volumePath(v))).filter((n) => n.startsWith('.cvat-backup-'));
        assert.deepEqual(left, [], `${v} holds nothing of ours`);
      }
    });
  }

  it('containers removed by docker compose down: exit 11 with the command to run; then restore starts CVAT', async () => {
    await f.compose(['down', '-t', '2']);
    const r = await runCli(['--project', f.project, 'restore', good]);
    assert.equal(r.code, 11);
    oneLine(r.stderr);
    assert.match(r.stderr, /CVAT_VERSION=v2\.73\.0 docker compose up --no-start/);
    const states = await f.states();
    assert.deepEqual(states, {}, 'nothing was started on an empty database');

    await f.compose(['up', '--no-start']);
    const ok = await runCli(['--project', f.project, 'restore', good]);
    assert.equal(ok.code, 0, ok.stderr);
    await allRunning(f);
  });
});
