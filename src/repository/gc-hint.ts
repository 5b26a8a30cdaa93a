/**
 * Garbage-collection hints for the paths that move a backup's bytes.
 *
 * Sealed chunks travel between threads as ArrayBuffers and die young: written into a pack, they
 * are garbage at once. But V8 frees an ArrayBuffer's bytes only when a collection finds its small
 * JS object dead, and with as little JS allocation as these paths do, that mostly happens when a
 * thread's external memory has grown by tens of MiB since its last full collection — in every
 * thread. That garbage was a third of a first backup's peak memory. A scavenge (a minor GC: well
 * under a millisecond with heaps this small) after every few MiB moved keeps it to a few MiB.
 *
 * `gc` is not exposed by default; it is made available at run time the way the `expose-gc`
 * package does (`--expose-gc` set through v8, `gc` taken from a fresh context). If that is not
 * possible on some runtime, the hints do nothing: memory is then higher, nothing else changes.
 *
 * The main thread's young generation is held at its first size (holdYoungGenerationSmall): it
 * allocates small objects that die young or live as long as a folder is listed, and V8 would grow
 * it to 16 MiB a semi-space (Node 20, 22; 32 MiB on Node 24), all of it resident. Workers get
 * theirs from `resourceLimits` (chunk-pool.ts).
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

type GcFunction = (options?: { type?: 'major' | 'minor'; execution?: 'sync' | 'async' }) => void;

let gc: GcFunction | null | undefined;

function collector(): GcFunction | null {
  if (gc !== undefined) return gc;
  try {
    setFlagsFromString('--expose-gc');
    const found = runInNewContext('gc') as unknown;
    gc = typeof found === 'function' ? (found as GcFunction) : null;
  } catch {
    gc = null;
  }
  return gc;
}

let youngGenerationHeld = false;

function setFlag(flag: string): void {
  try {
    setFlagsFromString(flag);
  } catch {
    // Memory is then higher; nothing else changes.
  }
}

/**
 * Keeps the young generation of every isolate created from now on, and of this one, at its first
 * size (1 MiB a semi-space): `--semi-space-growth-factor` is read each time V8 would grow it (Node
 * 20, 22; Node 24 grows it by pages then, and still less). Call before loading modules: loading
 * them is what would grow it first. The CLI calls it; a library caller may not want it.
 */
export function holdYoungGenerationSmall(): void {
  youngGenerationHeld = true;
  setFlag('--semi-space-growth-factor=1');
}

/**
 * Starting a worker thread resets V8's flags set at run time, and so does a worker setting one
 * (its own `--expose-gc` here): whoever creates workers calls this once they are set up, so a
 * hold taken before still holds.
 */
export function restoreYoungGenerationHold(): void {
  if (youngGenerationHeld) setFlag('--semi-space-growth-factor=1');
}

/** Counts bytes moved and runs a scavenge every `everyBytes` (one per thread that moves bytes). */
export class GarbageHint {
  private moved = 0;
  private readonly collect = collector();

  constructor(private readonly everyBytes = 8 << 20) {}

  note(bytes: number): void {
    if (this.collect === null) return;
    this.moved += bytes;
    if (this.moved < this.everyBytes) return;
    this.moved = 0;
    this.collect({ type: 'minor' });
  }
}
