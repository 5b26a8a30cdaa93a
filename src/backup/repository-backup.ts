/**
 * `backup` into the snapshot repository (the default destination).
 *
 * Order: discover → lock project → open repository (shared lock) → parent snapshot (latest of
 * this project) → [two-phase: copy every volume while CVAT runs] → stop CVAT (or freeze it) →
 * archive every selected volume, reading only files that changed since the last pass → start
 * CVAT (always) → write the last pack and the index → write the snapshot. A crash before the
 * snapshot leaves no visible snapshot; the next backup reuses whatever packs were already indexed
 * and `prune` removes unreferenced ones.
 *
 * With a remote repository, the stop never waits on the network: from phase 2 on the repository
 * holds its writes on this machine (`Repository.deferUploads`; trees come from its cache) and
 * uploads them once CVAT runs again, packs before index, before the snapshot. An offline backup
 * writes directly: its whole copy is the downtime, and spooling it could fill the local disk.
 *
 * Modes:
 * - offline: CVAT is stopped for the whole copy (the guide's way, made fast by the parent).
 * - two-phase (default when CVAT runs and the volume folders are reachable): phase 1 copies while
 *   CVAT runs; phase 2 stops CVAT and re-reads only what changed since phase 1 (size, mtime,
 *   ctime, inode, and any file touched from phase 1's start on: the "racy" rule for changes
 *   within one timestamp tick). The snapshot is what an offline backup at the stop would hold.
 * - freeze: as two-phase, but phase 2 freezes the containers (`docker pause`) instead of
 *   stopping them: no restart, a crash-consistent copy (see docs/architecture.md).
 *
 * The change journal (two-phase, freeze): started on the volume folders before phase 1's first
 * pass, collected once CVAT is stopped or frozen, so it holds every change since the last phase-1
 * pass began (and earlier ones: more than needed is only re-read). The final pass then visits only
 * what changed (Archiver, fs/change-journal.ts). A volume is walked in full instead when there is
 * no journal, when the journal cannot vouch for it (queue overflow, ...), when CVAT's service may
 * write it through shared memory maps (deployment/cvat.ts: journalSafe), or when hard links are
 * involved (the archiver decides); one progress event says which volume went which way and why.
 */
import { hostname } from 'node:os';
import type { DockerEngine } from '../docker/engine.js';
import type { ProgressListener } from '../events.js';
import { DatabaseError, VolumeMissingError } from '../errors.js';
import { DATABASE_SERVICE, SERVER_SERVICE, journalSafe } from '../deployment/cvat.js';
import type { ChangeJournal, JournalResult } from '../fs/change-journal.js';
import { startFanotifyJournal } from '../fs/fanotify-journal.js';
import { dumpDatabase, openDatabase, toolFailure } from '../deployment/database.js';
import { storeStream } from '../repository/stream-content.js';
import { cvatRecord, discoverDeployment, type Deployment } from '../deployment/discover.js';
import { withDeploymentFrozen, withDeploymentStopped, type DowntimeWindow } from '../deployment/lifecycle.js';
import { lockDeployment } from '../deployment/lock.js';
import { recoverKilledRestore } from '../restore/volume-rollback.js';
import { chooseTransport, type TransportChoice } from '../archive/transport.js';
import { memberPrefixOf } from '../archive/manifest.js';
import { TarProcessor } from '../archive/tar.js';
import { TarTreeBuilder } from '../repository/tar-import.js';
import { posix } from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { Repository, UploadDeferral } from '../repository/repository.js';
import { Archiver, type ArchiveStats, type ChangesSinceParent, type PassFacts } from '../repository/archiver.js';
import { backupPoolSize } from '../repository/chunk-pool.js';
import { readSnapshots, shortId } from '../repository/snapshots.js';
import type { Snapshot, SnapshotDatabase, SnapshotVolume, TreeNode } from '../repository/tree.js';
import { TOOL_VERSION } from '../version.js';
import { selectVolumes } from './archive-backup.js';

export type BackupMode = 'two-phase' | 'offline' | 'freeze';

