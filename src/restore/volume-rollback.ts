/**
 * A rollback point inside a volume: before a restore writes a volume, everything in it is moved
 * (rename, no copy) into `.cvat-backup-rollback/` at the volume's root, with the root folder's
 * owner and mode saved beside it. The archive is then extracted into the emptied volume. On
 * success the rollback folder is renamed `.cvat-backup-retired/` and deleted once CVAT runs
 * again (deleting terabytes is no reason to keep CVAT down); on failure the new files are deleted
 * and the old ones moved back. Nothing is deleted before the new data is complete.
 *
 * A rollback folder left by a restore that was killed holds the last good data: `prepare` keeps
 * it and only clears what the killed restore had extracted.
 *
 * The scripts run in a helper container made from the image of the volume's own container, so
 * they use only POSIX sh and BusyBox-compatible tools (mv, rm, mkdir, stat, chown, chmod).
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { DockerEngine } from '../docker/engine.js';

export const ROLLBACK_DIR = '.cvat-backup-rollback';
/** A rollback point no longer needed: renamed during the downtime, deleted once CVAT runs. */
export const RETIRED_DIR = '.cvat-backup-retired';

const PREPARE = `set -eu
cd "$1"
rm -rf -- ${RETIRED_DIR}
rb=${ROLLBACK_DIR}
if [ -d "$rb" ]; then
  for f in .[!.]* ..?* *; do
    [ "$f" = "$rb" ] && continue
    if [ -e "$f" ] || [ -L "$f" ]; then rm -rf -- "$f"; fi
  done
  exit 0
fi
mkdir -m 700 "$rb.tmp"
stat -c '%u:%g %a' . > "$rb.tmp/.root-owner-mode"
mv "$rb.tmp" "$rb"
for f in .[!.]* ..?* *; do
  [ "$f" = "$rb" ] && continue
  if [ -e "$f" ] || [ -L "$f" ]; then mv -- "$f" "$rb/"; fi
done
`;

const ROLLBACK = `set -eu
cd "$1"
rb=${ROLLBACK_DIR}
[ -d "$rb" ] || exit 0
for f in .[!.]* ..?* *; do
  [ "$f" = "$rb" ] && continue
  if [ -e "$f" ] || [ -L "$f" ]; then rm -rf -- "$f"; fi
done
if [ -f "$rb/.root-owner-mode" ]; then
  read -r owner mode < "$rb/.root-owner-mode"
  chown "$owner" . && chmod "$mode" .
  rm -f "$rb/.root-owner-mode"
fi
for f in "$rb"/.[!.]* "$rb"/..?* "$rb"/*; do
  if [ -e "$f" ] || [ -L "$f" ]; then mv -- "$f" .; fi
done
rmdir "$rb"
`;

// A rename: the old data stays until CVAT runs again, and leaves the downtime at once.
const RETIRE = `set -eu
cd "$1"
rm -rf -- ${RETIRED_DIR} ${ROLLBACK_DIR}.tmp
if [ -d ${ROLLBACK_DIR} ]; then mv ${ROLLBACK_DIR} ${RETIRED_DIR}; fi
`;

const REMOVE_RETIRED = `set -eu
rm -rf -- "$1/${RETIRED_DIR}"
`;

export interface VolumeTarget {
  composeName: string;
  containerId: string;
  image: string;
  mountPath: string;
}

async function run(engine: DockerEngine, target: VolumeTarget, what: string, script: string): Promise<void> {
  const result = await engine.runHelper({ image: target.image, volumesFrom: target.containerId, script, args: [target.mountPath] });
  if (result.exitCode !== 0) {
    throw new Error(`${what} of volume ${target.composeName} failed (exit ${result.exitCode}): ${result.stderr.trim() || result.stdout.trim()}`);
  }
}

export function prepareRollback(engine: DockerEngine, target: VolumeTarget): Promise<void> {
  return run(engine, target, 'preparing the rollback point', PREPARE);
}

export function rollbackVolume(engine: DockerEngine, target: VolumeTarget): Promise<void> {
  return run(engine, target, 'rolling back', ROLLBACK);
}

/** The restore succeeded: the rollback point is renamed out of the way (fast). */
export function commitVolume(engine: DockerEngine, target: VolumeTarget): Promise<void> {
  return run(engine, target, 'retiring the rollback point', RETIRE);
}

/** Deletes a retired rollback point; run while CVAT is up again (it can take long on big volumes). */
export async function removeRetired(engine: DockerEngine, target: VolumeTarget, hostPath?: string): Promise<void> {
  if (hostPath !== undefined) await rm(join(hostPath, RETIRED_DIR), { recursive: true, force: true });
  else await run(engine, target, 'removing the old data', REMOVE_RETIRED);
}
