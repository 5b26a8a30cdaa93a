/**
 * The thin layer over the Docker Engine API that everything else uses. It knows nothing of CVAT.
 *
 * Volume data moves through the engine's own archive endpoints (GET/PUT /containers/{id}/archive),
 * which work on stopped containers, need no image to be pulled and work the same against a local
 * socket, Docker Desktop or a remote engine (DOCKER_HOST). Commands that must run next to a volume
 * (emptying it for a restore) run in a short-lived helper container made from the image the
 * volume's own container already has, with that container's mounts (`VolumesFrom`).
 */
import { PassThrough, Writable, type Duplex, type Readable } from 'node:stream';
import Module, { createRequire } from 'node:module';
import type Docker from 'dockerode';
import { DockerUnavailableError } from '../errors.js';

export type ContainerState = 'created' | 'running' | 'paused' | 'restarting' | 'removing' | 'exited' | 'dead';

export interface ContainerMount {
  type: string;
  /** Volume name for `type === 'volume'`. */
  name?: string;
  source: string;
  destination: string;
  readOnly: boolean;
}

export interface ContainerInfo {
  id: string;
  name: string;
  image: string;
  imageId: string;
  state: ContainerState;
  labels: Record<string, string>;
  mounts: ContainerMount[];
}

export interface VolumeInfo {
  name: string;
  driver: string;
  mountpoint: string;
  labels: Record<string, string>;
}

export interface HelperResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

export interface HelperSpec {
  image: string;
  /** Container whose mounts the helper gets, at the same paths. */
  volumesFrom: string;
  /** POSIX sh script (BusyBox compatible); `"$@"` are `args`. */
  script: string;
  args: string[];
  signal?: AbortSignal;
}

export interface ExecSpec {
  cmd: string[];
  /** User inside the container (name or uid), default the container's. */
  user?: string;
  /** Streamed to the process's stdin, which is closed at its end. */
  stdin?: Readable;
  signal?: AbortSignal;
}

export interface ExecProcess {
  stdout: Readable;
  /** Resolves when the process has ended (stdout fully delivered), with the end of its stderr. */
  exit: Promise<{ exitCode: number; stderr: string }>;
}

/**
 * What the tool needs from a Docker engine. Every method may be called any number of times;
 * all errors are either DockerUnavailableError (cannot talk to the engine) or the engine's own.
 */
export interface DockerEngine {
  /** Describes the engine endpoint for messages (never contains secrets). */
  readonly endpoint: string;
  /** True when the engine runs on this host (a unix socket), so volume folders may be reachable. */
  readonly local: boolean;
  /** Fails with DockerUnavailableError when the engine cannot be reached or used. */
  ping(): Promise<void>;
  /** All containers (any state) matching every `key=value` label filter. */
  listContainers(labels: string[]): Promise<ContainerInfo[]>;
  /** All volumes matching every `key=value` label filter. */
  listVolumes(labels: string[]): Promise<VolumeInfo[]>;
  /** undefined when no such volume exists. */
  inspectVolume(name: string): Promise<VolumeInfo | undefined>;
  /** Bytes used by each volume, as the engine counts them (walks the volumes: call while CVAT runs). */
  volumeSizes(): Promise<Map<string, number>>;
  /** First repo digest of an image, else its id. */
  imageDigest(imageId: string): Promise<string>;
  /** Idempotent: stopping a stopped container succeeds. */
  stopContainer(id: string): Promise<void>;
  /** Idempotent: starting a running container succeeds. */
  startContainer(id: string): Promise<void>;
  /** Freezes every process of a running container (cgroup freezer). */
  pauseContainer(id: string): Promise<void>;
  /** Idempotent: unpausing a container that is not paused (or not running) succeeds; true if it was paused. */
  unpauseContainer(id: string): Promise<boolean>;
  /** Tar stream of `path` inside the (possibly stopped) container; members start with basename(path). */
  readArchive(containerId: string, path: string, signal?: AbortSignal): Promise<Readable>;
  /** Extracts a tar stream under directory `path` of the (possibly stopped) container, keeping owners. */
  writeArchive(containerId: string, path: string, tar: Readable, signal?: AbortSignal): Promise<void>;
  /** Runs a helper container to completion and removes it. */
  runHelper(spec: HelperSpec): Promise<HelperResult>;
  /** Environment of a container as `NAME → value` (its configuration; may hold secrets: never log it). */
  containerEnv(id: string): Promise<Record<string, string>>;
  /**
   * Runs a process in a running container (`docker exec`) with streamed stdout; stdout must be
   * consumed. Abort kills nothing inside the container but stops reading and fails `exit`.
   */
  exec(containerId: string, spec: ExecSpec): Promise<ExecProcess>;
  /**
   * Creates a never-started container named `name` as an engine-wide mutex.
   * Returns false when a container of that name already exists.
   */
  createMarker(name: string, image: string, labels: Record<string, string>): Promise<boolean>;
  /** Labels of the marker container, undefined if absent. */
  inspectMarker(name: string): Promise<Record<string, string> | undefined>;
  /** Idempotent removal by name or id. */
  removeContainer(nameOrId: string): Promise<void>;
}