/**
 * Starts recording what changes in these folders (volume mount points on this host) from now on;
 * returns once it records. Called at most once per backup. Not ok when no journal can be had here
 * (the reason says why, in a few words: every volume is then walked in full).
 */
export type StartChangeJournal = (folders: readonly string[]) => Promise<{ ok: true; journal: ChangeJournal } | { ok: false; reason: string }>;

/** Which volumes the final pass took from the change journal, and why the others were walked in full. */
export interface JournalUse {
  used: string[];
  walked: { volume: string; reason: string }[];
}

export interface RepositoryBackupOptions {
  project?: string | undefined;
  includeCache?: boolean;
  via?: TransportChoice;
  /** Default two-phase. */
  mode?: BackupMode;
  /**
   * files: the database volume is copied like the others; dump: a pg_dump of the running
   * database is stored instead (nothing stopped for it). An external database is always dumped.
   */
  db?: 'files' | 'dump';
  /** Two-phase/freeze: repeat the copy while CVAT runs while a pass takes longer than this (ms); at most 3 passes. */
  repeatPrecopyAfterMs?: number | undefined;
  /**
   * Runs while CVAT is still stopped or frozen, after the last pass: what it sees is the state the
   * snapshot holds (the tests take an offline copy here to compare).
   */
  whileHeld?: () => Promise<void>;
  /**
   * Two-phase/freeze: the change journal that lets the final pass visit only what changed.
   * Default: fanotify (fs/fanotify-journal.ts), when the native helper and the kernel have it.
   */
  startJournal?: StartChangeJournal;
  signal?: AbortSignal;
  onProgress?: ProgressListener;
  now?: () => number;
}

export interface BackupPass {
  /** dump: the database's pg_dump (CVAT running); precopy: phase 1; final: the pass that counts. */
  name: 'dump' | 'precopy' | 'final';
  /** CVAT running (precopy), stopped or frozen (final). */
  cvat: 'running' | 'stopped' | 'frozen';
  durationMs: number;
  filesRead: number;
  bytesRead: number;
  /** The final pass of a two-phase or freeze backup: what it took from the change journal. */
  journal?: JournalUse;
}

export interface RepositoryBackupResult {
  snapshot: Snapshot & { id: string };
  stats: Record<string, ArchiveStats>;
  bytesAdded: number;
  /** The mode that ran (two-phase falls back to offline when it cannot apply). */
  mode: BackupMode;
  passes: BackupPass[];
}

/**
 * A file touched this close before a pass began counts as racy in the next pass: covers the
 * coarsest timestamp granularity of common file systems (ext4/xfs: one jiffy; FAT: 2 s).
 */
const RACY_SLACK_NS = 2_000_000_000n;

function nowNs(): bigint {
  return BigInt(Date.now()) * 1_000_000n;
}

