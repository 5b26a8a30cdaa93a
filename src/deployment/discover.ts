/**
 * Finds a CVAT deployment through the Docker Engine API alone: the compose project by its labels,
 * its containers and their states, every named volume and where it is mounted, bind mounts (listed,
 * never backed up), and the exact CVAT version — also when every container is stopped.
 * No compose file is read, so the guide's "repeat every -f file" trap does not exist here.
 */
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { ContainerInfo, ContainerState, DockerEngine } from '../docker/engine.js';
import { EngineError } from '../docker/engine.js';
import { TarProcessor } from '../archive/tar.js';
import { ProjectNotFoundError } from '../errors.js';
import {
  SERVER_SERVICE,
  VERSION_FILE_PATHS,
  backedUpByDefault,
  bindMountReason,
  isServerImage,
  ownerServiceOf,
  versionFromImageTag,
  versionFromInitPy,
  volumeDescription,
  volumeRole,
  type VolumeRole,
} from './cvat.js';

export const PROJECT_LABEL = 'com.docker.compose.project';
const SERVICE_LABEL = 'com.docker.compose.service';
const VOLUME_LABEL = 'com.docker.compose.volume';
const DEPENDS_ON_LABEL = 'com.docker.compose.depends_on';
const ONEOFF_LABEL = 'com.docker.compose.oneoff';

export interface DeploymentContainer {
  id: string;
  name: string;
  service: string;
  state: ContainerState;
  image: string;
  imageId: string;
  /** Services this one depends on, from compose's label; undefined when compose did not record it. */
  dependsOn: string[] | undefined;
}

export interface DeploymentVolume {
  /** Name in the compose file, e.g. `cvat_db`; also the archive's base name. */
  composeName: string;
  /** Name in the engine, e.g. `cvat_cvat_db`. */
  name: string;
  role: VolumeRole;
  description: string;
  /** Absolute mount path without trailing slash, e.g. `/var/lib/postgresql/data`. */
  mountPath: string | undefined;
  /** The container through which data moves (its image serves helpers); undefined if unmounted. */
  container: DeploymentContainer | undefined;
  mountedBy: string[];
  backedUpByDefault: boolean;
}

export interface BindMount {
  service: string;
  source: string;
  destination: string;
  reason: string;
}

export interface CvatVersionInfo {
  /** e.g. `2.73.0`; undefined when it cannot be known (dev/latest image and no readable file). */
  version: string | undefined;
  source: 'image-tag' | 'version-file' | 'unknown';
  serverImage: string | undefined;
  serverImageDigest: string | undefined;
}

export interface Deployment {
  project: string;
  containers: DeploymentContainer[];
  volumes: DeploymentVolume[];
  binds: BindMount[];
  version: CvatVersionInfo;
}

/** The CVAT facts every backup records (JSON-friendly: null for unknown). */
export function cvatRecord(version: CvatVersionInfo): { version: string | null; versionSource: string; serverImage: string | null; serverImageDigest: string | null } {
  return {
    version: version.version ?? null,
    versionSource: version.source,
    serverImage: version.serverImage ?? null,
    serverImageDigest: version.serverImageDigest ?? null,
  };
}

function toDeploymentContainer(c: ContainerInfo): DeploymentContainer {
  const dependsLabel = c.labels[DEPENDS_ON_LABEL];
  return {
    id: c.id,
    name: c.name,
    service: c.labels[SERVICE_LABEL] ?? c.name,
    state: c.state,
    image: c.image,
    imageId: c.imageId,
    dependsOn:
      dependsLabel === undefined
        ? undefined
        : dependsLabel
            .split(',')
            .map((part) => part.split(':')[0] ?? '')
            .filter((s) => s !== ''),
  };
}

/** Picks the project: the one asked for, else the only one running a cvat/server image, else `cvat`. */
async function chooseProject(engine: DockerEngine, requested: string | undefined): Promise<string> {
  if (requested !== undefined) return requested;
  const all = await engine.listContainers([PROJECT_LABEL]);
  const withServer = new Set(
    all
      .filter((c) => isServerImage(c.image) || c.labels[SERVICE_LABEL] === SERVER_SERVICE)
      .map((c) => c.labels[PROJECT_LABEL] ?? ''),
  );
  withServer.delete('');
  if (withServer.size === 1) return [...withServer][0]!;
  if (withServer.size > 1) {
    if (withServer.has('cvat')) return 'cvat';
    throw new ProjectNotFoundError(
      `several CVAT compose projects found (${[...withServer].sort().join(', ')}): choose one with --project`,
    );
  }
  return 'cvat';
}

