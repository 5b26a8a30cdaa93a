/**
 * A rollback point inside a volume: before a restore writes a volume, everything in it is moved
 * (rename, no copy) into `.cvat-backup-rollback/` at the volume's root, with the root folder's
 * owner and mode saved beside it. The archive is then extracted into the emptied volume. On
 * success the restored data is synced to disk, the rollback folder is marked with the restore's id
 * and renamed `.cvat-backup-retired/`, and deleted once CVAT runs again (deleting terabytes is no
 * reason to keep CVAT down); on failure the new files are deleted and the old ones moved back.
 * Nothing is deleted before the new data is complete and on disk.
 *
 * The rollback point is made in `.cvat-backup-rollback.tmp/` and renamed when every old entry is in
 * it, so a restore killed at any point leaves a state the next run can undo:
 * - `.cvat-backup-rollback.tmp/` only: killed while moving the old data aside; nothing new was
 *   written, the moved entries go back;
 * - `.cvat-backup-rollback/`: killed while writing (or before committing): the volume's other
 *   entries are the half-restored data; they are deleted and the old data moved back;
 * - a rollback or retired folder marked with the killed restore's id: it had finished writing
 *   every volume and was committing; the others are committed too (all volumes new, none mixed).
 * `recoverKilledRestore` does this for every next run that takes the project lock, before the
 * containers the killed run had stopped are started again: CVAT never starts on half-restored data.
 *
 * The scripts run in a helper container made from the image of the volume's own container, so
 * they use only POSIX sh and BusyBox-compatible tools (mv, rm, mkdir, stat, chown, chmod, sync).
 */
import type { DockerEngine } from '../docker/engine.js';
import type { ProgressListener } from '../events.js';
import type { Deployment } from '../deployment/discover.js';
import type { KilledRestore } from '../deployment/lock.js';
import { DirHandle } from '../fs/beneath.js';
import { chooseTransport } from '../archive/transport.js';

export const ROLLBACK_DIR = '.cvat-backup-rollback';
/** A rollback point no longer needed: renamed during the downtime, deleted once CVAT runs. */
export const RETIRED_DIR = '.cvat-backup-retired';
/** Inside a rollback point: the volume root's `uid:gid mode` (a name no volume entry can have). */
const ROOT_META = '.cvat-backup-root';
/** Inside a rollback point: the id of the restore that committed it (all its volumes were written). */
const COMMITTED = '.cvat-backup-committed';

/** syncfs of the volume's filesystem where `sync -f` exists (coreutils, BusyBox), else a full sync. */
const SYNC = 'sync -f . 2>/dev/null || sync';

const PREPARE = `set -eu
cd "$1"
rb=${ROLLBACK_DIR}
rm -rf -- ${RETIRED_DIR}
if [ -d "$rb" ]; then
  # Left by a killed restore that no run recovered: it holds the last good data.
  for f in .[!.]* ..?* *; do
    [ "$f" = "$rb" ] && continue
    if [ -e "$f" ] || [ -L "$f" ]; then rm -rf -- "$f"; fi
  done
  exit 0
fi
if [ ! -d "$rb.tmp" ]; then mkdir -m 700 "$rb.tmp"; fi
if [ ! -s "$rb.tmp/${ROOT_META}" ]; then stat -c '%u:%g %a' . > "$rb.tmp/${ROOT_META}"; fi
for f in .[!.]* ..?* *; do
  [ "$f" = "$rb.tmp" ] && continue
  if [ -e "$f" ] || [ -L "$f" ]; then mv -- "$f" "$rb.tmp/"; fi
done
mv "$rb.tmp" "$rb"
`;

