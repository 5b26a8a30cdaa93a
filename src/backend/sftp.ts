/**
 * A repository on an SFTP server (`sftp:user@host:/path`, `sftp://user@host:port//path`), in the
 * local backend's layout: `config`, `keys/`, `data/<2 hex>/`, `index/`, `snapshots/`, `locks/`,
 * `state/`.
 *
 * The connection is the system's `ssh HOST -s sftp` (restic's design), speaking SFTP over its
 * stdin and stdout with our own small client (sftp-protocol.ts). Not a library such as ssh2 (in
 * node_modules through dockerode): users' SSH setups live in ~/.ssh/config (Host aliases with
 * HostName/Port/User, IdentityFile, ProxyJump and ProxyCommand, Match blocks, ControlMaster), in
 * their agent and in hashed known_hosts files, and a library reads none of that or re-implements
 * part of it with quiet differences: a backup that fails where `ssh host` works. Running ssh gives
 * exactly what the user's `ssh host` does, host key checks included: an unknown or changed host key
 * is refused by ssh itself (BatchMode: it never prompts) and reported by us as one line.
 * `--sftp-args` adds arguments (`-i KEY`, `-F CONFIG`, `-o …`) and `--sftp-command` replaces the
 * whole command (restic's `sftp.args` and `sftp.command`). No password is ever taken: keys and the
 * agent only, so none can end up in a process list.
 *
 * ssh runs in a session of its own (setsid), so a Ctrl-C reaches only us and the connection lives
 * on while the command removes its lock and starts CVAT again; ssh ends when its stdin closes
 * (`close`, or this process dying), and gets none of our secrets in its environment. Its stdin and
 * stdout are one end of a unix socket pair (socket-pair.ts), not pipes: our end is read in place,
 * so the data of a read reply goes from the kernel straight into the buffer the read gave.
 *
 * One ssh process per backend, connected on first use; requests are pipelined over it (several
 * files at once, and several reads or writes in flight per file). If the connection drops, the
 * calls in flight fail (ECONNRESET) and the next call connects again.
 *
 * A save writes `.tmp-<random>` in the target's folder, fsyncs it (`fsync@openssh.com`, where the
 * server has it), closes it and renames it over the target with `posix-rename@openssh.com`
 * (atomic; servers without it get remove + rename), then fsyncs the folder (OpenSSH opens folders
 * like files; where a server refuses, folder syncs are left out from then on). A killed save leaves
 * only the temporary file, which `listTemporary` shows to prune.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants } from 'node:buffer';
import type { Socket } from 'node:net';
import type { Readable } from 'node:stream';
import { socketPair } from './socket-pair.js';
import { StorageAccessError, TargetNotEmptyError, UsageError } from '../errors.js';
import type { Backend, FileInfo, FileKind, TemporaryFile } from './backend.js';
import { OPEN_FLAGS, SftpError, SftpSession, isDirectory, isRegularFile, type DirectoryEntry, type FileAttributes } from './sftp-protocol.js';

const KINDS: FileKind[] = ['keys', 'data', 'index', 'snapshots', 'locks', 'state'];
const TEMPORARY = '.tmp-';
/** Reads or writes in flight for one file. */
const WINDOW = 16;
/** Folders listed at once by `list('data')`. */
const LIST_PARALLEL = 16;

export interface SftpLocation {
  user: string | undefined;
  host: string;
  port: number | undefined;
  path: string;
}

export interface SftpOptions {
  /** The whole command that starts an SFTP session on stdin/stdout (replaces ssh's; restic's `sftp.command`). */
  command?: string[] | undefined;
  /** Extra arguments for ssh, before ours (restic's `sftp.args`): `-i KEY`, `-F CONFIG`, `-o Option=value`. */
  args?: string[] | undefined;
  /** The environment ssh starts with (default: ours), less our secrets. */
  env?: NodeJS.ProcessEnv | undefined;
}

/** Environment variables that carry our (or our neighbours') secrets: ssh and what it runs never see them. */
const SECRET_ENV = /^(CVAT_BACKUP_|RESTIC_)|^AWS_SECRET_ACCESS_KEY$|^AWS_SESSION_TOKEN$/;