export async function backupToRepository(engine: DockerEngine, repo: Repository, options: RepositoryBackupOptions): Promise<RepositoryBackupResult> {
  const now = options.now ?? Date.now;
  const onProgress = options.onProgress ?? (() => undefined);
  const signalOption = options.signal ? { signal: options.signal } : {};
  const startedAt = now();
  const discover = (project: string | undefined): Promise<Deployment> =>
    discoverDeployment(engine, { project, ...(options.signal ? { signal: options.signal } : {}) });
  let deployment = await discover(options.project);
  const selection = selectVolumes(deployment, options.includeCache ?? false);
  const skipped = selection.skipped;
  let selected = selection.selected;
  const bundledDb = deployment.containers.some((c) => c.service === DATABASE_SERVICE);
  const externalDb = !bundledDb && !deployment.volumes.some((v) => v.role === 'database') && deployment.containers.some((c) => c.service === SERVER_SERVICE);
  const dumpDb = options.db === 'dump' || externalDb;
  if (dumpDb && bundledDb) {
    // The dump replaces the database's files.
    for (const v of selected.filter((v) => v.role === 'database')) skipped.push({ composeName: v.composeName, reason: 'stored as a pg_dump (--db dump)' });
    selected = selected.filter((v) => v.role !== 'database');
  }
  if (selected.length === 0 && !dumpDb) throw new VolumeMissingError(`project '${deployment.project}' has no mounted named volume to back up`);
  const folders = new Map<string, string | undefined>();
  for (const v of selected) folders.set(v.composeName, (await chooseTransport(engine, v.name, options.via ?? 'auto')).hostPath);
  const locked = await lockDeployment(engine, deployment, 'backup', onProgress, () => discover(deployment.project), recoverKilledRestore);
  const projectLock = locked.lock;
  deployment = locked.deployment;
  try {
    let mode: BackupMode = options.mode ?? 'two-phase';
    const running = deployment.containers.some((c) => c.state === 'running');
    if (mode !== 'offline' && !running) mode = 'offline'; // nothing runs: one pass is already consistent
    if (mode !== 'offline' && [...folders.values()].some((f) => f === undefined)) {
      onProgress({
        type: 'warning',
        message: `a ${mode} backup needs the volume folders on this host (root, local engine), to see what changed: backing up with CVAT stopped instead`,
      });
      mode = 'offline';
    }
    // Shared: backups and imports only add, and may run beside each other and beside readers.
    const repoLock = await repo.lock('backup', signalOption);
    try {
      // Snapshots before the index: a snapshot another writer finishes meanwhile has its index
      // files written first, so the parent's blobs are always in the index loaded after it.
      const listing = await readSnapshots(repo);
      await repo.loadIndex();
      // A damaged snapshot cannot be a parent; it costs only a full read of what it held.
      for (const d of listing.damaged) onProgress({ type: 'warning', message: `snapshot ${shortId(d.id)} cannot be read (${d.error}): not used as a parent; run 'cvat-backup check'` });
      const parent = listing.snapshots.filter((s) => s.project === deployment.project).pop();
      const passes: BackupPass[] = [];
      /** Per volume, what its last phase-1 pass saw that the journal does not tell (see Archiver). */
      const lastPassFacts = new Map<string, PassFacts>();
      let stats: Record<string, ArchiveStats> = {};
      const addedPerPass: number[] = [];
      /** One pass over every selected volume; `parents` gives each volume's tree to compare with. */
      const pass = async (
        name: BackupPass['name'],
        cvat: BackupPass['cvat'],
        parents: (volume: (typeof selected)[number]) => string | undefined,
        archiveOptions: { tolerateChanges?: boolean; racySinceNs?: bigint },
        journal?: { changesFor: (volume: (typeof selected)[number]) => ChangesSinceParent | string; use: JournalUse },
      ): Promise<SnapshotVolume[]> => {
        const began = now();
        const out: SnapshotVolume[] = [];
        const passStats: Record<string, ArchiveStats> = {};
        const action = name === 'precopy' ? 'copying while CVAT runs' : mode === 'offline' ? 'archiving' : 'copying what changed';
        for (const volume of selected) {
          options.signal?.throwIfAborted();
          onProgress({ type: 'volume-start', volume: volume.composeName, action, totalBytes: undefined });
          const folder = folders.get(volume.composeName);
          const progress = (s: { bytes: number; files: number }): void => onProgress({ type: 'volume-progress', volume: volume.composeName, ...s });
          let result: { tree: string; root: TreeNode; stats: ArchiveStats };
          if (folder !== undefined) {
            const archiver = new Archiver(repo, { ...signalOption, ...archiveOptions, pool, onProgress: (s) => progress({ bytes: s.bytesRead, files: s.files }), onWarning: (message) => onProgress({ type: 'warning', message: `${volume.composeName}: ${message}` }) });
            const changes = journal?.changesFor(volume);
            const archived = await archiver.archive(folder, parents(volume), typeof changes === 'string' ? undefined : changes);
            if (typeof changes === 'string') journal?.use.walked.push({ volume: volume.composeName, reason: changes });
            else if (archived.journal?.used) journal?.use.used.push(volume.composeName);
            else if (archived.journal) journal?.use.walked.push({ volume: volume.composeName, reason: archived.journal.reason });
            const facts = archiver.passFacts;
            if (name === 'precopy' && facts) lastPassFacts.set(volume.composeName, facts);
            result = { tree: archived.tree, root: archived.root, stats: archiver.stats };
            result.stats.entries++;
          } else {
            // Through the engine: no ctime/inode, so every file is read; chunks still deduplicate.
            const prefix = memberPrefixOf(volume.mountPath);
            const parentDir = posix.dirname(prefix);
            const builder = new TarTreeBuilder(repo, prefix, (s) => progress(s));
            await pipeline(
              await engine.readArchive(volume.container.id, volume.mountPath, options.signal),
              new TarProcessor({ output: 'entries', ...(parentDir === '.' ? {} : { renamePrefix: Buffer.from(`${parentDir}/`) }) }),
              builder,
              signalOption,
            );
            const built = await builder.finishTrees();
            const s = builder.stats;
            result = { ...built, stats: { entries: s.entries, files: s.files, bytes: s.bytes, bytesRead: s.bytes, filesUnchanged: 0, bytesAdded: s.bytesAdded } };
          }
          passStats[volume.composeName] = result.stats;
          onProgress({ type: 'volume-done', volume: volume.composeName, bytes: result.stats.bytesRead, files: result.stats.files });
          out.push({
            composeName: volume.composeName,
            name: volume.name,
            role: volume.role,
            mountPath: volume.mountPath,
            tree: result.tree,
            root: result.root,
            entries: result.stats.entries,
            files: result.stats.files,
            bytes: result.stats.bytes,
          });
        }
        const all = Object.values(passStats);
        passes.push({
          name,
          cvat,
          durationMs: now() - began,
          filesRead: all.reduce((sum, s) => sum + s.files - s.filesUnchanged, 0),
          bytesRead: all.reduce((sum, s) => sum + s.bytesRead, 0),
        });
        addedPerPass.push(all.reduce((sum, s) => sum + s.bytesAdded, 0));
        stats = passStats;
        // The next pass compares with this pass's trees: they must be readable.
        if (name === 'precopy') await repo.flushPacksOnly();
        return out;
      };
      let database: SnapshotDatabase | undefined;
      if (dumpDb) {
        const began = now();
        const dumped = await storeDatabaseDump(engine, repo, deployment, onProgress, options.signal);
        passes.push({ name: 'dump', cvat: 'running', durationMs: now() - began, filesRead: 1, bytesRead: dumped.size });
        addedPerPass.push(dumped.bytesAdded);
        database = { ...dumped.database, time: new Date(began).toISOString(), durationMs: now() - began };
      }
      // Created only now, and closed in the finally below, so that no early error leaves worker
      // threads keeping the process alive.
      const pool = repo.createChunkPool(backupPoolSize());
      const fromParentSnapshot = (volume: (typeof selected)[number]): string | undefined =>
        parent?.volumes.find((p) => p.composeName === volume.composeName && p.mountPath === volume.mountPath)?.tree;
      let volumes: SnapshotVolume[];
      let window: DowntimeWindow;
      /** A remote repository's writes during the downtime, held on this machine until CVAT runs again. */
      let deferral: UploadDeferral | undefined;
      try {
        await pool.ready();
        if (mode === 'offline') {
          const offline = async (): Promise<SnapshotVolume[]> => {
            const result = await pass('final', 'stopped', fromParentSnapshot, {});
            await options.whileHeld?.();
            return result;
          };
          ({ result: volumes, window } = await withDeploymentStopped(engine, deployment.containers, onProgress, offline, now));
        } else {
          // The journal covers every phase-1 pass (the final pass's parent is the last one's tree);
          // closed in every path, and as soon as it is collected.
          const journal = await startJournal(options.startJournal ?? startFanotifyJournal, selected, folders, options.signal);
          try {
            // Phase 1, CVAT running: nothing here is a snapshot yet.
            onProgress({ type: 'phase', message: 'phase 1: copying while CVAT runs' });
            let since = nowNs() - RACY_SLACK_NS;
            let precopy = await pass('precopy', 'running', fromParentSnapshot, { tolerateChanges: true });
            const repeatAfter = options.repeatPrecopyAfterMs;
            const precopies = (): BackupPass[] => passes.filter((p) => p.name === 'precopy');
            while (repeatAfter !== undefined && precopies().length < 3 && precopies().pop()!.durationMs > repeatAfter) {
              onProgress({ type: 'phase', message: 'phase 1 again: copying what changed meanwhile' });
              const previous = precopy;
              const passSince = nowNs() - RACY_SLACK_NS;
              precopy = await pass('precopy', 'running', (v) => previous.find((p) => p.composeName === v.composeName)?.tree, { tolerateChanges: true, racySinceNs: since });
              since = passSince;
            }
            const last = precopy;
            const final = async (): Promise<SnapshotVolume[]> => {
              // Everything CVAT wrote is in the journal's queue now that it is stopped or frozen.
              const changesFor = await journal.collect(lastPassFacts);
              const use: JournalUse = { used: [], walked: [] };
              const result = await pass(
                'final',
                mode === 'freeze' ? 'frozen' : 'stopped',
                (v) => last.find((p) => p.composeName === v.composeName)?.tree,
                { racySinceNs: since },
                { changesFor, use },
              );
              passes[passes.length - 1]!.journal = use;
              onProgress({ type: 'change-journal', ...use });
              await options.whileHeld?.();
              return result;
            };
            // The final pass never waits on the network: trees come from the cache, writes go to
            // the spool (a local repository writes directly).
            deferral = await repo.deferUploads();
            onProgress({ type: 'phase', message: `phase 2: copying what changed with CVAT ${mode === 'freeze' ? 'frozen' : 'stopped'}` });
            ({ result: volumes, window } =
              mode === 'freeze'
                ? await withDeploymentFrozen(engine, deployment.containers, onProgress, final, now)
                : await withDeploymentStopped(engine, deployment.containers, onProgress, final, now));
          } finally {
            await journal.close();
          }
        }
      } catch (error) {
        // Nothing a snapshot needs is left only in the spool: the backup failed before its snapshot.
        // The packs it was filling go too (their files closed and deleted; the deferral drops them
        // as well, but a local repository defers nothing).
        await repo.abandonWrites();
        await deferral?.abandon().catch(() => undefined);
        throw error;
      } finally {
        await pool.close();
      }
      if (deferral?.active) {
        try {
          await deferral.drain({
            ...signalOption,
            onStart: (p) =>
              onProgress({ type: 'phase', message: `uploading ${count(p.packs, 'pack')} and ${count(p.files - p.packs, 'index file')}, ${megabytes(p.bytes)} written during the downtime` }),
            onRetry: (file, error, attempt) =>
              onProgress({ type: 'warning', message: `upload of ${file.kind}/${file.name.slice(0, 12)} failed (${(error as Error).message}): trying again (attempt ${attempt + 1})` }),
          });
        } catch (error) {
          await deferral.abandon().catch(() => undefined);
          throw error;
        }
      }
      onProgress({ type: 'phase', message: 'writing index' });
      await repo.flush();
      const finishedAt = now();
      const snapshot: Snapshot = {
        version: 1,
        time: new Date(startedAt).toISOString(),
        hostname: hostname(),
        tool: `cvat-backup ${TOOL_VERSION}`,
        project: deployment.project,
        cvat: cvatRecord(deployment.version),
        ...(parent ? { parent: parent.id } : {}),
        mode,
        downtimeMs: window.downtimeMs,
        durationMs: finishedAt - startedAt,
        volumes,
        ...(database ? { database } : {}),
        skipped,
      };
      const id = await repo.saveObject('snapshots', snapshot);
      const bytesAdded = addedPerPass.reduce((a, b) => a + b, 0);
      return { snapshot: { ...snapshot, id }, stats, bytesAdded, mode, passes };
    } finally {
      await repoLock.release().catch(() => undefined);
    }
  } finally {
    await projectLock.release().catch(() => undefined);
  }
}

