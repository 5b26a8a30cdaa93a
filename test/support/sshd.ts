/**
 * A real OpenSSH server for tests (Debian's `openssh-server`; `.ci/run` installs it): its own
 * `sshd` on a free loopback port, with its own config, host key, authorized key, start folder and
 * log, all in a temporary folder. It is not the system's service: it never reads or writes
 * /etc/ssh, and stopping it ends only the process it started.
 *
 * The client side comes with it: a key pair, a `known_hosts` file that trusts the server's host key
 * (hashed, like Debian's `HashKnownHosts yes`, when asked) and an ssh config (`-F`) with an alias,
 * so `ssh -F <configFile> <alias>` and `sftp:<alias>:<path>` work without a password or a prompt
 * and without touching the user's ~/.ssh. The config's `Host *` block also holds for
 * `127.0.0.1`, so `sftp://<user>@127.0.0.1:<port>//<path>` works with the same `-F`.
 *
 * Logins are as one throwaway system user (`cvat-backup-sftp`, created once if missing: sshd only
 * logs in users the system knows; it has no password and its shell never runs for SFTP). The SFTP
 * session starts in `home`, a folder of the temporary folder owned by that user: relative paths
 * land there, and absolute paths under it are what tests use. Needs root (sshd's privilege
 * separation, and the folder's owner).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chmod, chown, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export const SSHD = '/usr/sbin/sshd';
export const SFTP_USER = 'cvat-backup-sftp';
export const SSH_ALIAS = 'cvat-backup-sftp-test';

export interface SshServer {
  readonly host: '127.0.0.1';
  readonly port: number;
  readonly user: string;
  /** The ssh config alias (HostName 127.0.0.1, Port, User) in `configFile`. */
  readonly alias: string;
  /** The client's ssh config: pass it with `-F`. */
  readonly configFile: string;
  /** The client's known_hosts (the server's key; hashed if asked). */
  readonly knownHostsFile: string;
  /** The client's private key (no passphrase), authorized on the server. */
  readonly identityFile: string;
  /** The server's host key, as a known_hosts line would name it (`ssh-ed25519 AAAA…`). */
  readonly hostPublicKey: string;
  /** The folder an SFTP session starts in (owned by `user`); give tests folders under it. */
  readonly home: string;
  /** The temporary folder that holds everything (removed by `stop`). */
  readonly dir: string;
  /** Extra ssh arguments that make a client use this server's files: `['-F', configFile]`. */
  readonly sshArgs: string[];
  /** What sshd logged (connections, refused keys), for failure messages. */
  log(): string;
  /** Ends sshd (SIGTERM, then SIGKILL) and removes the temporary folder. Idempotent. */
  stop(): Promise<void>;
}

export interface SshdOptions {
  /** Write the client's known_hosts hashed (`ssh-keygen -H`), as Debian's default client does. */
  hashKnownHosts?: boolean;
  /** Use this host private key instead of a new one (a server that kept its identity). */
  hostKeyFile?: string;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

/** Creates the login user once (concurrent test processes may race: the loser finds it made). */
async function ensureUser(): Promise<{ uid: number; gid: number }> {
  const lookup = async (): Promise<{ uid: number; gid: number } | undefined> => {
    try {
      const uid = Number((await run('id', ['-u', SFTP_USER])).stdout.trim());
      const gid = Number((await run('id', ['-g', SFTP_USER])).stdout.trim());
      return { uid, gid };
    } catch {
      return undefined;
    }
  };
  for (let attempt = 0; attempt < 10; attempt++) {
    const found = await lookup();
    if (found) {
      // No password ('*'), but not locked ('!'): without PAM, sshd refuses a locked account's keys.
      const shadow = (await run('getent', ['shadow', SFTP_USER])).stdout.split(':')[1] ?? '';
      if (shadow.startsWith('!')) await run('usermod', ['-p', '*', SFTP_USER]);
      return found;
    }
    // No home folder of its own (each server sets its session's start folder).
    await run('useradd', ['--system', '--no-create-home', '--home-dir', '/nonexistent', '--shell', '/bin/sh', '--password', '*', SFTP_USER]).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 100 * attempt));
  }
  throw new Error(`could not create the test user ${SFTP_USER} (useradd)`);
}

async function keygen(file: string, comment: string): Promise<string> {
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', comment, '-f', file]);
  return (await readFile(`${file}.pub`, 'utf8')).trim();
}

/** `ssh-ed25519 AAAA…` of a private key file (without its comment). */
export async function publicKeyOf(privateKeyFile: string): Promise<string> {
  const { stdout } = await run('ssh-keygen', ['-y', '-f', privateKeyFile]);
  return stdout.trim().split(/\s+/).slice(0, 2).join(' ');
}

/** A known_hosts line that trusts `hostPublicKey` for 127.0.0.1 on `port`. */
export function knownHostsLine(port: number, hostPublicKey: string): string {
  return `[127.0.0.1]:${port} ${hostPublicKey}\n`;
}

