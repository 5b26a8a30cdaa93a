/**
 * SFTP repositories through the system's ssh to a real OpenSSH sshd on a loopback port
 * (test/support/sshd.ts): the Backend contract, both location forms, refusals as one line with exit
 * 17 (unknown or changed host key, a key the server refuses, a host that does not answer), a missing
 * remote folder, and a CVAT fixture backed up into the server, checked with --read-data and
 * restored byte for byte — with the repository password nowhere in a process list, in ssh's
 * environment or in what the command printed.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { conformance } from '../src/backend/conformance.js';
import { openBackend } from '../src/backend/open.js';
import { SftpBackend } from '../src/backend/sftp.js';
import { clientConfig, knownHostsLine, startSshd, type SshServer } from './support/sshd.js';
import { createFixtureDeployment, databaseFingerprint, type FixtureDeployment } from './fixture/deployment.js';
import { snapshotTree, type TreeEntry } from './fixture/tree.js';
import { runCli, startCli, type CliResult } from './fixture/cli.js';

const run = promisify(execFile);
const isRoot = process.getuid?.() === 0;
const FILE_VOLUMES = ['cvat_data', 'cvat_keys', 'cvat_logs', 'cvat_events_db', 'cvat_inmem_db'];
const PASSWORD = `sftp-test-secret-${randomBytes(6).toString('hex')}`;

/** Exit 17, one line on stderr, matching `message`; nothing on stdout. */
function refusedWith(r: CliResult, message: RegExp): void {
  assert.equal(r.code, 17, r.stderr);
  assert.match(r.stderr, message);
  assert.equal(r.stderr.trimEnd().split('\n').length, 1, `one line: ${r.stderr}`);
  assert.equal(r.stdout, '');
}

