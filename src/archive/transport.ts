/**
 * How a volume's bytes move. 'engine': through the Docker engine's archive API — works for any
 * user of the engine, remote engines and Docker Desktop. 'host': straight from the volume's folder
 * on this host — faster, and keeps sparse files sparse; needs a local engine, the `local` volume
 * driver and root. 'auto' takes 'host' when it is possible.
 */
import { constants } from 'node:fs';
import { access } from 'node:fs/promises';
import type { DockerEngine } from '../docker/engine.js';
import { UsageError } from '../errors.js';

export type Transport = 'engine' | 'host';
export type TransportChoice = Transport | 'auto';

export interface ChosenTransport {
  transport: Transport;
  /** The volume's folder on this host, for 'host'. */
  hostPath: string | undefined;
}

export async function chooseTransport(engine: DockerEngine, volumeName: string, choice: TransportChoice): Promise<ChosenTransport> {
  if (choice === 'engine') return { transport: 'engine', hostPath: undefined };
  const why = await hostUnavailable(engine, volumeName);
  if (why === undefined) {
    const info = await engine.inspectVolume(volumeName);
    return { transport: 'host', hostPath: info!.mountpoint };
  }
  if (choice === 'host') throw new UsageError(`--via host is not possible for volume ${volumeName}: ${why}; use --via engine`);
  return { transport: 'engine', hostPath: undefined };
}

async function hostUnavailable(engine: DockerEngine, volumeName: string): Promise<string | undefined> {
  if (!engine.local) return `the Docker engine at ${engine.endpoint} is not on this host`;
  if (process.getuid?.() !== 0) return 'reading volume folders directly needs root';
  const info = await engine.inspectVolume(volumeName);
  if (!info) return 'the volume does not exist';
  if (info.driver !== 'local') return `the volume uses the '${info.driver}' driver`;
  try {
    await access(info.mountpoint, constants.R_OK | constants.W_OK | constants.X_OK);
  } catch {
    return `its folder ${info.mountpoint} is not reachable from here (Docker Desktop, rootless or a container?)`;
  }
  return undefined;
}
