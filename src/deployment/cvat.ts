/**
 * Everything the tool knows about CVAT itself lives here: which services exist, which volume holds
 * what, the order services start in, where the version is written. Other modules ask this one.
 * Facts from cvat-ai/cvat up to v2.73.0 (docker-compose.yml and its -f variants).
 */

export type VolumeRole = 'database' | 'media' | 'keys' | 'logs' | 'events' | 'inmem' | 'cache' | 'certificates' | 'other';

interface KnownVolume {
  role: VolumeRole;
  /** The service whose container moves this volume's data (it has the right image for helpers). */
  ownerService: string;
  description: string;
}

const KNOWN_VOLUMES: Record<string, KnownVolume> = {
  cvat_db: { role: 'database', ownerService: 'cvat_db', description: 'PostgreSQL data' },
  cvat_data: { role: 'media', ownerService: 'cvat_server', description: 'uploaded and prepared media' },
  cvat_keys: { role: 'keys', ownerService: 'cvat_server', description: 'Django secret key' },
  cvat_logs: { role: 'logs', ownerService: 'cvat_server', description: 'backend logs' },
  cvat_events_db: { role: 'events', ownerService: 'cvat_clickhouse', description: 'ClickHouse events' },
  cvat_inmem_db: { role: 'inmem', ownerService: 'cvat_redis_inmem', description: 'Redis queues and state' },
  cvat_cache_db: { role: 'cache', ownerService: 'cvat_redis_ondisk', description: 'regenerable chunk cache' },
  cvat_letsencrypt: { role: 'certificates', ownerService: 'traefik', description: "Let's Encrypt certificates" },
};

export function volumeRole(composeName: string): VolumeRole {
  return KNOWN_VOLUMES[composeName]?.role ?? 'other';
}

export function volumeDescription(composeName: string): string {
  return KNOWN_VOLUMES[composeName]?.description ?? 'named volume';
}

export function ownerServiceOf(composeName: string): string | undefined {
  return KNOWN_VOLUMES[composeName]?.ownerService;
}

/** Whether a volume is archived unless the user says otherwise. The cache is regenerable. */
export function backedUpByDefault(role: VolumeRole): boolean {
  return role !== 'cache';
}

/**
 * Whether a change journal (fanotify or inotify: see fs/change-journal.ts) is trusted to see every
 * write to a volume of this role. Both report write(2) and its kin, but not stores through a
 * shared memory map (MAP_SHARED), which reach the file with no system call. With CVAT's defaults
 * none of its services writes its files that way (checked upstream: fs/fanotify-journal.ts), but
 * PostgreSQL does with dynamic_shared_memory_type=mmap, and a deployment may run other images of
 * the database, events (ClickHouse) and Redis/kvrocks services: their volumes are walked in full
 * by the final pass, as cheap insurance (few files, each compared by size, times and inode).
 */
export function journalSafe(role: VolumeRole): boolean {
  return role !== 'database' && role !== 'events' && role !== 'inmem' && role !== 'cache';
}

/**
 * Whether a staged restore may keep (hard-link) the files a volume of this role holds unchanged
 * (repository/reuse-files.ts). The check that nothing wrote to a kept file before CVAT stopped is
 * its ctime, which stores through a shared memory map need not move, and the database, events and
 * Redis/kvrocks services rewrite their files in place all the time (a kept file they touch, also
 * at shutdown, is written again during the downtime): their volumes are written in full, as
 * before. The media volume, where the bytes are, is kept.
 */
export function keptOnRestore(role: VolumeRole): boolean {
  return journalSafe(role);
}

/** The service that identifies a CVAT deployment and tells its version. */
export const SERVER_SERVICE = 'cvat_server';

export function isServerImage(image: string): boolean {
  return /(^|\/)cvat\/server([:@]|$)/.test(image);
}

/**
 * Start order tiers when compose did not record `com.docker.compose.depends_on` (compose v1, or
 * containers created by other tools): data services first, then the backend, then the edge.
 * Stop order is the reverse.
 */
