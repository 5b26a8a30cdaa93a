/**
 * Wrappers around a backend: the cache (cache.ts), retries (retry.ts), and the test wrappers that
 * record or delay a few calls. A wrapper must offer an optional method of the contract exactly
 * when the backend it wraps has it: code above it asks `backend.stage` or `backend.retention` to
 * know what the storage can do, so a wrapper that always offered one would claim a feature, and
 * one that dropped it would hide it.
 */
import type { Backend, FileInfo } from './backend.js';

/** The optional methods of the Backend contract. */
export type OptionalMethod = { [K in keyof Backend]-?: undefined extends Backend[K] ? K : never }[keyof Backend];

type Call = (...args: unknown[]) => unknown;

/**
 * Gives `wrapper` the optional methods that `inner` has, each as `wrap` makes it from the call
 * bound to `inner` (undefined: not offered). A method the wrapper's class defines itself is left
 * alone (it is the wrapper's own), and so is a method `inner` lacks.
 */
export function adoptOptional(wrapper: object, inner: Backend, methods: readonly OptionalMethod[], wrap: (method: OptionalMethod, call: Call) => Call | undefined): void {
  const self = wrapper as Record<string, unknown>;
  for (const method of methods) {
    if (method in wrapper) continue;
    const fn = (inner as unknown as Record<string, unknown>)[method];
    if (typeof fn !== 'function') continue;
    const made = wrap(method, (...args: unknown[]): unknown => (fn as Call).apply(inner, args));
    if (made) self[method] = made;
  }
}

/** Every optional method, for wrappers that hand all of them on. */
const ALL_OPTIONAL: { [K in OptionalMethod]: true } = {
  listTemporary: true,
  removeTemporary: true,
  stage: true,
  close: true,
  clockOffsetMs: true,
  assertDeletes: true,
  retainedUntil: true,
  retention: true,
  extendRetention: true,
  listHidden: true,
  undelete: true,
  signedLoad: true,
  localPath: true,
};

/**
 * Hands every call to `inner`, the optional methods exactly when `inner` has them. A wrapper that
 * changes a few calls extends it and overrides those (an optional method as a field:
 * `override readonly stage = ...`, set after this constructor ran).
 */
export class ForwardingBackend implements Backend {
  declare readonly listTemporary?: NonNullable<Backend['listTemporary']>;
  declare readonly removeTemporary?: NonNullable<Backend['removeTemporary']>;
  declare readonly stage?: NonNullable<Backend['stage']>;
  declare readonly close?: NonNullable<Backend['close']>;
  declare readonly clockOffsetMs?: NonNullable<Backend['clockOffsetMs']>;
  declare readonly assertDeletes?: NonNullable<Backend['assertDeletes']>;
  declare readonly retainedUntil?: NonNullable<Backend['retainedUntil']>;
  declare readonly retention?: NonNullable<Backend['retention']>;
  declare readonly extendRetention?: NonNullable<Backend['extendRetention']>;
  declare readonly listHidden?: NonNullable<Backend['listHidden']>;
  declare readonly undelete?: NonNullable<Backend['undelete']>;
  declare readonly signedLoad?: NonNullable<Backend['signedLoad']>;
  declare readonly localPath?: NonNullable<Backend['localPath']>;

  constructor(readonly inner: Backend) {
    adoptOptional(this, inner, Object.keys(ALL_OPTIONAL) as OptionalMethod[], (_method, call) => call);
  }

  get location(): string {
    return this.inner.location;
  }
  exists(): Promise<boolean> {
    return this.inner.exists();
  }
  create(): Promise<void> {
    return this.inner.create();
  }
  save(...args: Parameters<Backend['save']>): Promise<void> {
    return this.inner.save(...args);
  }
  load(...args: Parameters<Backend['load']>): Promise<Buffer> {
    return this.inner.load(...args);
  }
  list(...args: Parameters<Backend['list']>): Promise<FileInfo[]> {
    return this.inner.list(...args);
  }
  stat(...args: Parameters<Backend['stat']>): Promise<number | undefined> {
    return this.inner.stat(...args);
  }
  remove(...args: Parameters<Backend['remove']>): Promise<void> {
    return this.inner.remove(...args);
  }
}
