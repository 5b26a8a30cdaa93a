/**
 * The Backend contract (conformance.ts) on the memory and local backends, the local backend's own
 * behaviour, and the fault-injection wrapper's scripts.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, utimesSync, writeFileSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TargetNotEmptyError } from '../errors.js';
import { conformance } from './conformance.js';
import { FaultyBackend } from './faulty.js';
import { LocalBackend } from './local.js';
import { MemoryBackend } from './memory.js';

conformance('memory', () => ({ backend: new MemoryBackend(), dispose: () => undefined }));
conformance('local', () => {
  const dir = mkdtempSync(join(tmpdir(), 'backend-test-'));
  return { backend: new LocalBackend(join(dir, 'repo')), dispose: () => rmSync(dir, { recursive: true, force: true }) };
});

void describe('LocalBackend', () => {
  const withDir = async (fn: (dir: string) => Promise<void>): Promise<void> => {
    const dir = mkdtempSync(join(tmpdir(), 'local-backend-'));
    try {
      await fn(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };

  void it('create refuses a file and a non-empty folder that is not a repository, and leaves them as they were', async () => {
    await withDir(async (dir) => {
      writeFileSync(join(dir, 'a-file'), 'data');
      await assert.rejects(new LocalBackend(join(dir, 'a-file')).create(), (e: unknown) => e instanceof TargetNotEmptyError && e.exitCode === 6 && /not a folder/.test(e.message));
      mkdirSync(join(dir, 'photos'));
      writeFileSync(join(dir, 'photos', 'holiday.jpg'), 'jpeg');
      await assert.rejects(new LocalBackend(join(dir, 'photos')).create(), (e: unknown) => e instanceof TargetNotEmptyError && /not empty/.test(e.message));
      assert.deepEqual(readdirSync(join(dir, 'photos')), ['holiday.jpg']);
      mkdirSync(join(dir, 'photos2', 'data'), { recursive: true }); // looks like ours, but is not empty
      writeFileSync(join(dir, 'photos2', 'data', 'x'), '');
      await assert.rejects(new LocalBackend(join(dir, 'photos2')).create(), TargetNotEmptyError);
      // An empty folder, and the empty layout an interrupted create left, are fine.
      mkdirSync(join(dir, 'empty'));
      await new LocalBackend(join(dir, 'empty')).create();
      await new LocalBackend(join(dir, 'empty')).create();
    });
  });

  void it('a staged file is invisible until commit, then whole; an aborted or unfinished one is only a temporary file', async () => {
    await withDir(async (dir) => {
      const backend = new LocalBackend(join(dir, 'repo'));
      await backend.create();
      const name = 'cd'.repeat(32);
      const staged = await backend.stage('data');
      await staged.append([Buffer.from('sealed '), Buffer.from('blobs ')]);
      await staged.append([Buffer.from('and a header')]);
      assert.equal(staged.size, 25);
      assert.deepEqual(await backend.list('data'), [], 'not visible before commit');
      assert.equal((await backend.listTemporary()).length, 1, 'a process killed now leaves a temporary file for prune');
      await staged.commit(name);
      assert.equal((await backend.load('data', name)).toString(), 'sealed blobs and a header');
      assert.deepEqual((await backend.list('data')).map((f) => f.name), [name]);
      assert.deepEqual(await backend.listTemporary(), []);
      await assert.rejects(staged.commit(name), /already/);
      const dropped = await backend.stage('data');
      await dropped.append([Buffer.from('never stored')]);
      await dropped.abort();
      await dropped.abort();
      assert.deepEqual(await backend.listTemporary(), []);
      assert.equal((await backend.list('data')).length, 1);
    });
  });

  void it('lists the temporary files of interrupted saves with their ages, never as repository files', async () => {
    await withDir(async (dir) => {
      const backend = new LocalBackend(join(dir, 'repo'));
      await backend.create();
      writeFileSync(join(dir, 'repo', 'data', '3f', '.tmp-0123'), 'half a pack');
      writeFileSync(join(dir, 'repo', 'index', '.tmp-4567'), 'half');
      const old = new Date('2026-01-01T00:00:00Z');
      utimesSync(join(dir, 'repo', 'data', '3f', '.tmp-0123'), old, old);
      assert.deepEqual(await backend.list('data'), []);
      const temporaries = (await backend.listTemporary()).sort((a, b) => a.kind.localeCompare(b.kind));
      assert.deepEqual(
        temporaries.map((t) => [t.kind, t.name, t.size]),
        [
          ['data', '3f/.tmp-0123', 11],
          ['index', '.tmp-4567', 4],
        ],
      );
      assert.equal(temporaries[0]!.modifiedMs, old.getTime());
      await backend.removeTemporary(temporaries[0]!);
      assert.deepEqual(readdirSync(join(dir, 'repo', 'data', '3f')), []);
      await assert.rejects(backend.removeTemporary({ kind: 'index', name: '../config', size: 0, modifiedMs: 0 }), /not a temporary file/);
    });
  });
});

void describe('FaultyBackend scripts', () => {
  void it('fails the n-th call, fails n times then succeeds, and can die at a point', async () => {
    const inner = new MemoryBackend();
    await inner.create();
    const nth = new FaultyBackend(inner, { rules: [{ method: 'remove', kind: 'data', nth: [2] }] });
    await nth.remove('data', 'a');
    await assert.rejects(nth.remove('data', 'b'), /injected fault: remove of data\/b \(#2\)/);
    await nth.remove('data', 'c');
    await nth.remove('index', 'd'); // other kinds do not count
    assert.equal(nth.count('remove'), 4);
    assert.equal(nth.count('remove', 'data'), 3);

    const flaky = new FaultyBackend(inner, { rules: [{ method: 'list', times: 2 }] });
    await assert.rejects(flaky.list('data'));
    await assert.rejects(flaky.list('index'));
    assert.deepEqual(await flaky.list('data'), []);

    const dying = new FaultyBackend(inner, { rules: [{ method: 'save', nth: [2], die: true }] });
    await dying.save('index', 'one', Buffer.from('1'));
    await assert.rejects(dying.save('index', 'two', Buffer.from('2')));
    await assert.rejects(dying.list('index'), /died/, 'nothing after the death reaches the storage');
    assert.ok(dying.died);
    assert.deepEqual((await inner.list('index')).map((f) => f.name), ['one']);
  });
});