export function startTier(service: string): number {
  if (['cvat_db', 'cvat_redis_inmem', 'cvat_redis_ondisk', 'cvat_redis', 'cvat_clickhouse', 'cvat_opa'].includes(service)) return 0;
  if (service === 'cvat_server' || service.startsWith('cvat_worker')) return 1;
  return 2;
}

/** Versions from an image reference like `cvat/server:v2.73.0`; undefined for dev/latest/digests. */
export function versionFromImageTag(image: string): string | undefined {
  const match = /:v?(\d+\.\d+\.\d+)$/.exec(image);
  return match?.[1];
}

/** Where `cvat/__init__.py` lives in the server image: /opt/cvat since v2.72, /home/django before. */
export const VERSION_FILE_PATHS = ['/opt/cvat/cvat/__init__.py', '/home/django/cvat/__init__.py'] as const;

/** Parses `VERSION = (2, 73, 0, "final", 0)`; pre-releases keep their label (2.74.0-alpha). */
export function versionFromInitPy(text: string): string | undefined {
  const match = /^VERSION\s*=\s*\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*["'](\w+)["']/m.exec(text);
  if (!match) return undefined;
  const base = `${match[1]}.${match[2]}.${match[3]}`;
  return match[4] === 'final' ? base : `${base}-${match[4]}`;
}

/** Why a bind mount is not backed up, in words a CVAT administrator recognises. */
export function bindMountReason(destination: string): string {
  if (destination === '/home/django/share') return "CVAT's read-only share of source files on the host: not CVAT's data";
  if (destination.endsWith('docker.sock')) return 'the Docker socket';
  return 'a host folder, not a Docker volume: back it up with the host';
}

/** What to run when the project's containers are gone (`docker compose down`). */
export function recreateContainersHint(version: string | undefined): string {
  const env = version ? `CVAT_VERSION=v${version} ` : '';
  return `in the CVAT folder run '${env}docker compose up --no-start' (with the same -f files) to create the containers, then restore again`;
}

/** The bundled PostgreSQL service (absent, `replicas: 0`, with docker-compose.external_db.yml). */
export const DATABASE_SERVICE = 'cvat_db';

/**
 * How CVAT reaches its database, from the backend's `CVAT_POSTGRES_*` settings (defaults as in
 * CVAT's settings: host cvat_db, port 5432, database cvat, user root) and, for the bundled
 * service, the postgres image's own `POSTGRES_USER` / `POSTGRES_DB`.
 */
export interface DatabaseSettings {
  /** bundled: the project's cvat_db container; external: a server the backend reaches over the network. */
  kind: 'bundled' | 'external';
  host: string;
  port: number;
  dbname: string;
  user: string;
  /** Path inside the backend's container of the password file (external_db.yml's secret). */
  passwordFile: string | undefined;
  /** Whether CVAT_POSTGRES_PASSWORD is set in the backend's environment (its value is never copied here). */
  passwordInEnv: boolean;
}

export function databaseSettings(serverEnv: Record<string, string>, bundledEnv: Record<string, string> | undefined): DatabaseSettings {
  if (bundledEnv !== undefined) {
    // Inside the bundled container, over its socket, as the image's superuser.
    return {
      kind: 'bundled',
      host: '/var/run/postgresql',
      port: 5432,
      dbname: serverEnv['CVAT_POSTGRES_DBNAME'] || bundledEnv['POSTGRES_DB'] || 'cvat',
      user: bundledEnv['POSTGRES_USER'] || 'postgres',
      passwordFile: undefined,
      passwordInEnv: false,
    };
  }
  return {
    kind: 'external',
    host: serverEnv['CVAT_POSTGRES_HOST'] || 'cvat_db',
    port: Number(serverEnv['CVAT_POSTGRES_PORT'] || 5432),
    dbname: serverEnv['CVAT_POSTGRES_DBNAME'] || 'cvat',
    user: serverEnv['CVAT_POSTGRES_USER'] || 'root',
    passwordFile: serverEnv['CVAT_POSTGRES_PASSWORD_FILE'] || undefined,
    passwordInEnv: serverEnv['CVAT_POSTGRES_PASSWORD'] !== undefined,
  };
}
