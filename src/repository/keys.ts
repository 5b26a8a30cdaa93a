/**
 * Key files: the master key wrapped by a password (format: docs/repository-format.md, "Keys").
 *
 * A key file is plaintext and may come from anyone who can write to the repository's storage, so
 * it is read as hostile input: its size, shape and scrypt parameters are bounded before any work is
 * done (a key file asking for N = 2^30 would otherwise make scrypt allocate gigabytes, or run for
 * hours). One damaged key file does not lock a repository: the others are tried, and the damaged
 * one is named.
 *
 * New repositories calibrate scrypt as restic does: memory is fixed (N·r·128 bytes = 64 MiB), and
 * the parallelisation parameter p grows until one derivation takes about half a second on this
 * machine, so guessing passwords stays expensive as hardware gets faster.
 */
import { hostname } from 'node:os';
import { z } from 'zod';
import type { Backend } from '../backend/backend.js';
import { CorruptArchiveError, RepositoryError, WrongPasswordError } from '../errors.js';
import { deriveKey, unwrapMasterKey, wrapMasterKey, type KdfParams, type WrappedKey } from './crypto.js';
import { inOrder, STOP } from './in-order.js';

/** Larger key files are refused before parsing. */
const MAX_KEY_FILE = 64 * 1024;
/** scrypt memory (128·N·r bytes) a key file may ask for when it is opened. */
export const MAX_KDF_MEMORY = 256 * 1024 * 1024;
/** scrypt work (N·r·p) a key file may ask for: about half a minute on a slow core. */
export const MAX_KDF_WORK = 2 ** 26;
/** Memory new repositories use: restic's bound, rounded to a power of two. */
const CALIBRATION_N = 2 ** 16;
const CALIBRATION_R = 8;
const CALIBRATION_MAX_P = 64;

const kdfSchema = z.object({
  algorithm: z.literal('scrypt'),
  N: z.number().int().min(2),
  r: z.number().int().min(1).max(64),
  p: z.number().int().min(1).max(1024),
  salt: z.string().regex(/^[A-Za-z0-9+/]{16,128}={0,2}$/),
});

const keyFileSchema = z.object({
  kdf: kdfSchema,
  key: z.string().regex(/^[A-Za-z0-9+/]{40,200}={0,2}$/),
  created: z.string(),
  hostname: z.string().optional(),
});

export type KeyFile = z.infer<typeof keyFileSchema>;

/** Throws unless the parameters are safe to run: N a power of two, memory and work bounded. */
export function checkKdfParams(params: Omit<KdfParams, 'salt'>, what = 'key file'): void {
  const { N, r, p } = params;
  if (!Number.isInteger(Math.log2(N))) throw new CorruptArchiveError(`${what}: scrypt N=${N} is not a power of two`);
  if (128 * N * r > MAX_KDF_MEMORY) {
    throw new CorruptArchiveError(`${what}: scrypt parameters ask for ${Math.round((128 * N * r) / 2 ** 20)} MiB of memory (at most ${MAX_KDF_MEMORY / 2 ** 20} MiB accepted)`);
  }
  if (N * r * p > MAX_KDF_WORK) throw new CorruptArchiveError(`${what}: scrypt parameters ask for too much work (N·r·p = ${N * r * p})`);
}

/** Parses and bounds a key file; throws CorruptArchiveError naming it if it is damaged or hostile. */
export function parseKeyFile(bytes: Buffer, name: string): KeyFile {
  const what = `key file ${name.slice(0, 12)}`;
  if (bytes.length > MAX_KEY_FILE) throw new CorruptArchiveError(`${what}: ${bytes.length} bytes, not a key file`);
  let json: unknown;
  try {
    json = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new CorruptArchiveError(`${what} is damaged (not JSON${bytes.length === 0 ? ': empty' : ', truncated?'})`);
  }
  const parsed = keyFileSchema.safeParse(json);
  if (!parsed.success) throw new CorruptArchiveError(`${what} is damaged (${parsed.error.issues[0]?.path.join('.') ?? '?'}: ${parsed.error.issues[0]?.message ?? 'invalid'})`);
  checkKdfParams(parsed.data.kdf, what);
  return parsed.data;
}

/** A new key file's bytes: the master key wrapped by `password` with `kdf`. */
export async function createKeyFile(master: Buffer, password: string, kdf: Omit<KdfParams, 'salt'>, now: Date): Promise<Buffer> {
  checkKdfParams(kdf, 'new key');
  const wrapped: WrappedKey = await wrapMasterKey(master, password, kdf, now);
  return Buffer.from(JSON.stringify({ ...wrapped, hostname: hostname() }, null, 2));
}