/** The ssh command line for a location; never a credential (there is none to put there). */
export function sshCommand(location: SftpLocation, options: SftpOptions = {}): string[] {
  if (options.command && options.command.length > 0) return options.command;
  // A host or user that starts with '-' would be an ssh option (`-oProxyCommand=…`).
  if (location.host.startsWith('-') || location.user?.startsWith('-')) throw new UsageError(`sftp location: a host or user may not start with '-'`);
  if (location.port !== undefined && !(Number.isInteger(location.port) && location.port > 0 && location.port < 65536)) throw new UsageError(`sftp location: port ${location.port} is not a port`);
  return [
    'ssh',
    ...(options.args ?? []),
    '-o',
    'BatchMode=yes',
    ...(location.port !== undefined ? ['-p', String(location.port)] : []),
    ...(location.user !== undefined ? ['-l', location.user] : []),
    '-s',
    '--',
    location.host,
    'sftp',
  ];
}

/**
 * Splits a command line the way a shell would for plain words and quotes ('…', "…", \x), with no
 * expansions: `--sftp-command "ssh -p 2222 backup@nas -s sftp"`.
 */
export function splitCommand(text: string): string[] {
  const words: string[] = [];
  let word: string | undefined;
  let quote: "'" | '"' | undefined;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quote === "'") {
      if (c === "'") quote = undefined;
      else word += c;
    } else if (quote === '"') {
      if (c === '"') quote = undefined;
      else if (c === '\\' && (text[i + 1] === '"' || text[i + 1] === '\\')) word += text[++i]!;
      else word += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      word ??= '';
    } else if (c === '\\' && i + 1 < text.length) {
      word = (word ?? '') + text[++i]!;
    } else if (/\s/.test(c)) {
      if (word !== undefined) words.push(word);
      word = undefined;
    } else {
      word = (word ?? '') + c;
    }
  }
  if (quote) throw new UsageError(`unterminated ${quote} in '${text}'`);
  if (word !== undefined) words.push(word);
  return words;
}

/** The last line ssh wrote that says something (its banners and warnings come first). */
function lastLine(stderr: string): string {
  const lines = stderr
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l !== '' && !/^@+$/.test(l));
  return (lines.at(-1) ?? '').slice(0, 300);
}

