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
   * name; so is a folder whose entries changed, since that changes its mtime and ctime); 'all'
   * when the folder and everything below it must be walked again in full (a folder created or
   * moved in during the journal: its contents were never seen at that path). A folder absent from
   * the map, with no descendant in it, is unchanged: its parent-pass tree can be taken as it is.
   *
   * What the consumer must still do itself:
   * - A name may no longer exist (deleted, renamed away): lstat says so. An 'all' path may no
   *   longer exist or no longer be a folder: then it adds nothing beyond the names in its parent.
   * - The root folder's own metadata is never reported (it has no parent): stat it every pass.
   * - Hard links: a change made through one name is reported under that name only, and link() or
   *   unlink() changes the link count of the other names without an event for them. A file that
   *   has (or had, in the parent pass) more than one link must be re-checked under every name.
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