describe('SFTP repositories on a real OpenSSH server', { skip: !isRoot && 'the test sshd needs root' }, () => {
  let sshd: SshServer;
  let serial = 0;

  before(async () => {
    sshd = await startSshd({ hashKnownHosts: true });
  });
  after(async () => {
    await sshd?.stop();
  });

  conformance('sftp (ssh to sshd, an ssh config alias)', () => {
    const name = `conformance-${serial++}`;
    const backend = new SftpBackend({ user: undefined, host: sshd.alias, port: undefined, path: name, text: `sftp:${sshd.alias}:${name}` }, { args: sshd.sshArgs });
    return { backend, dispose: () => rm(join(sshd.home, name), { recursive: true, force: true }) };
  });

  it('sftp://user@host:port//absolute and sftp:alias:relative reach the same folder, as the login user', async () => {
    // As the CLI opens them (retries; no cache here: what is on the server is the point).
    const settings = { env: process.env, sftpArgs: `-F ${sshd.configFile}`, cache: { disabled: true } };
    const byUrl = await openBackend(`sftp://${sshd.user}@127.0.0.1:${sshd.port}/${sshd.home}/forms`, settings);
    await byUrl.create();
    await byUrl.save('snapshots', 's1', Buffer.from('snapshot'));
    await byUrl.close?.();
    const byAlias = await openBackend(`sftp:${sshd.alias}:forms`, settings);
    assert.equal((await byAlias.load('snapshots', 's1')).toString(), 'snapshot');
    await byAlias.close?.();
    const onServer = await stat(join(sshd.home, 'forms', 'snapshots', 's1'));
    const uid = Number((await run('id', ['-u', sshd.user])).stdout);
    assert.equal(onServer.uid, uid);
    assert.equal(onServer.mode & 0o777, 0o600);
  });

  describe('refusals', () => {
    let refusals: string;
    const env = (config: string): NodeJS.ProcessEnv => ({
      CVAT_BACKUP_REPO: `sftp:${sshd.alias}:refused`,
      CVAT_BACKUP_PASSWORD: PASSWORD,
      CVAT_BACKUP_SFTP_ARGS: `-F ${config}`,
      CVAT_BACKUP_CACHE_DIR: join(sshd.dir, 'cache'),
    });
    /** A client config like the server's, with its own known_hosts (and key). */
    const config = async (name: string, knownHosts: string, identityFile = sshd.identityFile, port = sshd.port): Promise<string> => {
      const knownHostsFile = join(refusals, `${name}.known_hosts`);
      await writeFile(knownHostsFile, knownHosts, { mode: 0o600 });
      const file = join(refusals, `${name}.config`);
      await writeFile(file, clientConfig({ port, identityFile, knownHostsFile }), { mode: 0o600 });
      return file;
    };
    before(() => {
      refusals = join(sshd.dir, 'client');
    });

    it('an unknown host key: refused in one line (exit 17), nothing created on the server', async () => {
      const r = await runCli(['init'], env(await config('unknown', '')));
      refusedWith(r, /sftp:cvat-backup-sftp-test:refused: the SSH host key of cvat-backup-sftp-test is not known, refused/);
      await assert.rejects(stat(join(sshd.home, 'refused')), /ENOENT/);
    });

    it('a changed host key: refused in one line (exit 17), nothing created on the server', async () => {
      const other = join(refusals, 'other_host_key');
      await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', other]);
      const otherKey = (await readFile(`${other}.pub`, 'utf8')).split(' ').slice(0, 2).join(' ');
      const r = await runCli(['init'], env(await config('changed', knownHostsLine(sshd.port, otherKey))));
      refusedWith(r, /the SSH host key of cvat-backup-sftp-test has CHANGED, refused .*ssh-keygen -R/);
      await assert.rejects(stat(join(sshd.home, 'refused')), /ENOENT/);
    });

    it('a key the server does not accept, and a host that does not answer: one line each (exit 17)', async () => {
      const stranger = join(refusals, 'stranger_key');
      await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', stranger]);
      const refusedKey = await runCli(['snapshots'], env(await config('stranger', knownHostsLine(sshd.port, sshd.hostPublicKey), stranger)));
      refusedWith(refusedKey, /the SSH login was refused \(.*Permission denied \(publickey\)\.\): give ssh a key/);
      const closed = await runCli(['snapshots'], env(await config('closed', '', sshd.identityFile, 1)));
      refusedWith(closed, /cannot reach cvat-backup-sftp-test \(ssh: connect to host 127.0.0.1 port 1: Connection refused\)/);
    });

    it('a remote folder that does not exist: no repository there (exit 14), nothing created', async () => {
      const r = await runCli(['--sftp-args', `-F ${sshd.configFile}`, 'snapshots'], {
        CVAT_BACKUP_REPO: `sftp:${sshd.alias}:${sshd.home}/nothing/here`,
        CVAT_BACKUP_PASSWORD: PASSWORD,
        CVAT_BACKUP_CACHE_DIR: join(sshd.dir, 'cache'),
      });
      assert.equal(r.code, 14, r.stderr);
      assert.match(r.stderr, /no repository at sftp:cvat-backup-sftp-test:.*\/nothing\/here: create one with 'cvat-backup init'/);
      await assert.rejects(stat(join(sshd.home, 'nothing')), /ENOENT/);
    });
  });

  describe('a CVAT deployment backed up into the server and restored from it', () => {
    let f: FixtureDeployment;
    let env: NodeJS.ProcessEnv;
    let trees: Record<string, Record<string, TreeEntry>>;
    let rows: string;
    const outputs: string[] = [];
    const cli = async (args: string[]): Promise<CliResult> => {
      const r = await runCli(args, env);
      outputs.push(r.stdout, r.stderr);
      return r;
    };

    before(async () => {
      f = await createFixtureDeployment({ prefix: 'sf' });
      env = {
        CVAT_BACKUP_REPO: `sftp:${sshd.alias}:cvat-repo`,
        CVAT_BACKUP_PASSWORD: PASSWORD,
        CVAT_BACKUP_SFTP_ARGS: `-F ${sshd.configFile}`,
        CVAT_BACKUP_CACHE_DIR: join(sshd.dir, 'cache'),
      };
    });
    after(async () => {
      await f?.destroy();
    });

    it('init, then a backup whose ssh shows no secret in any process list or in its environment', async () => {
      const init = await cli(['--json', 'init']);
      assert.equal(init.code, 0, init.stderr);
      assert.equal((JSON.parse(init.stdout) as { repository: string }).repository, 'sftp:cvat-backup-sftp-test:cvat-repo');
      assert.ok((await readdir(join(sshd.home, 'cvat-repo'))).includes('config'), 'the repository is on the server');

      rows = await databaseFingerprint(f);
      trees = {};
      for (const v of FILE_VOLUMES) trees[v] = await snapshotTree(await f.volumePath(v), { directoryTimes: true });

      const backup = startCli(['--project', f.project, '--json', 'backup'], env);
      const seen = new Set<string>();
      let sshEnvironment = '';
      let done = false;
      const result = backup.result.finally(() => (done = true));
      while (!done) {
        const { stdout } = await run('ps', ['-eo', 'pid=,args=']);
        for (const line of stdout.split('\n')) {
          seen.add(line.trim().replace(/^\d+\s+/, ''));
          const ssh = /^\s*(\d+)\s+ssh .*-s -- cvat-backup-sftp-test sftp$/.exec(line);
          if (ssh) sshEnvironment ||= await readFile(`/proc/${ssh[1]}/environ`, 'utf8').catch(() => '');
        }
        await new Promise((r) => setTimeout(r, 50));
      }
      const r = await result;
      outputs.push(r.stdout, r.stderr);
      assert.equal(r.code, 0, r.stderr);
      assert.ok([...seen].some((args) => args === `ssh -F ${sshd.configFile} -o BatchMode=yes -s -- cvat-backup-sftp-test sftp`), 'ssh ran as expected');
      assert.ok(![...seen].some((args) => args.includes(PASSWORD)), 'no process shows the password');
      assert.notEqual(sshEnvironment, '', "ssh's environment was read");
      assert.ok(!sshEnvironment.includes(PASSWORD) && !sshEnvironment.includes('CVAT_BACKUP_PASSWORD'), 'ssh does not get the password');
      const packs = await readdir(join(sshd.home, 'cvat-repo', 'data'), { recursive: true });
      assert.ok(packs.filter((p) => /^[0-9a-f]{2}\/[0-9a-f]{64}$/.test(p)).length > 0, 'packs are on the server');
    });

    it('check --read-data reads every pack over SFTP; restore brings back every byte and row', async () => {
      const check = await cli(['check', '--read-data']);
      assert.equal(check.code, 0, check.stdout + check.stderr);

      await f.psql('DELETE FROM engine_labeledshape WHERE id % 3 = 0;');
      await writeFile(join(await f.volumePath('cvat_data'), 'data/1/raw/after-backup.jpg'), randomBytes(100_000));
      await rm(join(await f.volumePath('cvat_data'), 'data/1/manifest.jsonl'));

      const restore = await cli(['--project', f.project, 'restore', 'latest']);
      assert.equal(restore.code, 0, restore.stderr);
      await f.waitForDatabase();
      assert.equal(await databaseFingerprint(f), rows);
      for (const v of FILE_VOLUMES) assert.deepEqual(await snapshotTree(await f.volumePath(v), { directoryTimes: true }), trees[v], v);
      const states = await f.states();
      assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
    });

    it('the password appears in no output of any command', () => {
      assert.ok(outputs.length >= 8);
      for (const text of outputs) assert.ok(!text.includes(PASSWORD), text);
    });
  });
});
