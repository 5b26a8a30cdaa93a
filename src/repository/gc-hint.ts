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
 * The heap is held small (holdHeapSmall): the main thread allocates small objects that die young
 * or live as long as a folder is listed. V8 would grow the young generation to 16 MiB a
 * semi-space (Node 20, 22; 32 MiB on Node 24), all of it resident; held, it stays at 1 MiB, so
 * a folder's nodes reach the old generation, where V8 would let garbage grow to about 4× what
 * lives before it marks (at a million files: 60 MiB of garbage for 20 MiB live); held, it marks
 * at 2×. Workers get their young generation from `resourceLimits` (chunk-pool.ts).
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

/**
 * `--semi-space-growth-factor` and `--heap-growing-percent` are read each time V8 sizes a space
 * (Node 20, 22; Node 24 grows the young generation by pages then, and still less).
 */
const HEAP_HELD_SMALL = ['--semi-space-growth-factor=1', '--heap-growing-percent=100'];
let heapHeld = false;

function setFlags(flags: string[]): void {
  try {
    for (const flag of flags) setFlagsFromString(flag);
  } catch {
    // Memory is then higher; nothing else changes.
  }
}

/**
 * Holds the heap of this thread, and of those started later, small (see above). Call before
 * loading modules: loading them is what would grow the young generation first. The CLI calls it;
 * a library caller may not want it.
 */
export function holdHeapSmall(): void {
  heapHeld = true;
  setFlags(HEAP_HELD_SMALL);
}

/**
 * Starting a worker thread resets V8's flags set at run time, and so does a worker setting one
 * (its own `--expose-gc` here): whoever creates workers calls this once they are set up, so a
 * hold taken before still holds.
 */
export function restoreHeapHold(): void {
  if (heapHeld) setFlags(HEAP_HELD_SMALL);
}

/**
 * Counts bytes moved and runs a scavenge (`type` 'major': a full collection) every `everyBytes`
 * (one per thread that moves bytes).
 */
export class GarbageHint {
  private moved = 0;
  private readonly collect = collector();

  constructor(
    private readonly everyBytes = 8 << 20,
    private readonly type: 'minor' | 'major' = 'minor',
  ) {}

  note(bytes: number): void {
    if (this.collect === null) return;
    this.moved += bytes;
    if (this.moved < this.everyBytes) return;
    this.moved = 0;
    this.collect({ type: this.type });
  }
}
