/**
 * For tests: counts the round trips an operation makes to the storage one after another, without
 * a wall clock. Every call to the wrapped backend is held until the process has nothing else to
 * do (no other work, no file system request of ours under way), then every call held is let
 * through at once, as one round. On a remote store each round costs a network round trip, so
 * `rounds` is the operation's latency in round trips with the time the processor works taken as
 * nothing: calls made side by side share a round, a call made after another one's answer starts
 * the next. `latencyMs` turns the rounds into a simulated time for reports.
 *
 * Not for use by the tool itself.
 */
import { setImmediate as nextTurn, setTimeout as sleep } from 'node:timers/promises';
import type { Backend, FileInfo, FileKind } from './backend.js';
import { ForwardingBackend } from './forwarding.js';

/** One call as the storage saw it. */
export interface RecordedCall {
  /** 1-based: the round the call was let through in. */
  round: number;
  method: 'exists' | 'save' | 'load' | 'list' | 'stat' | 'remove';
  kind: FileKind | undefined;
  name: string | undefined;
}

export interface RoundTripReport<T> {
  value: T;
  rounds: number;
  calls: RecordedCall[];
  /** `rounds` × the latency given. */
  simulatedMs: number;
}

/** Turns of the event loop without a new call before a round goes (the process is quiet). */
const QUIET_TURNS = 8;

/** Requests the file system (libuv) is working on for us: a round waits for them. */
const BUSY = /^FSReq|^FileHandle|^CloseReq$/;
/** Pauses of a millisecond a round waits at most for file requests. */
const BUSY_WAITS = 2000;

export class RoundTripBackend extends ForwardingBackend {
  private gating = false;
  private held: { call: Omit<RecordedCall, 'round'>; release: () => void }[] = [];
  private calls: RecordedCall[] = [];
  private arrivals = 0;

  constructor(
    inner: Backend,
    private readonly latencyMs = 30,
  ) {
    super(inner);
  }

  /** Runs `work` with every call held and let through in rounds (see the module comment). */
  async measure<T>(work: () => Promise<T>): Promise<RoundTripReport<T>> {
    if (this.gating) throw new Error('one measurement at a time');
    this.gating = true;
    this.calls = [];
    let rounds = 0;
    let settled = false;
    const running = work().finally(() => {
      settled = true;
    });
    running.catch(() => undefined);
    try {
      while (!settled) {
        await this.quiet();
        if (settled) break;
        if (this.held.length === 0) {
          // Waiting on work that is neither a call nor a file request (a key derivation).
          await sleep(1);
          continue;
        }
        rounds++;
        for (const { call, release } of this.held.splice(0)) {
          this.calls.push({ ...call, round: rounds });
          release();
        }
      }
      const value = await running;
      return { value, rounds, calls: this.calls, simulatedMs: rounds * this.latencyMs };
    } finally {
      this.gating = false;
      for (const { release } of this.held.splice(0)) release();
    }
  }

  /** Resolves once no call arrived for a few turns and no file request of ours is under way. */
  private async quiet(): Promise<void> {
    // A file request that never ends (not ours) must not stop the test: after a while it is ignored.
    for (let calm = 0, waits = 0; calm < QUIET_TURNS; ) {
      const before = this.arrivals;
      await nextTurn();
      const busy = waits < BUSY_WAITS && process.getActiveResourcesInfo().some((r) => BUSY.test(r));
      calm = before === this.arrivals && !busy ? calm + 1 : 0;
      if (busy) {
        waits++;
        await sleep(1);
      }
    }
  }

  private async gate<T>(method: RecordedCall['method'], kind: FileKind | undefined, name: string | undefined, run: () => Promise<T>): Promise<T> {
    if (this.gating) {
      this.arrivals++;
      await new Promise<void>((release) => this.held.push({ call: { method, kind, name }, release }));
    } else {
      this.calls.push({ round: 0, method, kind, name });
    }
    return run();
  }

  override exists(): Promise<boolean> {
    return this.gate('exists', 'config', 'config', () => super.exists());
  }
  override save(...args: Parameters<Backend['save']>): Promise<void> {
    return this.gate('save', args[0], args[1], () => super.save(...args));
  }
  override load(...args: Parameters<Backend['load']>): Promise<Buffer> {
    return this.gate('load', args[0], args[1], () => super.load(...args));
  }
  override list(...args: Parameters<Backend['list']>): Promise<FileInfo[]> {
    return this.gate('list', args[0], undefined, () => super.list(...args));
  }
  override stat(...args: Parameters<Backend['stat']>): Promise<number | undefined> {
    return this.gate('stat', args[0], args[1], () => super.stat(...args));
  }
  override remove(...args: Parameters<Backend['remove']>): Promise<void> {
    return this.gate('remove', args[0], args[1], () => super.remove(...args));
  }
}
