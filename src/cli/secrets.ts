/**
 * Where the repository is and its password comes from. The password is never taken from argv:
 * --password-file (or $CVAT_BACKUP_PASSWORD_FILE), $CVAT_BACKUP_PASSWORD, or a hidden prompt.
 * A second repository (the source of `copy`) has its own: --from-password-file,
 * $CVAT_BACKUP_FROM_PASSWORD_FILE, $CVAT_BACKUP_FROM_PASSWORD, else the first one's.
 */
import { readFile, stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { Writable } from 'node:stream';
import { UsageError } from '../errors.js';

/** Default repository: /var/backups/cvat-backup for root, else $XDG_DATA_HOME/cvat-backup/repo. */
export function defaultRepository(): string {
  if (process.getuid?.() === 0) return '/var/backups/cvat-backup';
  return join(process.env['XDG_DATA_HOME'] ?? join(homedir(), '.local', 'share'), 'cvat-backup', 'repo');
}

export function repositoryLocation(flag: string | undefined): string {
  return flag ?? process.env['CVAT_BACKUP_REPO'] ?? defaultRepository();
}

async function prompt(question: string): Promise<string> {
  let muted = false;
  const output = new Writable({
    write: (chunk: Buffer, _encoding, callback) => {
      if (!muted) process.stderr.write(chunk);
      callback();
    },
  });
  const rl = createInterface({ input: process.stdin, output, terminal: true });
  return new Promise((resolve) => {
    rl.question(question, (answer) => {
      rl.close();
      process.stderr.write('\n');
      resolve(answer);
    });
    muted = true;
  });
}

/**
 * The repository password. `warn` hears of a password file that others can read (group or world
 * permissions): it still works, but anyone with that access can open every backup.
 */
export async function readPassword(passwordFileFlag: string | undefined, confirm: boolean, warn: (message: string) => void = () => undefined): Promise<string> {
  const given = await givenPassword(passwordFileFlag, TARGET, warn);
  if (given !== undefined) return given;
  if (!process.stdin.isTTY) {
    throw new UsageError('the repository needs a password: pass --password-file FILE, or set CVAT_BACKUP_PASSWORD_FILE or CVAT_BACKUP_PASSWORD');
  }
  const password = await prompt('repository password: ');
  if (password === '') throw new UsageError('an empty password is not allowed');
  if (confirm && (await prompt('again: ')) !== password) throw new UsageError('the passwords differ');
  return password;
}

/**
 * The password of the repository `copy` and `init --from-repo` read from (restic's --from-*):
 * --from-password-file (or $CVAT_BACKUP_FROM_PASSWORD_FILE), else $CVAT_BACKUP_FROM_PASSWORD;
 * undefined when none is given: the caller then uses the target repository's password.
 */
export function readSourcePassword(passwordFileFlag: string | undefined, warn: (message: string) => void = () => undefined): Promise<string | undefined> {
  return givenPassword(passwordFileFlag, SOURCE, warn);
}

/** The source repository of `copy` and `init --from-repo`: --from-repo, else $CVAT_BACKUP_FROM_REPO. */
export function sourceRepositoryLocation(flag: string | undefined): string | undefined {
  return flag ?? (process.env['CVAT_BACKUP_FROM_REPO'] || undefined);
}

interface PasswordSources {
  flag: string;
  fileEnv: string;
  env: string;
}

const TARGET: PasswordSources = { flag: '--password-file', fileEnv: 'CVAT_BACKUP_PASSWORD_FILE', env: 'CVAT_BACKUP_PASSWORD' };
const SOURCE: PasswordSources = { flag: '--from-password-file', fileEnv: 'CVAT_BACKUP_FROM_PASSWORD_FILE', env: 'CVAT_BACKUP_FROM_PASSWORD' };

/** A password from a file (flag, then its variable) or from the environment; undefined if neither is set. */
async function givenPassword(passwordFileFlag: string | undefined, from: PasswordSources, warn: (message: string) => void): Promise<string | undefined> {
  const passwordFile = passwordFileFlag ?? (process.env[from.fileEnv] || undefined);
  if (passwordFile !== undefined) {
    const st = await stat(passwordFile).catch(() => undefined);
    if (st !== undefined && (st.mode & 0o077) !== 0) {
      warn(`password file ${passwordFile} can be read by ${st.mode & 0o007 ? 'every user' : 'its group'} (mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}): run chmod 600 ${passwordFile}`);
    }
    const text = (await readFile(passwordFile, 'utf8').catch((error: unknown) => {
      throw new UsageError(`cannot read ${from.flag} ${passwordFile}: ${(error as Error).message}`);
    })).replace(/\r?\n$/, '');
    if (text === '') throw new UsageError(`${from.flag} ${passwordFile} is empty`);
    return text;
  }
  const fromEnv = process.env[from.env];
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  return undefined;
}
