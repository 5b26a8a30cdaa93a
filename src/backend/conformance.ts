/**
 * The Backend contract as tests (restic's internal/backend/test is the model): every backend runs
 * this one suite from its own test file, `conformance('sftp', async () => ({ backend, dispose }))`.
 * `make` returns a fresh, empty location each call (not yet created).
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { Backend } from './backend.js';

export interface ConformanceSubject {
  backend: Backend;
  /** Removes what the test stored (and closes connections). */
  dispose: () => Promise<void> | void;
}

export interface ConformanceOptions {
  /**
   * The storage may list no modification times (restic's REST protocol lists none; a server that
   * sends no Last-Modified gives none): `modifiedMs` may then be undefined, but never wrong.
   */
  timesOptional?: boolean;
}

export function conformance(name: string, make: () => Promise<ConformanceSubject> | ConformanceSubject, options: ConformanceOptions = {}): void {
  const withBackend = async (fn: (backend: Backend) => Promise<void>): Promise<void> => {
    const { backend, dispose } = await make();
    try {
      await fn(backend);
    } finally {
      await backend.close?.();
      await dispose();
    }
  };

  void describe(`Backend contract: ${name}`, () => {
    void it('saves, loads (whole and ranges), lists with size and time, removes idempotently', () =>
      withBackend(async (backend) => {
        const before = Date.now();
        await backend.create();
        await backend.save('data', 'ab'.repeat(32), [Buffer.from('hello '), Buffer.from('world')]);
        await backend.save('index', 'i1', Buffer.from('x'));
        assert.equal((await backend.load('data', 'ab'.repeat(32))).toString(), 'hello world');
        assert.equal((await backend.load('data', 'ab'.repeat(32), { offset: 6, length: 100 })).toString(), 'world');
        const listed = await backend.list('data');
        assert.equal(listed.length, 1);
        assert.equal(listed[0]!.name, 'ab'.repeat(32));
        assert.equal(listed[0]!.size, 11);
        const time = listed[0]!.modifiedMs;
        assert.ok((options.timesOptional && time === undefined) || (time !== undefined && time >= before - 2000 && time <= Date.now() + 2000));
        assert.equal(await backend.stat('data', 'ab'.repeat(32)), 11);
        assert.equal(await backend.stat('data', 'cd'.repeat(32)), undefined);
        await assert.rejects(backend.load('index', 'missing'), (e: unknown) => (e as NodeJS.ErrnoException).code === 'ENOENT');
        await backend.remove('data', 'ab'.repeat(32));
        await backend.remove('data', 'ab'.repeat(32));
        assert.deepEqual(await backend.list('data'), []);
        assert.deepEqual(await backend.list('state'), [], 'a kind with no files lists nothing');
        await backend.save('state', 's1', Buffer.from('y'));
        assert.deepEqual((await backend.list('state')).map((f) => f.name), ['s1']);
      }));
  });
}