interface DockerodeError {
  statusCode?: number;
  code?: string;
  json?: { message?: string };
  message?: string;
}

function describeEndpoint(): string {
  return process.env['DOCKER_HOST'] ?? 'unix:///var/run/docker.sock';
}

function mapConnectionError(error: unknown, endpoint: string): unknown {
  const e = error as DockerodeError;
  if (e.code === 'EACCES' || e.code === 'EPERM') {
    return new DockerUnavailableError(
      `permission denied on the Docker engine at ${endpoint}: add your user to the 'docker' group (then log in again) or run as root`,
      { cause: error },
    );
  }
  if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED' || e.code === 'EHOSTUNREACH' || e.code === 'ETIMEDOUT' || e.code === 'ECONNRESET') {
    return new DockerUnavailableError(
      `cannot reach the Docker engine at ${endpoint}: is Docker running (and DOCKER_HOST right)?`,
      { cause: error },
    );
  }
  return error;
}

function engineMessage(error: unknown): string {
  const e = error as DockerodeError;
  return e.json?.message ?? e.message ?? String(error);
}

export class EngineError extends Error {
  constructor(
    message: string,
    readonly statusCode: number | undefined,
    options: { cause: unknown },
  ) {
    super(message, options);
    this.name = 'EngineError';
  }
}

export function createDockerEngine(options: Docker.DockerOptions = {}): DockerEngine {
  const Dockerode = loadDockerode();
  return new DockerodeEngine(new Dockerode(options), describeEndpoint());
}

let dockerode: typeof Docker | undefined;

/**
 * dockerode, loaded when an engine is first needed (commands on a repository alone never load
 * it) and without what only some of its calls use: it requires at once gRPC and protobuf (for
 * BuildKit sessions: image builds, which this tool never asks for) and ssh2 (for
 * DOCKER_HOST=ssh://), 12 MiB resident in all. Both modules export one function: each is put in
 * require's cache as a stand-in that loads the real module on its first call. If dockerode's
 * layout is not the one expected, it loads as it is.
 */
function loadDockerode(): typeof Docker {
  if (dockerode) return dockerode;
  const require = createRequire(import.meta.url);
  try {
    const main = require.resolve('dockerode');
    const beside = createRequire(main);
    for (const path of [beside.resolve('./session'), beside.resolve('docker-modem/lib/ssh.js')]) loadOnFirstCall(require, path);
  } catch {
    // Loaded whole below.
  }
  dockerode = require('dockerode') as typeof Docker;
  return dockerode;
}

/** Puts in require's cache, for the module at `path` (one that exports a function), a stand-in that loads it on the first call. */
function loadOnFirstCall(require: NodeJS.Require, path: string): void {
  if (require.cache[path]) return;
  let real: ((...args: unknown[]) => unknown) | undefined;
  const standIn = new Module(path);
  standIn.filename = path;
  standIn.loaded = true;
  standIn.exports = function (this: unknown, ...args: unknown[]): unknown {
    if (!real) {
      if (require.cache[path] === standIn) delete require.cache[path];
      real = require(path) as (...args: unknown[]) => unknown;
    }
    return real.apply(this, args);
  };
  require.cache[path] = standIn;
}

class DockerodeEngine implements DockerEngine {
  readonly local: boolean;

  constructor(
    private readonly docker: Docker,
    readonly endpoint: string,
  ) {
    this.local = endpoint.startsWith('unix://') || endpoint.startsWith('/');
  }

  private async call<T>(what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (error) {
      const mapped = mapConnectionError(error, this.endpoint);
      if (mapped !== error) throw mapped;
      if ((error as { name?: string }).name === 'AbortError') throw error;
      const e = error as DockerodeError;
      throw new EngineError(`${what}: ${engineMessage(error)}`, e.statusCode, { cause: error });
    }
  }

  async ping(): Promise<void> {
    await this.call('ping', () => this.docker.ping());
  }

