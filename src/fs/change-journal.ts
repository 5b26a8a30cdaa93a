/**
 * The change journal (issue 10): what changed in the volumes since a moment, so that the final
 * pass of a backup (CVAT stopped or frozen) visits only that, not every file.
 *
 * This file states the contract between the journal (which records changes, e.g. with fanotify)
 * and the archiver (which consumes them). Paths are bytes: a folder is named by its path relative
 * to the volume root as a 'latin1' string (one char per byte, so any name round-trips with
 * Buffer.from(key, 'latin1')); the root folder is ''. Names are single components, same encoding.
 */

/** The changes seen in one volume. */
export interface VolumeChanges {
  /**
   * Folder -> the names in it that were created, deleted, renamed (either side), written or had
   * their metadata changed (a folder's own metadata change is reported under its parent, by its
   * name); 'all' when the folder itself must be listed again in full. A folder absent from the
   * map, with no descendant in it, is unchanged: its parent-pass tree can be taken as it is.
   */
  readonly folders: ReadonlyMap<string, ReadonlySet<string> | 'all'>;
}

/** Per volume (keyed by its mount point as given to start): its changes, or why they cannot be trusted. */
export type JournalResult = { ok: true; changes: VolumeChanges } | { ok: false; reason: string };

export interface ChangeJournal {
  /**
   * Collects every change made since the journal started, up to now (the caller has stopped or
   * frozen the writers: everything they wrote is in the queue). One result per volume.
   */
  collect(): Promise<Map<string, JournalResult>>;
  /** Stops watching and frees the kernel resources. Idempotent. */
  close(): Promise<void>;
}
