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
 * A restore from a snapshot into a volume whose folder is on this host writes the new data into
 * `.cvat-backup-staged/` at the volume's root while CVAT still runs (`stageVolume`); with CVAT
 * stopped the old entries move into the rollback point and the staged ones into the root (all
 * renames), so the downtime no longer depends on the size of the data. A killed run leaves a
 * staged folder: it is deleted, like a retired one (it never held the volume's data).
 *
 * Where the volume's folder is on this host (`VolumeTarget.hostPath`), every step runs here
 * through folder handles that never follow a link (fs/beneath.ts): no container is started. Else
 * the steps run as scripts in a helper container made from the image of the volume's own
 * container, so they use only POSIX sh and BusyBox-compatible tools (mv, rm, mkdir, stat, chown,
 * chmod, sync). Both leave the same states.
 */
import type { DockerEngine } from '../docker/engine.js';
import type { ProgressListener } from '../events.js';
import type { Deployment } from '../deployment/discover.js';
import type { KilledRestore } from '../deployment/lock.js';
import { fsyncSync, readSync, writeSync, type BigIntStats } from 'node:fs';
import { DirHandle, closeFd } from '../fs/beneath.js';
import { syncFilesystem } from '../host.js';
import { chooseTransport } from '../archive/transport.js';
import { isReservedName } from '../archive/member-guard.js';

export const ROLLBACK_DIR = '.cvat-backup-rollback';
/** A rollback point no longer needed: renamed during the downtime, deleted once CVAT runs. */
export const RETIRED_DIR = '.cvat-backup-retired';
/** New data written while CVAT runs, moved into the volume's root during the downtime. */
export const STAGED_DIR = '.cvat-backup-staged';
/** Inside a rollback point: the volume root's `uid:gid mode` (a name no volume entry can have). */
const ROOT_META = '.cvat-backup-root';
/** Inside a rollback point: the id of the restore that committed it (all its volumes were written). */
const COMMITTED = '.cvat-backup-committed';

/** syncfs of the volume's filesystem where `sync -f` exists (coreutils, BusyBox), else a full sync. */
const SYNC = 'sync -f . 2>/dev/null || sync';

const PREPARE = `set -eu
cd "$1"
rb=${ROLLBACK_DIR}
rm -rf -- ${RETIRED_DIR} ${STAGED_DIR}
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
  rm -rf -- ${STAGED_DIR}
  src="$rb.tmp"
else
  rm -rf -- ${STAGED_DIR}
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
for d in ${ROLLBACK_DIR} ${ROLLBACK_DIR}.tmp ${RETIRED_DIR} ${STAGED_DIR}; do
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
  /** The volume's folder on this host (host transport): the steps run here, not in a helper container. */
  hostPath?: string | undefined;
}

async function run(engine: DockerEngine, target: VolumeTarget, what: string, script: string, extra: string[] = []): Promise<string> {
  const result = await engine.runHelper({ image: target.image, volumesFrom: target.containerId, script, args: [target.mountPath, ...extra] });
  if (result.exitCode !== 0) {
    throw new Error(`${what} of volume ${target.composeName} failed (exit ${result.exitCode}): ${result.stderr.trim() || result.stdout.trim()}`);
  }
  return result.stdout;
}

export async function prepareRollback(engine: DockerEngine, target: VolumeTarget): Promise<void> {
  if (target.hostPath !== undefined) return onHost(target.hostPath, prepareOnHost);
  await run(engine, target, 'preparing the rollback point', PREPARE);
}

export async function rollbackVolume(engine: DockerEngine, target: VolumeTarget): Promise<void> {
  if (target.hostPath !== undefined) return onHost(target.hostPath, (root) => rollbackOnHost(root, target.hostPath!));
  await run(engine, target, 'rolling back', ROLLBACK);
}

/**
 * The restore succeeded: the restored data is synced to disk, and the rollback point marked with
 * the restore's id and renamed out of the way (fast).
 */
export async function commitVolume(engine: DockerEngine, target: VolumeTarget, restoreId: string): Promise<void> {
  if (target.hostPath !== undefined) return onHost(target.hostPath, (root) => commitOnHost(root, target.hostPath!, restoreId));
  await run(engine, target, 'retiring the rollback point', RETIRE, [restoreId]);
}

/**
 * Deletes a retired rollback point; run while CVAT is up again (it can take long on big volumes).
 * On this host it never follows a link: a container that runs meanwhile may swap a folder in it
 * for a link, and the deletion must not leave the volume.
 */
export async function removeRetired(engine: DockerEngine, target: VolumeTarget, hostPath: string | undefined = target.hostPath): Promise<void> {
  if (hostPath === undefined) {
    await run(engine, target, 'removing the old data', REMOVE_RETIRED);
    return;
  }
  await onHost(hostPath, (root) => root.removeTree(RETIRED_DIR));
}

/** Owner, mode and modification time (seconds) the volume's root gets when the staged data moves in. */
export interface RootMeta {
  uid: number;
  gid: number;
  mode: number | undefined;
  mtime: number | undefined;
}

/**
 * A new, empty staged folder in the volume on this host (a leftover of a killed run is deleted
 * first): root's, mode 0700, so CVAT's users cannot reach it while they run. Returns its path;
 * the volume's root itself cannot be swapped by a container, and the folder is opened without
 * following a link (DirHandle.openRoot), so writing through that path stays in the volume.
 */
export async function stageVolume(hostPath: string): Promise<string> {
  await onHost(hostPath, async (root) => {
    await root.removeTree(STAGED_DIR);
    await root.mkdir(STAGED_DIR, 0o700);
  });
  return `${hostPath}/${STAGED_DIR}`;
}

/** Deletes a staged folder (a restore that failed before CVAT stopped). */
export async function removeStaged(hostPath: string): Promise<void> {
  await onHost(hostPath, (root) => root.removeTree(STAGED_DIR));
}

/**
 * With CVAT stopped and the rollback point made (`prepareRollback`): the staged entries move into
 * the volume's root, which gets the snapshot's owner, mode and time. Renames only.
 */
export async function swapInStaged(hostPath: string, meta: RootMeta | undefined): Promise<void> {
  await onHost(hostPath, async (root) => {
    const staged = await root.openDir(STAGED_DIR);
    try {
      for (const name of await staged.readdir()) {
        // Never restored from a snapshot; anything else put there is left to be deleted with it.
        if (isReservedName(name)) continue;
        await staged.rename(name, root);
      }
    } finally {
      await staged.close();
    }
    await root.removeTree(STAGED_DIR);
    if (meta) await root.setMeta(meta.uid, meta.gid, meta.mode, meta.mtime);
  });
}

async function onHost<T>(hostPath: string, step: (root: DirHandle) => Promise<T>): Promise<T> {
  const root = await DirHandle.openRoot(hostPath);
  try {
    return await step(root);
  } finally {
    await root.close();
  }
}

async function lstatOrNothing(dir: DirHandle, name: string): Promise<BigIntStats | undefined> {
  try {
    return await dir.lstat(name);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
}

const isFolder = async (dir: DirHandle, name: string): Promise<boolean> => (await lstatOrNothing(dir, name))?.isDirectory() ?? false;

/** A small file of ours, read without following a link (empty when it is not a regular file). */
async function readSmall(dir: DirHandle, name: string): Promise<string> {
  const st = await lstatOrNothing(dir, name);
  if (!st?.isFile() || st.size > 4096n) return '';
  const { fd } = await dir.openFile(name);
  try {
    const buffer = Buffer.alloc(Number(st.size));
    const n = readSync(fd, buffer, 0, buffer.length, 0);
    return buffer.subarray(0, n).toString('utf8');
  } finally {
    await closeFd(fd);
  }
}

/** Writes a small file of ours: a new file renamed over the name (never a half-written one). */
async function writeSmall(dir: DirHandle, name: string, text: string): Promise<void> {
  const tmp = `${name}.tmp`;
  await dir.removeTree(tmp);
  const fd = await dir.createFile(tmp, 0o600);
  try {
    const data = Buffer.from(text);
    let done = 0;
    while (done < data.length) done += writeSync(fd, data, done, data.length - done, done);
    fsyncSync(fd);
  } finally {
    await closeFd(fd);
  }
  await dir.rename(tmp, dir, name);
}

const sameName = (a: Buffer, b: string): boolean => a.equals(Buffer.from(b));

/** PREPARE, on this host; the staged folder stays where it is. */
async function prepareOnHost(root: DirHandle): Promise<void> {
  await root.removeTree(RETIRED_DIR);
  if (await isFolder(root, ROLLBACK_DIR)) {
    // Left by a killed restore that no run recovered: it holds the last good data.
    for (const name of await root.readdir()) {
      if (!sameName(name, ROLLBACK_DIR) && !sameName(name, STAGED_DIR)) await root.removeTree(name);
    }
    return;
  }
  const tmpName = `${ROLLBACK_DIR}.tmp`;
  if (!(await isFolder(root, tmpName))) {
    await root.removeTree(tmpName);
    await root.mkdir(tmpName, 0o700);
  }
  const tmp = await root.openDir(tmpName);
  try {
    if ((await readSmall(tmp, ROOT_META)).trim() === '') {
      const st = await root.stat();
      await writeSmall(tmp, ROOT_META, `${st.uid}:${st.gid} ${(Number(st.mode) & 0o7777).toString(8)}\n`);
    }
    for (const name of await root.readdir()) {
      if (sameName(name, tmpName) || sameName(name, STAGED_DIR)) continue;
      await root.rename(name, tmp);
    }
  } finally {
    await tmp.close();
  }
  await root.rename(tmpName, root, ROLLBACK_DIR);
}

/** ROLLBACK, on this host. */
async function rollbackOnHost(root: DirHandle, hostPath: string): Promise<void> {
  let source: string;
  if (await isFolder(root, ROLLBACK_DIR)) {
    for (const name of await root.readdir()) if (!sameName(name, ROLLBACK_DIR)) await root.removeTree(name);
    source = ROLLBACK_DIR;
  } else if (await isFolder(root, `${ROLLBACK_DIR}.tmp`)) {
    await root.removeTree(STAGED_DIR);
    source = `${ROLLBACK_DIR}.tmp`;
  } else {
    await root.removeTree(STAGED_DIR);
    return;
  }
  const from = await root.openDir(source);
  try {
    let metaName = ROOT_META;
    // A rollback point made by an earlier version keeps the root's owner and mode here.
    if ((await lstatOrNothing(from, ROOT_META)) === undefined && (await lstatOrNothing(from, '.root-owner-mode'))?.isFile()) metaName = '.root-owner-mode';
    const match = /^(\d+):(\d+) ([0-7]+)\s*$/.exec(await readSmall(from, metaName));
    if (match) await root.setMeta(Number(match[1]), Number(match[2]), parseInt(match[3]!, 8), undefined);
    await from.removeTree(metaName);
    await from.removeTree(COMMITTED);
    for (const name of await from.readdir()) await from.rename(name, root);
  } finally {
    await from.close();
  }
  await root.rmdir(source);
  await syncFilesystem(hostPath);
}

/** RETIRE, on this host. */
async function commitOnHost(root: DirHandle, hostPath: string, restoreId: string): Promise<void> {
  await syncFilesystem(hostPath);
  await root.removeTree(RETIRED_DIR);
  await root.removeTree(`${ROLLBACK_DIR}.tmp`);
  if (await isFolder(root, ROLLBACK_DIR)) {
    const rb = await root.openDir(ROLLBACK_DIR);
    try {
      await writeSmall(rb, COMMITTED, `${restoreId}\n`);
    } finally {
      await rb.close();
    }
    await root.rename(ROLLBACK_DIR, root, RETIRED_DIR);
  }
  await syncFilesystem(hostPath);
}

/** INSPECT, on this host: each of our folders and the restore id it is marked with. */
async function inspectOnHost(root: DirHandle): Promise<Map<string, string>> {
  const folders = new Map<string, string>();
  for (const name of [ROLLBACK_DIR, `${ROLLBACK_DIR}.tmp`, RETIRED_DIR, STAGED_DIR]) {
    if (!(await isFolder(root, name))) continue;
    const dir = await root.openDir(name);
    try {
      folders.set(name, (await readSmall(dir, COMMITTED)).split('\n')[0]!.trim());
    } finally {
      await dir.close();
    }
  }
  return folders;
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
    const hostPath = (await chooseTransport(engine, volume.name, 'auto')).hostPath;
    const target: VolumeTarget = { composeName: volume.composeName, containerId: volume.container.id, image: volume.container.image, mountPath: volume.mountPath, hostPath };
    let folders: Map<string, string>;
    if (hostPath !== undefined) {
      folders = await onHost(hostPath, inspectOnHost);
    } else {
      folders = new Map();
      for (const line of (await run(engine, target, 'looking for a rollback point', INSPECT)).split('\n')) {
        const [name, mark] = line.trim().split(' ');
        if (name) folders.set(name, mark ?? '');
      }
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
    // Data staged by a run killed before CVAT stopped never was the volume's: it goes.
    if (s.folders.has(STAGED_DIR) && s.target.hostPath !== undefined && !pending.includes(s)) await removeStaged(s.target.hostPath);
    if (!s.folders.has(RETIRED_DIR) && !committedNow.includes(s)) continue;
    await removeRetired(engine, s.target);
  }
}
