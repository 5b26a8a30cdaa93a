/**
 * For tests: a real `rclone serve restic` over a temporary folder on a loopback port (optionally
 * append-only, optionally with a user and password kept in an htpasswd file, never on its
 * command line). Not used by the tool itself.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface RcloneServer {
  /** `http://127.0.0.1:PORT` */
  url: string;
  /** The folder it serves. */
  dir: string;
  pid: number;
  stop(): Promise<void>;
}

export interface RcloneServerOptions {
  appendOnly?: boolean;
  user?: { name: string; password: string };
  /** What it serves: a temporary folder (default), or an rclone remote such as `:memory:`. */
  remote?: string;
}

/** Starts rclone on a free loopback port and resolves once it listens; rejects if rclone cannot start. */
export async function startRcloneServer(options: RcloneServerOptions = {}): Promise<RcloneServer> {
  const dir = mkdtempSync(join(tmpdir(), 'rclone-serve-'));
  const args = ['serve', 'restic', '--addr', '127.0.0.1:0', '--config', join(dir, 'rclone.conf'), options.remote ?? join(dir, 'store')];
  if (options.appendOnly) args.push('--append-only');
  if (options.user) {
    // {SHA} entries: what htpasswd -s writes, and what rclone reads.
    const sha = createHash('sha1').update(options.user.password).digest('base64');
    writeFileSync(join(dir, 'htpasswd'), `${options.user.name}:{SHA}${sha}\n`, { mode: 0o600 });
    args.push('--htpasswd', join(dir, 'htpasswd'));
  }
  writeFileSync(join(dir, 'rclone.conf'), '');
  const child: ChildProcess = spawn('rclone', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const url = await new Promise<string>((resolve, reject) => {
    let err = '';
    const timer = setTimeout(() => reject(new Error(`rclone serve restic did not start: ${err}`)), 20_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`rclone serve restic exited (${code}): ${err}`));
    });
    child.stderr!.on('data', (chunk: Buffer) => {
      err += chunk.toString();
      const match = /https?:\/\/127\.0\.0\.1:(\d+)/.exec(err);
      if (match) {
        clearTimeout(timer);
        resolve(`http://127.0.0.1:${match[1]}`);
      }
    });
  });
  child.stderr!.resume();
  return {
    url,
    dir: join(dir, 'store'),
    pid: child.pid!,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