/** Why ssh could not give us an SFTP session, as one line that says what to do. */
export function loginFailure(where: string, host: string, stderr: string, exit: string): StorageAccessError & { reachability?: true } {
  if (/REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed/i.test(stderr)) {
    return new StorageAccessError(
      `${where}: the SSH host key of ${host} has CHANGED, refused (someone may be in between; if the server was re-keyed, check its new fingerprint and remove the old key with 'ssh-keygen -R ${host}')`,
    );
  }
  if (/host key is known|Host key verification failed/i.test(stderr)) {
    return new StorageAccessError(`${where}: the SSH host key of ${host} is not known, refused (connect once with 'ssh ${host}' and compare the fingerprint it shows with the server's, so it lands in known_hosts)`);
  }
  if (/Permission denied \(/i.test(stderr)) {
    return new StorageAccessError(`${where}: the SSH login was refused (${lastLine(stderr)}): give ssh a key the server accepts (ssh-agent, IdentityFile in ~/.ssh/config, or --sftp-args '-i KEY')`);
  }
  if (/subsystem request failed/i.test(stderr)) {
    return new StorageAccessError(`${where}: the SSH server has no SFTP subsystem (${lastLine(stderr)})`);
  }
  if (/Could not resolve hostname|Connection refused|timed out|No route to host|Network is unreachable|Connection closed|Connection reset|kex_exchange_identification/i.test(stderr)) {
    return Object.assign(new StorageAccessError(`${where}: cannot reach ${host} (${lastLine(stderr)})`), { reachability: true as const });
  }
  return new StorageAccessError(`${where}: ssh could not start an SFTP session (${lastLine(stderr) || exit})`);
}

interface Connection {
  session: SftpSession;
  child: ChildProcessByStdio<null, null, Readable>;
  /** Our end of ssh's stdin and stdout. */
  socket: Socket;
  /** Resolves when ssh ended, with how it ended. */
  exited: Promise<string>;
  stderr(): string;
  /** Keeps this process alive for the connection (true) or not (false). */
  hold(busy: boolean): void;
  readLength: number;
  writeLength: number;
  /** Folders can be fsynced (the server has fsync@openssh.com and opens folders); cleared when one fails. */
  syncFolders: boolean;
}

const isMissing = (error: unknown): boolean => (error as { code?: unknown } | null)?.code === 'ENOENT';

export class SftpBackend implements Backend {
  readonly location: string;
  private readonly root: string;
  private current: Promise<Connection> | undefined;
  /** A session was had once (a later failure to reach the host is then taken as passing). */
  private connected = false;

  constructor(
    private readonly where: SftpLocation & { text: string },
    private readonly options: SftpOptions = {},
  ) {
    this.location = where.text;
    sshCommand(where, options); // refuses a host or user that ssh would take for an option, now
    this.root = where.path.length > 1 ? where.path.replace(/\/+$/, '') : where.path;
  }

  // ---- paths ----

  private under(...names: string[]): string {
    return [this.root === '/' ? '' : this.root, ...names].join('/');
  }

  private folder(kind: FileKind, name: string): string {
    if (kind === 'config') return this.root;
    if (kind === 'data') return this.under('data', name.slice(0, 2));
    return this.under(kind);
  }

  private path(kind: FileKind, name: string): string {
    if (kind === 'config') return this.under('config');
    return `${this.folder(kind, name)}/${name}`;
  }

  // ---- connection ----

  private async connect(): Promise<Connection> {
    const argv = sshCommand(this.where, this.options);
    const env = Object.fromEntries(Object.entries(this.options.env ?? process.env).filter(([name]) => !SECRET_ENV.test(name)));
    // ssh's stdin and stdout are one end of a socket pair: ours reads in place, so the data of a
    // read reply lands straight in the buffer the read gave (SftpSession.readBuffer), not in a new
    // buffer per chunk that is then copied (a fifth of this thread's time in a 2 GiB restore).
    const reader: { session?: SftpSession; early: Buffer[] } = { early: [] };
    const [socket, theirs] = await socketPair({
      buffer: () => reader.session?.readBuffer() ?? Buffer.allocUnsafe(64 << 10),
      callback: (n, buffer) => {
        // Nothing comes before our INIT; were it to, it is kept for the session.
        if (reader.session) reader.session.received(n, buffer);
        else reader.early.push(Buffer.from(buffer.subarray(0, n)));
        return true;
      },
    });
    let child: ChildProcessByStdio<null, null, Readable>;
    try {
      child = spawn(argv[0]!, argv.slice(1), { stdio: [theirs, theirs, 'pipe'], detached: true, env });
    } finally {
      theirs.destroy(); // ssh has its own copy
    }
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => {
      stderr = (stderr + chunk.toString('utf8')).slice(-16384);
    });
    const spawned = new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', reject);
    });
    const exited = new Promise<string>((resolve) => {
      child.once('close', (code, signal) => resolve(signal ? `ssh was killed by ${signal}` : `ssh exited with code ${code ?? '?'}`));
      child.once('error', (error) => resolve(error.message));
    });
    try {
      await spawned;
    } catch (error) {
      socket.destroy();
      const missing = (error as NodeJS.ErrnoException).code === 'ENOENT';
      throw new StorageAccessError(`${this.location}: cannot run ${argv[0]!}${missing ? ' (install the OpenSSH client: apt-get install openssh-client)' : `: ${(error as Error).message}`}`, { cause: error });
    }
    // An idle connection does not keep this process alive (a command that forgot to close it, or
    // a test that failed before it could, still ends; ssh then sees its stdin close and ends too).
    const hold = (busy: boolean): void => {
      for (const handle of [child, socket, child.stderr] as unknown as { ref?(): void; unref?(): void }[]) {
        if (busy) handle.ref?.();
        else handle.unref?.();
      }
    };
    let session: SftpSession;
    try {
      const starting = SftpSession.begin(socket, socket, { onBusy: hold, readsInPlace: true });
      reader.session = starting.session;
      for (const early of reader.early.splice(0)) reader.session.received(early.length, early);
      session = await starting.ready;
    } catch (error) {
      // ssh could not log in (or the other side is no SFTP server): wait for its last words.
      socket.destroy();
      const timer = setTimeout(() => child.kill('SIGTERM'), 5000);
      const exit = await exited;
      clearTimeout(timer);
      if (error instanceof SftpError && error.code !== 'ECONNRESET') {
        throw new StorageAccessError(`${this.location}: not an SFTP server (${error.message}${lastLine(stderr) ? `; ssh said: ${lastLine(stderr)}` : ''})`, { cause: error });
      }
      const failure = loginFailure(this.location, this.where.host, stderr, exit);
      // A host that answered before and not now is likely back soon (a restart, a network blip):
      // the retry wrapper may try again. A first contact that fails, or a refusal, is final.
      if (this.connected && failure.reachability) Object.assign(failure, { transient: true });
      throw failure;
    }
    this.connected = true;
    const limits = await session.limits();
    return {
      session,
      child,
      socket,
      exited,
      stderr: () => stderr,
      hold,
      readLength: limits.readLength,
      writeLength: limits.writeLength,
      syncFolders: session.extensions.has('fsync@openssh.com'),
    };
  }

  /** The live connection, connecting on first use and after the last one dropped. */
  private async connection(): Promise<Connection> {
    const current = this.current;
    if (current) {
      const connection = await current;
      if (!connection.session.failure) return connection;
      if (this.current === current) this.current = undefined;
    }
    if (!this.current) {
      const connecting = this.connect();
      this.current = connecting;
      connecting.catch(() => {
        if (this.current === connecting) this.current = undefined;
      });
    }
    return this.current;
  }

  /** Runs `fn` on the connection; a dropped connection is reported with what ssh said. */
  private async call<T>(fn: (connection: Connection) => Promise<T>): Promise<T> {
    const connection = await this.connection();
    try {
      return await fn(connection);
    } catch (error) {
      if (error instanceof SftpError && error === connection.session.failure && error.code === 'ECONNRESET') {
        let timer: NodeJS.Timeout | undefined;
        const exit = await Promise.race([connection.exited, new Promise<string>((resolve) => (timer = setTimeout(() => resolve('ssh still running'), 2000)))]);
        clearTimeout(timer);
        const said = lastLine(connection.stderr());
        throw new SftpError(`${this.location}: the SFTP connection ended (${said || exit})`, 'ECONNRESET', undefined, { cause: error });
      }
      throw error;
    }
  }

  async close(): Promise<void> {
    const current = this.current;
    this.current = undefined;
    const connection = await current?.catch(() => undefined);
    if (!connection) return;
    connection.hold(true); // until ssh has ended
    connection.socket.end();
    const timer = setTimeout(() => connection.child.kill('SIGTERM'), 5000);
    await connection.exited;
    clearTimeout(timer);
  }

  // ---- helpers over a session ----

  private static async statOrUndefined(session: SftpSession, path: string): Promise<FileAttributes | undefined> {
    try {
      return await session.stat(path);
    } catch (error) {
      if (isMissing(error)) return undefined;
      throw error;
    }
  }

  /** Every entry of a folder but `.` and `..`; a missing folder has none. */
  private static async readFolder(session: SftpSession, path: string): Promise<DirectoryEntry[]> {
    let handle: Buffer;
    try {
      handle = await session.opendir(path);
    } catch (error) {
      if (isMissing(error)) return [];
      throw error;
    }
    const entries: DirectoryEntry[] = [];
    try {
      for (let batch = await session.readdir(handle); batch !== undefined; batch = await session.readdir(handle)) {
        for (const entry of batch) if (entry.name !== '.' && entry.name !== '..') entries.push(entry);
      }
    } finally {
      void session.close(handle).catch(() => undefined);
    }
    return entries;
  }

  /** Creates a folder unless one is there (version 3 has no "exists" status: a failed mkdir is checked with stat). */
  private static async mkdirIfMissing(session: SftpSession, path: string): Promise<void> {
    try {
      await session.mkdir(path, 0o700);
    } catch (error) {
      const there = await SftpBackend.statOrUndefined(session, path).catch(() => undefined);
      if (there && isDirectory(there)) return;
      throw error;
    }
  }

  /** fsync of a folder, so a rename or removal in it survives a crash; left out where the server cannot. */
  private static async syncFolder(connection: Connection, path: string): Promise<void> {
    if (!connection.syncFolders) return;
    const { session } = connection;
    let handle: Buffer;
    try {
      handle = await session.open(path, OPEN_FLAGS.read);
    } catch {
      connection.syncFolders = false;
      return;
    }
    try {
      await session.fsync(handle);
    } catch (error) {
      if (error instanceof SftpError && error.status !== undefined) connection.syncFolders = false;
      else throw error;
    } finally {
      void session.close(handle).catch(() => undefined);
    }
  }

  /** Whether the root holds only what an interrupted `create` leaves (see LocalBackend). */
  private async onlyEmptyLayout(session: SftpSession): Promise<boolean> {
    for (const entry of await SftpBackend.readFolder(session, this.root)) {
      if (entry.name === 'lost+found' && isDirectory(entry.attrs)) continue;
      if (!isDirectory(entry.attrs) || !(KINDS as string[]).includes(entry.name)) return false;
      const inside = await SftpBackend.readFolder(session, this.under(entry.name));
      if (entry.name !== 'data') {
        if (inside.length > 0) return false;
        continue;
      }
      for (const sub of inside) {
        if (!isDirectory(sub.attrs) || !/^[0-9a-f]{2}$/.test(sub.name)) return false;
        if ((await SftpBackend.readFolder(session, this.under('data', sub.name))).length > 0) return false;
      }
    }
    return true;
  }

  // ---- the Backend contract ----

  exists(): Promise<boolean> {
    return this.call(async ({ session }) => (await SftpBackend.statOrUndefined(session, this.under('config'))) !== undefined);
  }

  create(): Promise<void> {
    return this.call(async (connection) => {
      const { session } = connection;
      const existing = await SftpBackend.statOrUndefined(session, this.root);
      if (existing !== undefined && !isDirectory(existing)) {
        throw new TargetNotEmptyError(`${this.location} exists and is not a folder: give the repository a new or empty folder`);
      }
      if (existing !== undefined && !(await this.onlyEmptyLayout(session))) {
        throw new TargetNotEmptyError(`${this.location} is not empty and holds no repository: give the repository a new or empty folder`);
      }
      if (existing === undefined) {
        // mkdir -p: every missing folder on the way, from the top.
        const parts = this.root.split('/');
        for (let i = 1; i <= parts.length; i++) {
          const prefix = parts.slice(0, i).join('/');
          if (prefix === '' || prefix === '.' || prefix === '..') continue;
          await SftpBackend.mkdirIfMissing(session, prefix);
        }
      }
      await Promise.all(KINDS.map((kind) => SftpBackend.mkdirIfMissing(session, this.under(kind))));
      await Promise.all(Array.from({ length: 256 }, (_, i) => SftpBackend.mkdirIfMissing(session, this.under('data', i.toString(16).padStart(2, '0')))));
      await SftpBackend.syncFolder(connection, this.under('data'));
      await SftpBackend.syncFolder(connection, this.root);
    });
  }

  save(kind: FileKind, name: string, data: Buffer | Buffer[]): Promise<void> {
    return this.call(async (connection) => {
      const { session } = connection;
      const folder = this.folder(kind, name);
      const target = this.path(kind, name);
      const temp = `${folder}/${TEMPORARY}${randomBytes(8).toString('hex')}`;
      const flags = OPEN_FLAGS.write | OPEN_FLAGS.create | OPEN_FLAGS.exclusive;
      const handle = await session.open(temp, flags, 0o600).catch(async (error: unknown) => {
        // Repositories made before `state/` existed get the folder on first use.
        if (!isMissing(error) || kind !== 'state') throw error;
        await SftpBackend.mkdirIfMissing(session, folder);
        return session.open(temp, flags, 0o600);
      });
      try {
        await session.writeParts(handle, Array.isArray(data) ? data : [data], { chunk: connection.writeLength, window: WINDOW });
        if (session.extensions.has('fsync@openssh.com')) await session.fsync(handle);
      } catch (error) {
        void session.close(handle).catch(() => undefined);
        await session.remove(temp).catch(() => undefined);
        throw error;
      }
      try {
        await session.close(handle);
        if (session.extensions.has('posix-rename@openssh.com')) {
          await session.posixRename(temp, target);
        } else {
          // Version 3's rename refuses an existing target. Our files are immutable (a second save
          // has the same bytes), so removing the old one first loses nothing.
          await session.remove(target).catch((error: unknown) => {
            if (!isMissing(error)) throw error;
          });
          await session.rename(temp, target);
        }
      } catch (error) {
        // (A dropped connection leaves the temporary file: prune removes it once it is old.)
        await session.remove(temp).catch(() => undefined);
        throw error;
      }
      await SftpBackend.syncFolder(connection, folder);
    });
  }

  load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    return this.call(async (connection) => {
      const { session } = connection;
      const handle = await session.open(this.path(kind, name), OPEN_FLAGS.read);
      try {
        let length = range?.length;
        if (length === undefined) {
          const size = (await session.fstat(handle)).size;
          if (size === undefined) throw new SftpError(`${this.location}: the server tells no size for ${kind}/${name}`, 'EIO', undefined);
          length = size;
        }
        if (length > constants.MAX_LENGTH) throw new SftpError(`${kind}/${name}: ${length} bytes are more than one read can hold`, 'EFBIG', undefined);
        return await session.readRange(handle, range?.offset ?? 0, length, { chunk: connection.readLength, window: WINDOW });
      } finally {
        // Not awaited: the close goes out at once, and the caller need not wait a round trip for it.
        void session.close(handle).catch(() => undefined);
      }
    });
  }

  list(kind: FileKind): Promise<FileInfo[]> {
    return this.call(async ({ session }) => {
      if (kind === 'config') {
        const attrs = await SftpBackend.statOrUndefined(session, this.under('config'));
        return attrs ? [{ name: 'config', size: attrs.size ?? 0, modifiedMs: attrs.mtime !== undefined ? attrs.mtime * 1000 : undefined }] : [];
      }
      const out: FileInfo[] = [];
      await this.eachFolder(session, kind, (_folder, entries) => {
        for (const { name, attrs } of entries) {
          if (name.startsWith('.') || attrs.size === undefined) continue;
          if (attrs.permissions !== undefined && !isRegularFile(attrs)) continue;
          out.push({ name, size: attrs.size, modifiedMs: attrs.mtime !== undefined ? attrs.mtime * 1000 : undefined });
        }
      });
      return out;
    });
  }

  stat(kind: FileKind, name: string): Promise<number | undefined> {
    return this.call(async ({ session }) => (await SftpBackend.statOrUndefined(session, this.path(kind, name)))?.size);
  }

  remove(kind: FileKind, name: string): Promise<void> {
    return this.call(async (connection) => {
      await connection.session.remove(this.path(kind, name)).catch((error: unknown) => {
        if (!isMissing(error)) throw error;
      });
      await SftpBackend.syncFolder(connection, this.folder(kind, name));
    });
  }

  listTemporary(): Promise<TemporaryFile[]> {
    return this.call(async ({ session }) => {
      const out: TemporaryFile[] = [];
      const collect = (kind: FileKind, prefix: string, entries: DirectoryEntry[]): void => {
        for (const { name, attrs } of entries) {
          if (!name.startsWith(TEMPORARY) || (attrs.permissions !== undefined && !isRegularFile(attrs))) continue;
          out.push({ kind, name: `${prefix}${name}`, size: attrs.size ?? 0, modifiedMs: attrs.mtime !== undefined ? attrs.mtime * 1000 : undefined });
        }
      };
      for (const kind of KINDS) {
        // The folder is named in the name: a temporary file of data/ab/ is `ab/.tmp-…` (as local's).
        await this.eachFolder(session, kind, (folder, entries) => collect(kind, kind === 'data' ? `${folder.slice(folder.lastIndexOf('/') + 1)}/` : '', entries));
      }
      collect('config', '', await SftpBackend.readFolder(session, this.root));
      return out;
    });
  }

  removeTemporary(file: TemporaryFile): Promise<void> {
    const base = file.name.slice(file.name.lastIndexOf('/') + 1);
    if (!base.startsWith(TEMPORARY) || base.includes('..') || base.includes('/')) return Promise.reject(new Error(`not a temporary file: ${file.name}`));
    const sub = file.name.slice(0, 2);
    if (file.kind === 'data' && !/^[0-9a-f]{2}$/.test(sub)) return Promise.reject(new Error(`not a temporary file: ${file.name}`));
    const folder = file.kind === 'config' ? this.root : file.kind === 'data' ? this.under('data', sub) : this.under(file.kind);
    return this.call(async (connection) => {
      await connection.session.remove(`${folder}/${base}`).catch((error: unknown) => {
        if (!isMissing(error)) throw error;
      });
      await SftpBackend.syncFolder(connection, folder);
    });
  }

  /** Calls `visit` with the entries of each folder that holds files of `kind` (data: its 256, some at a time). */
  private async eachFolder(session: SftpSession, kind: FileKind, visit: (folder: string, entries: DirectoryEntry[]) => void): Promise<void> {
    if (kind !== 'data') {
      const folder = this.under(kind);
      visit(folder, await SftpBackend.readFolder(session, folder));
      return;
    }
    const subs = (await SftpBackend.readFolder(session, this.under('data'))).filter((e) => /^[0-9a-f]{2}$/.test(e.name) && isDirectory(e.attrs)).map((e) => this.under('data', e.name));
    let next = 0;
    await Promise.all(
      Array.from({ length: Math.min(LIST_PARALLEL, subs.length) }, async () => {
        while (next < subs.length) {
          const folder = subs[next++]!;
          visit(folder, await SftpBackend.readFolder(session, folder));
        }
      }),
    );
  }
}