/** Starts sshd; see the module comment. Fails with the reason when it cannot (not root, no sshd). */
export async function startSshd(options: SshdOptions = {}): Promise<SshServer> {
  if (process.getuid?.() !== 0) throw new Error('the test sshd needs root (privilege separation, a login user)');
  await run(SSHD, ['-V']).catch((error: unknown) => {
    throw new Error(`no OpenSSH server at ${SSHD} (apt-get install openssh-server; .ci/run does): ${(error as Error).message}`);
  });
  const { uid, gid } = await ensureUser();
  // sshd's privilege separation needs its empty folder (the package's service would create it).
  await mkdir('/run/sshd', { recursive: true, mode: 0o755 });

  const dir = await mkdtemp(join(tmpdir(), 'cvat-backup-sshd-'));
  await chmod(dir, 0o755); // the login user must reach `home` through it
  const server = join(dir, 'server');
  const client = join(dir, 'client');
  const home = join(dir, 'home');
  await mkdir(server, { mode: 0o700 });
  await mkdir(client, { mode: 0o700 });
  await mkdir(home, { mode: 0o755 });
  await chown(home, uid, gid);

  const hostKey = join(server, 'ssh_host_ed25519_key');
  let hostPublicKey: string;
  if (options.hostKeyFile) {
    await writeFile(hostKey, await readFile(options.hostKeyFile), { mode: 0o600 });
    hostPublicKey = await publicKeyOf(hostKey);
  } else {
    hostPublicKey = (await keygen(hostKey, 'cvat-backup test host')).split(/\s+/).slice(0, 2).join(' ');
  }
  const identityFile = join(client, 'id_ed25519');
  const userKey = await keygen(identityFile, 'cvat-backup test client');
  // sshd reads the authorized keys as the login user: outside the private server folder.
  await mkdir(join(dir, 'authorized'), { mode: 0o755 });
  const authorizedKeys = join(dir, 'authorized', 'keys');
  await writeFile(authorizedKeys, `${userKey}\n`, { mode: 0o644 });

  let lastError = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const sshdConfig = join(server, 'sshd_config');
    await writeFile(
      sshdConfig,
      [
        `Port ${port}`,
        'ListenAddress 127.0.0.1',
        `HostKey ${hostKey}`,
        'PidFile none',
        `AuthorizedKeysFile ${authorizedKeys}`,
        'PubkeyAuthentication yes',
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'UsePAM no',
        // The temporary folder sits in /tmp (world-writable): sshd's path checks would refuse it.
        'StrictModes no',
        `AllowUsers ${SFTP_USER}`,
        'PermitRootLogin no',
        'AllowTcpForwarding no',
        'X11Forwarding no',
        'LogLevel VERBOSE',
        `Subsystem sftp internal-sftp -d ${home}`,
        '',
      ].join('\n'),
    );
    const child = spawn(SSHD, ['-D', '-e', '-f', sshdConfig], { stdio: ['ignore', 'ignore', 'pipe'], env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' } });
    let log = '';
    child.stderr.on('data', (chunk: Buffer) => {
      log += chunk.toString('utf8');
      if (log.length > 200_000) log = log.slice(-100_000);
    });
    const started = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 15_000);
      const check = (): void => {
        if (log.includes(`Server listening on 127.0.0.1 port ${port}`)) {
          clearTimeout(timer);
          resolve(true);
        }
      };
      child.stderr.on('data', check);
      child.once('exit', () => {
        clearTimeout(timer);
        resolve(false);
      });
    });
    if (!started) {
      lastError = log;
      await stopProcess(child);
      continue;
    }

    const knownHostsFile = join(client, 'known_hosts');
    await writeFile(knownHostsFile, knownHostsLine(port, hostPublicKey), { mode: 0o600 });
    if (options.hashKnownHosts) {
      await run('ssh-keygen', ['-H', '-f', knownHostsFile]);
      await rm(`${knownHostsFile}.old`, { force: true });
    }
    const configFile = join(client, 'config');
    await writeFile(configFile, clientConfig({ port, identityFile, knownHostsFile }), { mode: 0o600 });

    let stopped: Promise<void> | undefined;
    return {
      host: '127.0.0.1',
      port,
      user: SFTP_USER,
      alias: SSH_ALIAS,
      configFile,
      knownHostsFile,
      identityFile,
      hostPublicKey,
      home,
      dir,
      sshArgs: ['-F', configFile],
      log: () => log,
      stop: () =>
        (stopped ??= (async () => {
          await stopProcess(child);
          await rm(dir, { recursive: true, force: true });
        })()),
    };
  }
  await rm(dir, { recursive: true, force: true });
  throw new Error(`sshd did not start:\n${lastError}`);
}

/**
 * An ssh client config for this server: the alias, and for every host this server's client key
 * and known_hosts only (no agent, no system files), so nothing of the machine's ssh setup leaks in.
 */
export function clientConfig(settings: { port: number; identityFile: string; knownHostsFile: string; alias?: string }): string {
  return [
    `Host ${settings.alias ?? SSH_ALIAS}`,
    '  HostName 127.0.0.1',
    `  Port ${settings.port}`,
    `  User ${SFTP_USER}`,
    'Host *',
    `  IdentityFile ${settings.identityFile}`,
    '  IdentitiesOnly yes',
    '  IdentityAgent none',
    `  UserKnownHostsFile ${settings.knownHostsFile}`,
    '  GlobalKnownHostsFile /dev/null',
    '  UpdateHostKeys no',
    '  ControlMaster no',
    '  ControlPath none',
    '',
  ].join('\n');
}

async function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}