type SelectedVolume = ReturnType<typeof selectVolumes>['selected'][number];

/** A backup's change journal: started before phase 1, collected once CVAT is held. */
interface BackupJournal {
  /**
   * Per volume, the changes to give the final pass, or why it is walked in full. Closes the
   * journal. Never throws: a journal that fails leaves every volume to a full walk.
   */
  collect(facts: ReadonlyMap<string, PassFacts>): Promise<(volume: SelectedVolume) => ChangesSinceParent | string>;
  /** Idempotent; never throws. */
  close(): Promise<void>;
}

/**
 * Starts the change journal on the folders of the volumes it can vouch for (journalSafe), if
 * there is a journal. Never throws but for an abort: without a journal, every volume is walked in
 * full, and the reason is kept for the final pass's message.
 */
async function startJournal(
  start: StartChangeJournal,
  selected: SelectedVolume[],
  folders: ReadonlyMap<string, string | undefined>,
  signal: AbortSignal | undefined,
): Promise<BackupJournal> {
  const watched = new Map<string, string>();
  for (const v of selected) {
    const folder = folders.get(v.composeName);
    if (folder !== undefined && journalSafe(v.role)) watched.set(v.composeName, folder);
  }
  const unsafe = 'its service may write it through shared memory maps, which no change journal sees';
  let journal: ChangeJournal | undefined;
  let missing = 'no change journal';
  if (watched.size > 0) {
    try {
      const started = await start([...new Set(watched.values())]);
      if (started.ok) journal = started.journal;
      else missing = started.reason;
    } catch (error) {
      missing = `no change journal (${(error as Error).message})`;
    }
    if (signal?.aborted) await journal?.close().catch(() => undefined);
    signal?.throwIfAborted();
  }
  const close = async (): Promise<void> => {
    await journal?.close().catch(() => undefined);
  };
  return {
    close,
    collect: async (facts) => {
      let results: Map<string, JournalResult> | undefined;
      let failed = missing;
      if (journal) {
        try {
          results = await journal.collect();
        } catch (error) {
          failed = `the change journal failed (${(error as Error).message})`;
        }
        await close();
      }
      return (volume) => {
        const folder = watched.get(volume.composeName);
        if (folder === undefined) return journalSafe(volume.role) ? 'its folder is not on this host' : unsafe;
        if (results === undefined) return failed;
        const result = results.get(folder);
        if (result === undefined) return 'the change journal did not report on it';
        if (!result.ok) return result.reason;
        const parentPass = facts.get(volume.composeName);
        if (parentPass === undefined) return 'its last pass while CVAT ran was not a full walk';
        return { changes: result.changes, parentPass };
      };
    },
  };
}