export async function discoverDeployment(
  engine: DockerEngine,
  options: { project?: string | undefined; signal?: AbortSignal } = {},
): Promise<Deployment> {
  await engine.ping();
  const project = await chooseProject(engine, options.project);
  const containers = (await engine.listContainers([`${PROJECT_LABEL}=${project}`])).filter(
    (c) => c.labels[ONEOFF_LABEL] !== 'True',
  );
  const labelledVolumes = await engine.listVolumes([`${PROJECT_LABEL}=${project}`]);
  if (containers.length === 0 && labelledVolumes.length === 0) {
    throw new ProjectNotFoundError(
      `no compose project '${project}' on the Docker engine at ${engine.endpoint} (no containers, no volumes): check --project`,
    );
  }
  const deploymentContainers = containers.map(toDeploymentContainer).sort((a, b) => a.service.localeCompare(b.service));
  const byId = new Map(deploymentContainers.map((c) => [c.id, c]));

  // Volumes: the project's labelled ones plus external volumes its containers mount.
  const volumeNames = new Map<string, string>();
  for (const v of labelledVolumes) volumeNames.set(v.name, v.labels[VOLUME_LABEL] ?? stripProject(v.name, project));
  for (const c of containers) {
    for (const m of c.mounts) {
      if (m.type === 'volume' && m.name !== undefined && !volumeNames.has(m.name)) {
        volumeNames.set(m.name, stripProject(m.name, project));
      }
    }
  }

  const volumes: DeploymentVolume[] = [];
  for (const [name, composeName] of volumeNames) {
    const mounting = containers.filter((c) => c.mounts.some((m) => m.type === 'volume' && m.name === name));
    const owner = ownerServiceOf(composeName);
    const chosen = mounting.find((c) => c.labels[SERVICE_LABEL] === owner) ?? mounting[0];
    const mount = chosen?.mounts.find((m) => m.type === 'volume' && m.name === name);
    const role = volumeRole(composeName);
    volumes.push({
      composeName,
      name,
      role,
      description: volumeDescription(composeName),
      mountPath: mount ? normaliseMountPath(mount.destination) : undefined,
      container: chosen ? byId.get(chosen.id) : undefined,
      mountedBy: mounting.map((c) => c.labels[SERVICE_LABEL] ?? c.name).sort(),
      backedUpByDefault: backedUpByDefault(role),
    });
  }
  volumes.sort((a, b) => a.composeName.localeCompare(b.composeName));

  const binds: BindMount[] = [];
  for (const c of containers) {
    for (const m of c.mounts) {
      if (m.type !== 'bind') continue;
      binds.push({
        service: c.labels[SERVICE_LABEL] ?? c.name,
        source: m.source,
        destination: m.destination,
        reason: bindMountReason(m.destination),
      });
    }
  }
  binds.sort((a, b) => `${a.service}${a.destination}`.localeCompare(`${b.service}${b.destination}`));

  const version = await detectVersion(engine, deploymentContainers, options.signal);
  return { project, containers: deploymentContainers, volumes, binds, version };
}

function stripProject(name: string, project: string): string {
  return name.startsWith(`${project}_`) ? name.slice(project.length + 1) : name;
}

export function normaliseMountPath(path: string): string {
  const trimmed = path.replace(/\/+$/, '');
  return trimmed === '' ? '/' : trimmed;
}

async function detectVersion(
  engine: DockerEngine,
  containers: DeploymentContainer[],
  signal: AbortSignal | undefined,
): Promise<CvatVersionInfo> {
  const server =
    containers.find((c) => c.service === SERVER_SERVICE) ?? containers.find((c) => isServerImage(c.image));
  if (!server) return { version: undefined, source: 'unknown', serverImage: undefined, serverImageDigest: undefined };
  const serverImageDigest = await engine.imageDigest(server.imageId);
  const fromTag = versionFromImageTag(server.image);
  if (fromTag !== undefined) {
    return { version: fromTag, source: 'image-tag', serverImage: server.image, serverImageDigest };
  }
  for (const path of VERSION_FILE_PATHS) {
    const text = await readSmallFile(engine, server.id, path, signal);
    const version = text === undefined ? undefined : versionFromInitPy(text);
    if (version !== undefined) return { version, source: 'version-file', serverImage: server.image, serverImageDigest };
  }
  return { version: undefined, source: 'unknown', serverImage: server.image, serverImageDigest };
}

/** Reads a small text file from a (possibly stopped) container; undefined if it does not exist. */
export async function readSmallFile(
  engine: DockerEngine,
  containerId: string,
  path: string,
  signal: AbortSignal | undefined,
): Promise<string | undefined> {
  let stream;
  try {
    stream = await engine.readArchive(containerId, path, signal);
  } catch (error) {
    if (error instanceof EngineError && error.statusCode === 404) return undefined;
    throw error;
  }
  const parts: Buffer[] = [];
  let size = 0;
  const reader = new TarProcessor({
    onData: (_entry, chunk) => {
      if (size < 1 << 16) parts.push(chunk);
      size += chunk.length;
    },
  });
  const sink = new Writable({ write: (_c, _e, cb) => cb() });
  await pipeline(stream, reader, sink, signal ? { signal } : {});
  return Buffer.concat(parts).toString('utf8');
}