/** Key files loaded at once while they are tried (most repositories have one or two). */
const KEY_LOADS = 4;

/**
 * Tries every key file with `password`, in the listing's order (loaded a few at once, so a
 * remote store is asked in one round, not one per key). Damaged key files are skipped (each
 * reported to `onDamaged`); wrong password if none opens and at least one was sound.
 *
 * `hint`: the key file that opened the repository last time (the cache remembers its name and a
 * copy). It is loaded while the keys are listed and tried first; when it opens, the listing is not
 * waited for. With a copy, the password's scrypt starts on it at once, while the remote is asked;
 * its result is used only when the remote's key file is byte for byte the copy (a key removed or
 * replaced on the remote is never opened from the cache). A hint that is gone, damaged or another
 * password's costs nothing but that one load (and, with a copy, one scrypt).
 * Returns the master key, the name of the key file that opened it and that file's bytes.
 */
export async function openMasterKey(
  backend: Backend,
  password: string,
  onDamaged: (name: string, error: Error) => void = () => undefined,
  hint?: { name: string; file?: Buffer | undefined },
): Promise<{ master: Buffer; name: string; file: Buffer }> {
  const listing = backend.list('keys');
  listing.catch(() => undefined); // not needed when the hint opens
  const damaged: string[] = [];
  let wrongPassword: Error | undefined;
  let opened: { master: Buffer; name: string; file: Buffer } | undefined;
  const tryKey = async (loaded: Promise<Buffer>, name: string, early?: { copy: Buffer; unwrapping: Promise<Buffer> }): Promise<typeof STOP | void> => {
    let bytes: Buffer;
    let file: KeyFile;
    try {
      bytes = await loaded;
      file = parseKeyFile(bytes, name);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
      if (!(error instanceof CorruptArchiveError)) throw error;
      damaged.push(error.message);
      onDamaged(name, error);
      return;
    }
    try {
      const master = await (early !== undefined && early.copy.equals(bytes) ? early.unwrapping : unwrapMasterKey(file, password));
      opened = { master, name, file: bytes };
      return STOP;
    } catch (error) {
      if (!(error instanceof WrongPasswordError)) throw error;
      wrongPassword = error;
    }
  };
  if (hint !== undefined) {
    const loaded = backend.load('keys', hint.name);
    loaded.catch(() => undefined); // tryKey reports it
    const early = hint.file !== undefined ? unwrapEarly(hint.file, hint.name, password) : undefined;
    if ((await tryKey(loaded, hint.name, early)) === STOP && opened) return opened;
  }
  const names = (await listing).map((f) => f.name).filter((name) => name !== hint?.name);
  await inOrder(names, KEY_LOADS, (name) => backend.load('keys', name), (loaded, name) => tryKey(loaded, name));
  if (opened) return opened;
  if (wrongPassword !== undefined) throw wrongPassword;
  if (damaged.length > 0) throw new CorruptArchiveError(`no usable key in repository ${backend.location}: ${damaged.join('; ')}`);
  throw new RepositoryError(`no key in repository ${backend.location}: it is incomplete (an interrupted 'init'?)`);
}

/**
 * The password's scrypt on the cache's copy of a key file, started before the remote's file is
 * here; undefined when the copy is not a sound key file (bounded like any other: parseKeyFile).
 */
function unwrapEarly(copy: Buffer, name: string, password: string): { copy: Buffer; unwrapping: Promise<Buffer> } | undefined {
  let file: KeyFile;
  try {
    file = parseKeyFile(copy, name);
  } catch {
    return undefined;
  }
  const unwrapping = unwrapMasterKey(file, password);
  unwrapping.catch(() => undefined); // used only when the remote's file is the copy
  return { copy, unwrapping };
}

/**
 * scrypt parameters that take about `targetMs` here with N·r·128 bytes = 64 MiB of memory (restic
 * calibrates the same way: memory bounded, time about half a second).
 */
export async function calibrateKdf(targetMs = 500, clock: () => number = () => performance.now()): Promise<Omit<KdfParams, 'salt'>> {
  const probe: KdfParams = { algorithm: 'scrypt', N: CALIBRATION_N, r: CALIBRATION_R, p: 1, salt: Buffer.alloc(16).toString('base64') };
  const began = clock();
  await deriveKey('calibration', probe);
  const oneMs = Math.max(1, clock() - began);
  const p = Math.min(CALIBRATION_MAX_P, Math.max(1, Math.round(targetMs / oneMs)));
  return { algorithm: 'scrypt', N: CALIBRATION_N, r: CALIBRATION_R, p };
}
