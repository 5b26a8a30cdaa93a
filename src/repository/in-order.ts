/**
 * Reading the files of a listing a few at a time, used in the listing's order. On a remote store
 * every load is a round trip: one after the other, a hundred index files cost a hundred of them;
 * `width` at a time, a hundred / width. The results are handed over in order, so what the caller
 * does with them (merge into the index, try a key) happens as it did one by one, and no more than
 * `width` results are held at once.
 */

/** What `use` returns to end the walk early (the files after it are not used). */
export const STOP = Symbol('stop');

/**
 * Calls `start` for the items, `width` at a time (the next one once the oldest was used), and
 * `use` for each one's outcome (its promise, to await where it may reject) in the items' order.
 * Ends when every item was used, when `use` returns STOP, or with the error `use` throws; loads
 * still under way then finish unused (a rejection among them is nobody's error).
 */
export async function inOrder<T, R>(
  items: readonly T[],
  width: number,
  start: (item: T) => Promise<R>,
  use: (outcome: Promise<R>, item: T) => Promise<typeof STOP | void> | typeof STOP | void,
): Promise<void> {
  const started = new Map<number, Promise<R>>();
  const launch = (i: number): void => {
    if (i >= items.length) return;
    const outcome = start(items[i]!);
    outcome.catch(() => undefined);
    started.set(i, outcome);
  };
  for (let i = 0; i < Math.min(Math.max(1, width), items.length); i++) launch(i);
  for (let i = 0; i < items.length; i++) {
    const outcome = started.get(i)!;
    started.delete(i);
    if ((await use(outcome, items[i]!)) === STOP) return;
    launch(i + Math.max(1, width));
  }
}