  async listContainers(labels: string[]): Promise<ContainerInfo[]> {
    const list = await this.call('list containers', () =>
      this.docker.listContainers({ all: true, filters: { label: labels } }),
    );
    return list.map((c) => ({
      id: c.Id,
      name: (c.Names[0] ?? c.Id).replace(/^\//, ''),
      image: c.Image,
      imageId: c.ImageID,
      state: c.State as ContainerState,
      labels: c.Labels,
      mounts: c.Mounts.map((m) => {
        const mount: ContainerMount = {
          type: m.Type,
          source: m.Source,
          destination: m.Destination,
          readOnly: !m.RW,
        };
        if (m.Name !== undefined && m.Name !== '') mount.name = m.Name;
        return mount;
      }),
    }));
  }

  async listVolumes(labels: string[]): Promise<VolumeInfo[]> {
    const result = await this.call('list volumes', () => this.docker.listVolumes({ filters: { label: labels } }));
    return (result.Volumes ?? []).map(toVolumeInfo);
  }

  async inspectVolume(name: string): Promise<VolumeInfo | undefined> {
    try {
      return toVolumeInfo(await this.call('inspect volume', () => this.docker.getVolume(name).inspect()));
    } catch (error) {
      if (error instanceof EngineError && error.statusCode === 404) return undefined;
      throw error;
    }
  }

  async volumeSizes(): Promise<Map<string, number>> {
    const df = (await this.call('disk usage', () => this.docker.df())) as {
      Volumes?: { Name: string; UsageData?: { Size?: number } | null }[] | null;
    };
    const sizes = new Map<string, number>();
    for (const v of df.Volumes ?? []) {
      const size = v.UsageData?.Size;
      if (typeof size === 'number' && size >= 0) sizes.set(v.Name, size);
    }
    return sizes;
  }

  async imageDigest(imageId: string): Promise<string> {
    try {
      const image = await this.call('inspect image', () => this.docker.getImage(imageId).inspect());
      return image.RepoDigests?.[0] ?? image.Id;
    } catch (error) {
      if (error instanceof EngineError && error.statusCode === 404) return imageId;
      throw error;
    }
  }

  async stopContainer(id: string): Promise<void> {
    try {
      await this.call(`stop container ${id.slice(0, 12)}`, () => this.docker.getContainer(id).stop());
    } catch (error) {
      if (error instanceof EngineError && error.statusCode === 304) return;
      throw error;
    }
  }

  async startContainer(id: string): Promise<void> {
    try {
      await this.call(`start container ${id.slice(0, 12)}`, () => this.docker.getContainer(id).start());
    } catch (error) {
      if (error instanceof EngineError && error.statusCode === 304) return;
      throw error;
    }
  }

  async pauseContainer(id: string): Promise<void> {
    await this.call(`pause container ${id.slice(0, 12)}`, () => this.docker.getContainer(id).pause());
  }

  async unpauseContainer(id: string): Promise<boolean> {
    // Engines answer "not paused" with 409 or (Docker 20.10) 500: both mean nothing to do.
    try {
      await this.call(`unpause container ${id.slice(0, 12)}`, () => this.docker.getContainer(id).unpause());
      return true;
    } catch (error) {
      if (error instanceof EngineError && (error.statusCode === 409 || /is not paused|is not running/.test(error.message))) return false;
      throw error;
    }
  }

  async readArchive(containerId: string, path: string, signal?: AbortSignal): Promise<Readable> {
    const stream = await this.call(`read ${path}`, () =>
      this.docker.getContainer(containerId).getArchive({ path, ...(signal ? { abortSignal: signal } : {}) }),
    );
    return stream as Readable;
  }

  async writeArchive(containerId: string, path: string, tar: Readable, signal?: AbortSignal): Promise<void> {
    // dockerode's request consumes `tar`; errors of the source stream must fail the request too.
    const body = new PassThrough({ highWaterMark: 1 << 20 });
    let sourceError: Error | undefined;
    tar.on('error', (error: Error) => {
      sourceError = error;
      body.destroy(error);
    });
    tar.pipe(body);
    try {
      const response = await this.call(`write ${path}`, () =>
        this.docker.getContainer(containerId).putArchive(body, {
          path,
          noOverwriteDirNonDir: true,
          ...(signal ? { abortSignal: signal } : {}),
        }),
      );
      // The engine answers once it has read and extracted the whole body.
      (response as unknown as Readable | undefined)?.resume?.();
    } catch (error) {
      throw sourceError ?? error;
    }
    if (sourceError !== undefined) throw sourceError;
  }

  async runHelper(spec: HelperSpec): Promise<HelperResult> {
    const container = await this.call('create helper container', () =>
      this.docker.createContainer({
        Image: spec.image,
        Entrypoint: ['/bin/sh', '-c', spec.script, 'cvat-backup-helper', ...spec.args],
        Cmd: [],
        User: '0:0',
        WorkingDir: '/',
        Labels: { 'io.cvat-backup.helper': 'true' },
        NetworkDisabled: true,
        HostConfig: { VolumesFrom: [spec.volumesFrom], NetworkMode: 'none', AutoRemove: false },
      }),
    );
    try {
      await this.call('start helper container', () => container.start());
      const abort = (): void => {
        container.kill().catch(() => undefined);
      };
      spec.signal?.addEventListener('abort', abort, { once: true });
      let status: { StatusCode: number };
      try {
        status = (await this.call('wait for helper container', () => container.wait())) as { StatusCode: number };
      } finally {
        spec.signal?.removeEventListener('abort', abort);
      }
      const logs = await this.call('read helper logs', () =>
        container.logs({ stdout: true, stderr: true, follow: false }),
      );
      const { stdout, stderr } = demuxLogs(logs);
      return { exitCode: status.StatusCode, stdout, stderr };
    } finally {
      await container.remove({ force: true }).catch(() => undefined);
    }
  }

  async containerEnv(id: string): Promise<Record<string, string>> {
    const info = await this.call(`inspect container ${id.slice(0, 12)}`, () => this.docker.getContainer(id).inspect());
    const env: Record<string, string> = {};
    for (const entry of info.Config.Env ?? []) {
      const at = entry.indexOf('=');
      if (at > 0) env[entry.slice(0, at)] = entry.slice(at + 1);
    }
    return env;
  }

  async exec(containerId: string, spec: ExecSpec): Promise<ExecProcess> {
    const withStdin = spec.stdin !== undefined;
    const exec = await this.call(`exec in container ${containerId.slice(0, 12)}`, () =>
      this.docker.getContainer(containerId).exec({
        Cmd: spec.cmd,
        AttachStdout: true,
        AttachStderr: true,
        AttachStdin: withStdin,
        ...(spec.user !== undefined ? { User: spec.user } : {}),
      }),
    );
    const stream: Duplex = await this.call('start exec', () => exec.start({ hijack: true, stdin: withStdin }));
    const stdout = new PassThrough({ highWaterMark: 1 << 20 });
    let stderr = '';
    const stderrSink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        stderr = (stderr + chunk.toString('utf8')).slice(-4096);
        callback();
      },
    });
    this.docker.modem.demuxStream(stream, stdout, stderrSink);
    const abort = (): void => {
      stream.destroy(new Error('aborted'));
    };
    spec.signal?.addEventListener('abort', abort, { once: true });
    if (spec.stdin) {
      spec.stdin.on('error', (error) => stream.destroy(error));
      spec.stdin.pipe(stream);
    }
    const exit = new Promise<{ exitCode: number; stderr: string }>((resolve, reject) => {
      let settled = false;
      stream.on('error', (error) => {
        if (settled) return;
        settled = true;
        stdout.destroy(error);
        reject(spec.signal?.aborted && spec.signal.reason instanceof Error ? spec.signal.reason : error);
      });
      stream.on('end', () => {
        stdout.end();
        if (settled) return;
        settled = true;
        this.call('inspect exec', () => exec.inspect()).then(
          (info) => resolve({ exitCode: info.ExitCode ?? -1, stderr }),
          reject,
        );
      });
    }).finally(() => spec.signal?.removeEventListener('abort', abort));
    exit.catch(() => undefined); // the caller awaits it; never an unhandled rejection meanwhile
    return { stdout, exit };
  }

  async createMarker(name: string, image: string, labels: Record<string, string>): Promise<boolean> {
    try {
      await this.call('create lock container', () =>
        this.docker.createContainer({
          name,
          Image: image,
          Entrypoint: ['/bin/sh'],
          Cmd: ['-c', 'exit 0'],
          Labels: labels,
          NetworkDisabled: true,
          HostConfig: { NetworkMode: 'none' },
        }),
      );
      return true;
    } catch (error) {
      if (error instanceof EngineError && error.statusCode === 409) return false;
      throw error;
    }
  }

  async inspectMarker(name: string): Promise<Record<string, string> | undefined> {
    try {
      const info = await this.call('inspect lock container', () => this.docker.getContainer(name).inspect());
      return info.Config.Labels;
    } catch (error) {
      if (error instanceof EngineError && error.statusCode === 404) return undefined;
      throw error;
    }
  }

  async removeContainer(nameOrId: string): Promise<void> {
    try {
      await this.call('remove container', () => this.docker.getContainer(nameOrId).remove({ force: true }));
    } catch (error) {
      if (error instanceof EngineError && error.statusCode === 404) return;
      throw error;
    }
  }
}

function toVolumeInfo(v: Docker.VolumeInspectInfo): VolumeInfo {
  return { name: v.Name, driver: v.Driver, mountpoint: v.Mountpoint, labels: v.Labels ?? {} };
}

/** Splits the engine's multiplexed log stream (8-byte frame headers) into stdout and stderr. */
export function demuxLogs(buffer: Buffer): { stdout: string; stderr: string } {
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  let offset = 0;
  while (offset + 8 <= buffer.length) {
    const kind = buffer[offset];
    const size = buffer.readUInt32BE(offset + 4);
    const payload = buffer.subarray(offset + 8, offset + 8 + size);
    (kind === 2 ? err : out).push(payload);
    offset += 8 + size;
  }
  return { stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') };
}
