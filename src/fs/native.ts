/**
 * The optional native helper (binding.gyp, native/*.c): Node-API, so the one build `npm ci` makes
 * serves Node 20, 22 and 24. Everything it offers has a pure-JavaScript fallback, so a machine
 * where it did not build (no compiler) or `CVAT_BACKUP_NATIVE=off` runs the same, only slower or
 * with a full walk instead of a change journal; callers say so once in their output.
 */
import { createRequire } from 'node:module';

/** What the native helper exports (each part adds its functions here). */
export interface NativeHelper {
  readonly [name: string]: unknown;
}

let loaded: { helper: NativeHelper | undefined; why: string } | undefined;

function load(): { helper: NativeHelper | undefined; why: string } {
  if (process.env['CVAT_BACKUP_NATIVE'] === 'off') return { helper: undefined, why: 'turned off (CVAT_BACKUP_NATIVE=off)' };
  // dist/src/fs/native.js -> the package root's build/Release.
  const require = createRequire(import.meta.url);
  try {
    return { helper: require('../../../build/Release/cvat_native.node') as NativeHelper, why: '' };
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    return { helper: undefined, why: code === 'MODULE_NOT_FOUND' ? 'not built (run: sh scripts/build-native.sh)' : `not loadable: ${(error as Error).message}` };
  }
}

/** The native helper, or undefined (then `nativeUnavailableReason()` says why). */
export function nativeHelper(): NativeHelper | undefined {
  loaded ??= load();
  return loaded.helper;
}

/** Why the native helper is not there ('' when it is). */
export function nativeUnavailableReason(): string {
  loaded ??= load();
  return loaded.helper ? '' : loaded.why;
}

/**
 * At most `n` malloc arenas for the threads that allocate from now on (glibc; see native/addon.c):
 * call before threads start. False where it does nothing (no native helper, another C library, or
 * MALLOC_ARENA_MAX set by the user).
 */
export function limitMallocArenas(n: number): boolean {
  const limit = nativeHelper()?.['limitMallocArenas'];
  return typeof limit === 'function' ? (limit as (n: number) => boolean)(n) : false;
}
