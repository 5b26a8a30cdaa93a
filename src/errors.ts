/**
 * Every failure a user can meet is one of these classes: a stable `code`, a distinct exit code
 * (documented in the README) and a one-line message that says what to do. Only the CLI turns them
 * into exit codes; the core only throws them.
 */

export const ExitCode = {
  ok: 0,
  internal: 1,
  usage: 2,
  dockerUnavailable: 3,
  projectNotFound: 4,
  volumeMissing: 5,
  targetNotEmpty: 6,
  diskFull: 7,
  corruptArchive: 8,
  versionMismatch: 9,
  locked: 10,
  containersMissing: 11,
  restoreFailed: 12,
  wrongPassword: 13,
  repositoryMissing: 14,
  database: 15,
  lockLost: 16,
  storageAccess: 17,
  objectLocked: 18,
  interrupted: 130,
} as const;

export type ExitCodeValue = (typeof ExitCode)[keyof typeof ExitCode];

interface ErrorOptions {
  cause?: unknown;
}

/** Base of every error the tool reports to a user as one line (no stack). */
export abstract class CvatBackupError extends Error {
  abstract readonly code: string;
  abstract readonly exitCode: ExitCodeValue;

  constructor(message: string, options: ErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
  }
}

export class UsageError extends CvatBackupError {
  readonly code = 'USAGE';
  readonly exitCode = ExitCode.usage;
}

export class DockerUnavailableError extends CvatBackupError {
  readonly code = 'DOCKER_UNAVAILABLE';
  readonly exitCode = ExitCode.dockerUnavailable;
}

export class ProjectNotFoundError extends CvatBackupError {
  readonly code = 'PROJECT_NOT_FOUND';
  readonly exitCode = ExitCode.projectNotFound;
}

export class ContainersMissingError extends CvatBackupError {
  readonly code = 'CONTAINERS_MISSING';
  readonly exitCode = ExitCode.containersMissing;
}

export class VolumeMissingError extends CvatBackupError {
  readonly code = 'VOLUME_MISSING';
  readonly exitCode = ExitCode.volumeMissing;
}

export class TargetNotEmptyError extends CvatBackupError {
  readonly code = 'TARGET_NOT_EMPTY';
  readonly exitCode = ExitCode.targetNotEmpty;
}

export class DiskFullError extends CvatBackupError {
  readonly code = 'DISK_FULL';
  readonly exitCode = ExitCode.diskFull;
}

export class CorruptArchiveError extends CvatBackupError {
  readonly code = 'CORRUPT_ARCHIVE';
  readonly exitCode = ExitCode.corruptArchive;
}

export class VersionMismatchError extends CvatBackupError {
  readonly code = 'VERSION_MISMATCH';
  readonly exitCode = ExitCode.versionMismatch;
}

export class LockedError extends CvatBackupError {
  readonly code = 'LOCKED';
  readonly exitCode = ExitCode.locked;
}

/** The restore failed while writing volumes; the previous contents were put back. */
export class RestoreFailedError extends CvatBackupError {
  readonly code = 'RESTORE_FAILED';
  readonly exitCode = ExitCode.restoreFailed;
}

export class WrongPasswordError extends CvatBackupError {
  readonly code = 'WRONG_PASSWORD';
  readonly exitCode = ExitCode.wrongPassword;
}

/** No repository where one was expected (or one already exists where `init` would create it). */
export class RepositoryError extends CvatBackupError {
  readonly code = 'REPOSITORY';
  readonly exitCode = ExitCode.repositoryMissing;
}

/** A logical dump or load of CVAT's PostgreSQL failed (pg_dump/pg_restore said why), or its tools are missing. */
export class DatabaseError extends CvatBackupError {
  readonly code = 'DATABASE';
  readonly exitCode = ExitCode.database;
}

/**
 * The repository lock this process held vanished or could not be refreshed (another host or a
 * careless `rm` removed it, or the storage failed): stopped before writing an index or snapshot.
 */
export class LockLostError extends CvatBackupError {
  readonly code = 'LOCK_LOST';
  readonly exitCode = ExitCode.lockLost;
}

/**
 * The repository's storage refused us or cannot be reached: an unknown or changed SSH host key, a
 * refused login, a host that does not answer, a server without SFTP.
 */
export class StorageAccessError extends CvatBackupError {
  readonly code = 'STORAGE_ACCESS';
  readonly exitCode = ExitCode.storageAccess;
}

/**
 * The storage keeps the file under S3 Object Lock retention until a date: forget/prune can remove
 * it only after that (ransomware-proof repositories, `init --object-lock`).
 */
export class ObjectLockedError extends CvatBackupError {
  readonly code = 'OBJECT_LOCKED';
  readonly exitCode = ExitCode.objectLocked;
}

export class InterruptedError extends CvatBackupError {
  readonly code = 'INTERRUPTED';
  readonly exitCode = ExitCode.interrupted;
}

/**
 * Maps low-level errors that have a user meaning (ENOSPC, abort) to ours. `diskFull` says, for the
 * operation that failed, which disk filled up and what to do about it.
 */
export function classifyError(error: unknown, diskFull = 'free space on the disk being written, then run the command again'): unknown {
  if (error instanceof CvatBackupError) return error;
  const code = (error as { code?: unknown } | null)?.code;
  if (code === 'ENOSPC' || code === 'EDQUOT') {
    return new DiskFullError(`no space left on the device: ${diskFull}`, { cause: error });
  }
  if ((error as { name?: unknown } | null)?.name === 'AbortError') {
    return new InterruptedError('interrupted', { cause: error });
  }
  // A failure the backend called passing that outlasted the retries (a connection that stays down).
  if ((error as { transient?: unknown } | null)?.transient === true) {
    return new StorageAccessError(`the repository's storage kept failing, retries used up: ${(error as Error).message}`, { cause: error });
  }
  return error;
}
