import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { FileKind, TemporaryFile } from './backend.js';
import { ForwardingBackend } from './forwarding.js';
import { LocalBackend } from './local.js';
import { MemoryBackend } from './memory.js';
import { RetryBackend } from './retry.js';

void describe('ForwardingBackend', () => {
  void it('offers an optional method exactly when the wrapped backend has it', () => {
    const memory = new MemoryBackend();
    const wrapped = new ForwardingBackend(memory);
    assert.equal(typeof wrapped.listTemporary, 'function');
    assert.equal(wrapped.stage, undefined, 'memory has no staged files, so neither has its wrapper');
    assert.equal(wrapped.retention, undefined);
    assert.equal('localPath' in wrapped, false);
    const local = new ForwardingBackend(new LocalBackend('/nonexistent/repo'));
    assert.equal(typeof local.stage, 'function');
    assert.equal(typeof local.localPath, 'function');
    assert.equal(local.localPath!('data', 'ab'.repeat(32)), new LocalBackend('/nonexistent/repo').localPath('data', 'ab'.repeat(32)), 'called on the wrapped backend');
  });

  void it('hands every call on, and keeps a subclass override of an optional method', async () => {
    const memory = new MemoryBackend();
    class Counting extends ForwardingBackend {
      temporaryLists = 0;
      override readonly listTemporary = async (): Promise<TemporaryFile[]> => {
        this.temporaryLists++;
        return memory.listTemporary();
      };
    }
    const wrapped = new Counting(memory);
    const name = 'cd'.repeat(32);
    await wrapped.save('index' satisfies FileKind, name, Buffer.from('x'));
    assert.deepEqual(await wrapped.load('index', name), Buffer.from('x'));
    assert.equal(await wrapped.stat('index', name), 1);
    assert.deepEqual((await wrapped.list('index')).map((f) => f.name), [name]);
    await wrapped.listTemporary();
    assert.equal(wrapped.temporaryLists, 1, 'the override runs, not the forwarded method');
    await wrapped.remove('index', name);
    assert.equal(await memory.stat('index', name), undefined);
  });

  void it('the retry wrapper follows the same rule', () => {
    assert.equal(new RetryBackend(new MemoryBackend()).stage, undefined);
    assert.equal(typeof new RetryBackend(new LocalBackend('/nonexistent/repo')).stage, 'function');
  });
});
