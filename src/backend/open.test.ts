/**
 * The factory: a local folder is opened as it is (staged writes, local paths for workers, no
 * retries: a failing disk does not get better by asking again); `remote` gives a remote backend
 * its retries and the caller's warnings.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { FaultyBackend } from './faulty.js';
import { LocalBackend } from './local.js';
import { MemoryBackend } from './memory.js';
import { openBackend, remote } from './open.js';
import { RetryBackend, type RetryEvent } from './retry.js';

void describe('openBackend and remote', () => {
  void it('opens a local folder unwrapped', async () => {
    const backend = await openBackend('/srv/backups/cvat');
    assert.ok(backend instanceof LocalBackend);
    assert.equal(typeof backend.stage, 'function');
  });

  void it('remote() retries transient failures and tells the caller of each retry', async () => {
    const memory = new MemoryBackend();
    const flaky = new FaultyBackend(memory, { rules: [{ method: 'save', times: 1, error: () => Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' }) }] });
    const events: RetryEvent[] = [];
    const backend = remote(flaky, { retry: { initialDelayMs: 1, onRetry: (e) => events.push(e) } });
    assert.ok(backend instanceof RetryBackend);
    await backend.save('index', 'cd'.repeat(32), Buffer.from('x'));
    assert.equal(memory.raw('index', 'cd'.repeat(32))?.toString(), 'x');
    assert.deepEqual(
      events.map((e) => e.message),
      ['retrying save of index/cdcdcdcd… (attempt 2/10): connection reset'],
    );
  });
});