const ROLLBACK = `set -eu
cd "$1"
rb=${ROLLBACK_DIR}
if [ -d "$rb" ]; then
  for f in .[!.]* ..?* *; do
    [ "$f" = "$rb" ] && continue
    if [ -e "$f" ] || [ -L "$f" ]; then rm -rf -- "$f"; fi
  done
  src="$rb"
elif [ -d "$rb.tmp" ]; then
  src="$rb.tmp"
else
  exit 0
fi
meta="$src/${ROOT_META}"
# A rollback point made by an earlier version keeps the root's owner and mode here.
if [ ! -f "$meta" ] && [ -f "$src/.root-owner-mode" ]; then meta="$src/.root-owner-mode"; fi
if [ -s "$meta" ]; then
  read -r owner mode < "$meta"
  chown "$owner" . && chmod "$mode" .
fi
rm -f -- "$meta" "$src/${COMMITTED}"
for f in "$src"/.[!.]* "$src"/..?* "$src"/*; do
  if [ -e "$f" ] || [ -L "$f" ]; then mv -- "$f" .; fi
done
rmdir "$src"
${SYNC}
`;

// The restored data reaches the disk before the old data is given up; the mark says which restore
// committed it (see recoverKilledRestore). A rename: the old data leaves the downtime at once.
const RETIRE = `set -eu
cd "$1"
${SYNC}
rm -rf -- ${RETIRED_DIR} ${ROLLBACK_DIR}.tmp
if [ -d ${ROLLBACK_DIR} ]; then
  printf '%s\\n' "$2" > ${ROLLBACK_DIR}/${COMMITTED}
  mv ${ROLLBACK_DIR} ${RETIRED_DIR}
fi
${SYNC}
`;

const REMOVE_RETIRED = `set -eu
rm -rf -- "$1/${RETIRED_DIR}"
`;

/** One line per cvat-backup folder in the volume: its name and the restore id it is marked with. */
const INSPECT = `set -eu
cd "$1"
for d in ${ROLLBACK_DIR} ${ROLLBACK_DIR}.tmp ${RETIRED_DIR}; do
  if [ -d "$d" ]; then
    mark=""
    if [ -f "$d/${COMMITTED}" ]; then mark=$(head -n 1 "$d/${COMMITTED}"); fi
    printf '%s %s\\n' "$d" "$mark"
  fi
done
`;

export interface VolumeTarget {
  composeName: string;
  containerId: string;
  image: string;
  mountPath: string;
}

async function run(engine: DockerEngine, target: VolumeTarget, what: string, script: string, extra: string[] = []): Promise<string> {
  const result = await engine.runHelper({ image: target.image, volumesFrom: target.containerId, script, args: [target.mountPath, ...extra] });
  if (result.exitCode !== 0) {
    throw new Error(`${what} of volume ${target.composeName} failed (exit ${result.exitCode}): ${result.stderr.trim() || result.stdout.trim()}`);
  }
  return result.stdout;
}

export async function prepareRollback(engine: DockerEngine, target: VolumeTarget): Promise<void> {
  await run(engine, target, 'preparing the rollback point', PREPARE);
}

export async function rollbackVolume(engine: DockerEngine, target: VolumeTarget): Promise<void> {
  await run(engine, target, 'rolling back', ROLLBACK);
}

/**
 * The restore succeeded: the restored data is synced to disk, and the rollback point marked with
 * the restore's id and renamed out of the way (fast).
 */
export async function commitVolume(engine: DockerEngine, target: VolumeTarget, restoreId: string): Promise<void> {
  await run(engine, target, 'retiring the rollback point', RETIRE, [restoreId]);
}

/**
 * Deletes a retired rollback point; run while CVAT is up again (it can take long on big volumes).
 * On this host it never follows a link: a container that runs meanwhile may swap a folder in it
 * for a link, and the deletion must not leave the volume.
 */
export async function removeRetired(engine: DockerEngine, target: VolumeTarget, hostPath?: string): Promise<void> {
  if (hostPath === undefined) {
    await run(engine, target, 'removing the old data', REMOVE_RETIRED);
    return;
  }
  const root = await DirHandle.openRoot(hostPath);
  try {
    await root.removeTree(RETIRED_DIR);
  } finally {
    await root.close();
  }
}

/** How long the recovery waits for a killed run's helper containers to finish their script. */
const HELPER_WAIT_MS = 10 * 60 * 1000;