function count(n: number, what: string): string {
  return `${n} ${what}${n === 1 ? '' : 's'}`;
}

function megabytes(bytes: number): string {
  return `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;
}

/**
 * Dumps CVAT's database while it runs (pg_dump sees one consistent state through MVCC and blocks
 * nobody) and stores the dump as chunks.
 */
async function storeDatabaseDump(
  engine: DockerEngine,
  repo: Repository,
  deployment: Deployment,
  onProgress: ProgressListener,
  signal: AbortSignal | undefined,
): Promise<{ database: Omit<SnapshotDatabase, 'time' | 'durationMs'>; size: number; bytesAdded: number }> {
  const db = await openDatabase(engine, deployment, signal);
  if (db.container && db.container.state !== 'running') {
    throw new DatabaseError(`--db dump needs the ${DATABASE_SERVICE} container running (it is ${db.container.state}): start CVAT, or back up without --db dump`);
  }
  onProgress({ type: 'phase', message: `dumping the database from ${db.where}` });
  onProgress({ type: 'volume-start', volume: 'database', action: 'dumping', totalBytes: undefined });
  const dump = await dumpDatabase(db, signal);
  let stored;
  try {
    stored = await storeStream(repo, dump.stdout, { ...(signal ? { signal } : {}), onProgress: (bytes) => onProgress({ type: 'volume-progress', volume: 'database', bytes, files: 1 }) });
  } finally {
    dump.stdout.resume();
  }
  const { exitCode, stderr } = await dump.exit;
  if (exitCode !== 0) throw toolFailure(db, 'pg_dump', exitCode, stderr);
  onProgress({ type: 'volume-done', volume: 'database', bytes: stored.size, files: 1 });
  return {
    database: { engine: 'postgresql', format: 'pg_dump-custom', location: db.settings.kind, dbname: db.settings.dbname, content: stored.content, size: stored.size },
    size: stored.size,
    bytesAdded: stored.bytesAdded,
  };
}
