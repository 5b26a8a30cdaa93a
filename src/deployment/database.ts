/**
 * CVAT's PostgreSQL as a logical dump (`--db dump`): `pg_dump --format=custom` from the running
 * database — consistent through MVCC, nothing stopped — and back with `pg_restore` into a fresh
 * database that then replaces the old one by rename (the old one is dropped only once CVAT runs
 * again on the new one).
 *
 * Where the tools run:
 * - bundled (the project's cvat_db container): inside that container (`docker exec`), over its
 *   socket, as the image's superuser — the same PostgreSQL version as the server, always.
 * - external (docker-compose.external_db.yml: no cvat_db container): the host's PostgreSQL client
 *   tools, with the backend's CVAT_POSTGRES_* settings. The password comes from the backend's
 *   secret file (or environment) and goes to the tools in their environment, never in argv.
 */
import { spawn } from 'node:child_process';
import { access, readdir } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import type { DockerEngine } from '../docker/engine.js';
import { DatabaseError } from '../errors.js';
import { DATABASE_SERVICE, SERVER_SERVICE, databaseSettings, type DatabaseSettings } from './cvat.js';
import { readSmallFile, type Deployment, type DeploymentContainer } from './discover.js';

export type PgTool = 'pg_dump' | 'pg_restore' | 'psql' | 'pg_isready';

export interface PgProcess {
  stdout: Readable;
  exit: Promise<{ exitCode: number; stderr: string }>;
}

export interface DatabaseHandle {
  settings: DatabaseSettings;
  /** For messages: where the database is (never holds the password). */
  where: string;
  /** The bundled container, which must run for the tools to work. */
  container: DeploymentContainer | undefined;
  /** Runs a PostgreSQL client tool against the server (connection settings added here). */
  run(tool: PgTool, args: string[], options?: { stdin?: Readable; signal?: AbortSignal; database?: string }): Promise<PgProcess>;
}

/** How CVAT reaches its database (no password): undefined when the project has neither a cvat_db nor a server container. */
export async function describeDatabase(engine: DockerEngine, deployment: Deployment): Promise<DatabaseSettings | undefined> {
  const server = deployment.containers.find((c) => c.service === SERVER_SERVICE);
  const bundled = deployment.containers.find((c) => c.service === DATABASE_SERVICE);
  if (!server && !bundled) return undefined;
  return databaseSettings(server ? await engine.containerEnv(server.id) : {}, bundled ? await engine.containerEnv(bundled.id) : undefined);
}

/** Finds CVAT's database: the bundled container, else the backend's external settings. */
export async function openDatabase(engine: DockerEngine, deployment: Deployment, signal?: AbortSignal): Promise<DatabaseHandle> {
  const server = deployment.containers.find((c) => c.service === SERVER_SERVICE);
  const bundled = deployment.containers.find((c) => c.service === DATABASE_SERVICE);
  const serverEnv = server ? await engine.containerEnv(server.id) : {};
  const settings = databaseSettings(serverEnv, bundled ? await engine.containerEnv(bundled.id) : undefined);
  if (bundled) {
    return {
      settings,
      where: `the ${DATABASE_SERVICE} container`,
      container: bundled,
      run: async (tool, args, options = {}) => {
        // Debian's layout keeps the tools outside PATH; the official image has them on it.
        const script = 'for d in /usr/lib/postgresql/*/bin; do PATH="$PATH:$d"; done; exec "$0" "$@"';
        const connection = ['-h', settings.host, '-U', settings.user];
        const dbArgs = tool === 'pg_isready' ? [] : ['-d', options.database ?? settings.dbname];
        return engine.exec(bundled.id, {
          cmd: ['/bin/sh', '-c', script, tool, ...connection, ...dbArgs, ...args],
          user: 'postgres',
          ...(options.stdin ? { stdin: options.stdin } : {}),
          ...(options.signal ? { signal: options.signal } : {}),
        });
      },
    };
  }
  if (!server) throw new DatabaseError(`project '${deployment.project}' has neither a ${DATABASE_SERVICE} nor a ${SERVER_SERVICE} container: cannot find its database`);
  let password: string | undefined;
  if (settings.passwordFile !== undefined) {
    password = (await readSmallFile(engine, server.id, settings.passwordFile, signal))?.replace(/\r?\n$/, '');
    if (password === undefined) throw new DatabaseError(`the database password file ${settings.passwordFile} is missing from ${server.name}`);
  } else if (settings.passwordInEnv) {
    password = serverEnv['CVAT_POSTGRES_PASSWORD'];
  }
  return {
    settings,
    where: `PostgreSQL at ${settings.host}:${settings.port}`,
    container: undefined,
    run: async (tool, args, options = {}) => {
      const binary = await hostTool(tool);
      const child = spawn(binary, tool === 'pg_isready' ? args : ['-d', options.database ?? settings.dbname, ...args], {
        env: {
          ...process.env,
          PGHOST: settings.host,
          PGPORT: String(settings.port),
          PGUSER: settings.user,
          PGCONNECT_TIMEOUT: '10',
          ...(password !== undefined ? { PGPASSWORD: password } : {}),
        },
        stdio: ['pipe', 'pipe', 'pipe'],
        ...(options.signal ? { signal: options.signal } : {}),
      });
      child.stdin.on('error', () => undefined); // the tool may exit early; its exit code says why
      if (options.stdin) {
        options.stdin.on('error', (error) => child.stdin.destroy(error));
        options.stdin.pipe(child.stdin);
      } else {
        child.stdin.end();
      }
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString('utf8')).slice(-4096)));
      const exit = new Promise<{ exitCode: number; stderr: string }>((resolve, reject) => {
        child.on('error', reject);
        child.on('close', (code) => resolve({ exitCode: code ?? -1, stderr }));
      });
      exit.catch(() => undefined);
      return { stdout: child.stdout, exit };
    },
  };
}