/**
 * A helper container keeps running its script when the cvat-backup that started it is killed:
 * wait until none of them works on these volumes any more (a rollback must not race a move), and
 * remove the ones the killed run left behind (they hold references to the volumes).
 */
async function settleHelpers(engine: DockerEngine, volumeNames: Set<string>): Promise<void> {
  for (let waited = 0; ; waited += 500) {
    const helpers = (await engine.listContainers(['io.cvat-backup.helper=true'])).filter((c) => c.mounts.some((m) => m.name !== undefined && volumeNames.has(m.name)));
    const busy = helpers.filter((c) => c.state === 'running' || c.state === 'restarting');
    if (busy.length === 0) {
      for (const c of helpers) await engine.removeContainer(c.id);
      return;
    }
    if (waited >= HELPER_WAIT_MS) {
      throw new Error(`helper container ${busy[0]!.name} of a killed cvat-backup still runs after ${HELPER_WAIT_MS / 60000} minutes: remove it (docker rm -f ${busy[0]!.name}) and run again`);
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

interface VolumeState {
  target: VolumeTarget;
  volumeName: string;
  folders: Map<string, string>;
}

/**
 * The recovery after a restore was killed (SIGKILL, power cut): called while the next run holds
 * the project lock, before the containers the killed run had stopped are started again. Volumes
 * with a rollback point get their previous data back, unless the killed restore had already
 * committed (marked) one of them: then it had written every volume, and the others are committed
 * too. Retired rollback points are deleted. Says what it did in one warning.
 */
export async function recoverKilledRestore(engine: DockerEngine, deployment: Deployment, killed: KilledRestore, onProgress: ProgressListener): Promise<void> {
  await settleHelpers(engine, new Set(deployment.volumes.map((v) => v.name)));
  const states: VolumeState[] = [];
  for (const volume of deployment.volumes) {
    if (!volume.container || volume.mountPath === undefined) continue;
    const target: VolumeTarget = { composeName: volume.composeName, containerId: volume.container.id, image: volume.container.image, mountPath: volume.mountPath };
    const output = await run(engine, target, 'looking for a rollback point', INSPECT);
    const folders = new Map<string, string>();
    for (const line of output.split('\n')) {
      const [name, mark] = line.trim().split(' ');
      if (name) folders.set(name, mark ?? '');
    }
    if (folders.size > 0) states.push({ target, volumeName: volume.name, folders });
  }
  if (states.length === 0) return;
  const committed = states.some((s) => s.folders.get(ROLLBACK_DIR) === killed.id || s.folders.get(RETIRED_DIR) === killed.id);
  const pending = states.filter((s) => s.folders.has(ROLLBACK_DIR) || s.folders.has(`${ROLLBACK_DIR}.tmp`));
  const who = `a restore killed earlier (pid ${killed.pid}, started ${killed.started})`;
  let committedNow: VolumeState[] = [];
  if (pending.length > 0) {
    if (committed && pending.every((s) => s.folders.has(ROLLBACK_DIR))) {
      onProgress({ type: 'phase', message: 'completing a restore that was killed while committing' });
      for (const s of pending) await commitVolume(engine, s.target, killed.id);
      committedNow = pending;
      onProgress({
        type: 'warning',
        message: `${who} had written every volume and was committing: kept the restored data of ${pending.map((s) => s.target.composeName).join(', ')} and deleted the old`,
      });
    } else {
      onProgress({ type: 'phase', message: 'putting back the data of a restore that was killed' });
      for (const s of pending) await rollbackVolume(engine, s.target);
      onProgress({
        type: 'warning',
        message: `${who} left volumes half restored: the previous data of ${pending.map((s) => s.target.composeName).join(', ')} was put back`,
      });
    }
  }
  for (const s of states) {
    if (!s.folders.has(RETIRED_DIR) && !committedNow.includes(s)) continue;
    const hostPath = (await chooseTransport(engine, s.volumeName, 'auto')).hostPath;
    await removeRetired(engine, s.target, hostPath);
  }
}