/** The host's PostgreSQL client tool: on PATH, else the newest of /usr/lib/postgresql/N/bin. */
async function hostTool(tool: PgTool): Promise<string> {
  for (const dir of (process.env['PATH'] ?? '').split(':').filter((d) => d !== '')) {
    if (await access(`${dir}/${tool}`).then(() => true, () => false)) return `${dir}/${tool}`;
  }
  const versions = (await readdir('/usr/lib/postgresql').catch(() => [] as string[])).filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a));
  for (const v of versions) {
    const path = `/usr/lib/postgresql/${v}/bin/${tool}`;
    if (await access(path).then(() => true, () => false)) return path;
  }
  throw new DatabaseError(
    `${tool} is not installed on this host, and CVAT's database is external: install the PostgreSQL client (e.g. apt-get install postgresql-client) of the server's major version or newer`,
  );
}

/** The error for a tool that exited non-zero: its last lines of stderr say why. */
export function toolFailure(db: DatabaseHandle, tool: PgTool, exitCode: number, stderr: string): DatabaseError {
  return new DatabaseError(`${tool} on ${db.where} failed (exit ${exitCode}): ${stderr.trim().split('\n').slice(-3).join(' ')}`);
}

/** Runs a tool to completion, collecting a small stdout; a non-zero exit is a DatabaseError. */
export async function runToEnd(db: DatabaseHandle, tool: PgTool, args: string[], options: { stdin?: Readable; signal?: AbortSignal; database?: string } = {}): Promise<string> {
  const process_ = await db.run(tool, args, options);
  const parts: Buffer[] = [];
  for await (const chunk of process_.stdout) if (parts.length < 1024) parts.push(chunk as Buffer);
  const { exitCode, stderr } = await process_.exit;
  if (exitCode !== 0) throw toolFailure(db, tool, exitCode, stderr);
  return Buffer.concat(parts).toString('utf8');
}

/** Waits until the server accepts connections (a just-started bundled container replays its WAL first). */
export async function waitUntilReady(db: DatabaseHandle, signal?: AbortSignal, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  for (;;) {
    signal?.throwIfAborted();
    try {
      await runToEnd(db, 'pg_isready', [], signal ? { signal } : {});
      return;
    } catch (error) {
      last = (error as Error).message;
    }
    if (Date.now() > deadline) throw new DatabaseError(`the database did not become ready: ${last}`);
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

/** A dump of the database: custom format, uncompressed (so the repository's chunks deduplicate and zstd compresses). */
export async function dumpDatabase(db: DatabaseHandle, signal?: AbortSignal): Promise<PgProcess> {
  return db.run('pg_dump', ['--format=custom', '--compress=0', '--no-password'], signal ? { signal } : {});
}

function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

/**
 * Loads a dump into a new database and swaps it in: the old database is renamed (kept), returned
 * as `retired` for `dropRetiredDatabase` once CVAT runs on the new one. On failure the new
 * database is dropped and the old one is untouched. Nothing may be connected to the old one
 * (CVAT is stopped).
 */
export async function loadDatabase(db: DatabaseHandle, dump: Readable, signal?: AbortSignal): Promise<{ retired: string | undefined }> {
  const name = db.settings.dbname;
  const stamp = new Date().toISOString().replace(/[-:.TZ]/g, '').slice(0, 14);
  const fresh = `${name}_restoring_${stamp}`;
  const retired = `${name}_before_restore_${stamp}`;
  const admin = { database: 'postgres', ...(signal ? { signal } : {}) };
  const sql = (statement: string): Promise<string> => runToEnd(db, 'psql', ['-X', '-q', '-At', '-v', 'ON_ERROR_STOP=1', '-c', statement], admin);
  await sql(`CREATE DATABASE ${quoteIdent(fresh)}`);
  try {
    const restore = await db.run('pg_restore', ['--no-owner', '--no-privileges', '--exit-on-error', '--single-transaction', '-d', fresh], {
      stdin: dump,
      ...(signal ? { signal } : {}),
    });
    restore.stdout.resume();
    const { exitCode, stderr } = await restore.exit;
    if (exitCode !== 0) throw toolFailure(db, 'pg_restore', exitCode, stderr);
    const exists = (await sql(`SELECT 1 FROM pg_database WHERE datname = '${name.replace(/'/g, "''")}'`)).trim() === '1';
    // One transaction: both renames or neither.
    await sql(`${exists ? `ALTER DATABASE ${quoteIdent(name)} RENAME TO ${quoteIdent(retired)}; ` : ''}ALTER DATABASE ${quoteIdent(fresh)} RENAME TO ${quoteIdent(name)}`);
    return { retired: exists ? retired : undefined };
  } catch (error) {
    await sql(`DROP DATABASE IF EXISTS ${quoteIdent(fresh)}`).catch(() => undefined);
    throw error;
  }
}

export async function dropRetiredDatabase(db: DatabaseHandle, retired: string): Promise<void> {
  await runToEnd(db, 'psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-c', `DROP DATABASE IF EXISTS ${quoteIdent(retired)}`], { database: 'postgres' });
}
