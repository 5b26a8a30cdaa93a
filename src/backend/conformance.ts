/**
 * The Backend contract (backend.ts) as tests — restic's internal/backend/test is the model: every
 * backend runs this one suite from its own test file,
 *
 *   conformance('sftp', async () => ({ backend, dispose }), { manyFiles: 300 });
 *
 * `make` returns a fresh, empty location each call (not yet created); `dispose` removes what the
 * test stored. Each test opens its own location, so a failure names one promise of the contract.
 * On memory and local the whole suite takes a few seconds; remote backends pay one location per
 * test and a few hundred small uploads (the names test) plus one large file.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { TargetNotEmptyError } from '../errors.js';
import type { Backend, FileKind } from './backend.js';

export interface ConformanceSubject {
  backend: Backend;
  /** Removes what the test stored (and anything else `make` set up). The suite closes the backend first. */
  dispose: () => Promise<void> | void;
}

export interface ConformanceOptions {
  /** Bytes of the large file (saved in 1 MiB parts). Default 24 MiB: bigger than a pack, so multipart paths run. */
  largeSize?: number;
  /**
   * Data files of the names test (at least 256: one per first byte). A backend whose listing
   * comes in pages passes more than a page (S3: 1000) so that paging is tested.
   */
  manyFiles?: number;
  /** How far the storage's clock may be from ours, for `modifiedMs` (default 5 s). */
  clockToleranceMs?: number;
  /** Per test (default 120 s): a remote backend that hangs fails instead of stalling CI. */
  timeoutMs?: number;
}

/** The kinds whose files have 64-hex names (every kind but `config`). */
const NAMED_KINDS: FileKind[] = ['keys', 'data', 'index', 'snapshots', 'locks', 'state'];

const hex = (): string => randomBytes(32).toString('hex');
const digest = (data: Buffer): string => createHash('sha256').update(data).digest('hex');
const isMissing = (error: unknown): boolean => (error as NodeJS.ErrnoException | null)?.code === 'ENOENT';

/** `size` random bytes cut into parts of `part` bytes (the last one shorter). */
function randomParts(size: number, part: number): Buffer[] {
  const parts: Buffer[] = [];
  for (let at = 0; at < size; at += part) parts.push(randomBytes(Math.min(part, size - at)));
  return parts;
}

export function conformance(name: string, make: () => Promise<ConformanceSubject> | ConformanceSubject, options: ConformanceOptions = {}): void {
  const largeSize = options.largeSize ?? 24 * 1024 * 1024;
  const manyFiles = Math.max(256, options.manyFiles ?? 256);
  const tolerance = options.clockToleranceMs ?? 5000;
  const timeout = options.timeoutMs ?? 120_000;

  /** Runs `fn` on a fresh location (created unless `create` is false), then closes (twice: idempotent) and disposes. */
  const withBackend = async (fn: (backend: Backend) => Promise<void>, create = true): Promise<void> => {
    const { backend, dispose } = await make();
    try {
      if (create) await backend.create();
      await fn(backend);
    } finally {
      try {
        await backend.close?.();
        await backend.close?.();
      } finally {
        await dispose();
      }
    }
  };

  const test = (title: string, fn: (backend: Backend) => Promise<void>, create = true): void => {
    void it(title, { timeout }, () => withBackend(fn, create));
  };

  void describe(`Backend contract: ${name}`, () => {
    test(
      'exists is false until a config is saved; create twice is fine; create over a repository is refused',
      async (backend) => {
        assert.equal(await backend.exists(), false, 'a fresh location holds no repository');
        await backend.create();
        assert.equal(await backend.exists(), false, 'created, but no config yet');
        await backend.create(); // an interrupted create is simply run again
        await backend.save('keys', hex(), Buffer.from('{"key":1}'));
        assert.equal(await backend.exists(), false, 'a key file alone is no repository');
        await backend.save('config', 'config', Buffer.from('sealed config'));
        assert.equal(await backend.exists(), true);
        assert.equal(await backend.exists(), true, 'any number of calls');
        await assert.rejects(backend.create(), (e: unknown) => e instanceof TargetNotEmptyError, 'create where a repository is must refuse');
        assert.equal((await backend.load('config', 'config')).toString(), 'sealed config', 'and leave it as it was');
        assert.deepEqual(
          (await backend.list('config')).map((f) => [f.name, f.size]),
          [['config', 13]],
        );
      },
      false,
    );

    test('saves in parts, loads whole and in ranges (offset 0, middle, end, past the end, length 0)', async (backend) => {
      const name = hex();
      const parts = [randomBytes(1), randomBytes(4096), randomBytes(0), randomBytes(70_000), randomBytes(33)];
      const whole = Buffer.concat(parts);
      const size = whole.length;
      await backend.save('data', name, parts);
      assert.ok((await backend.load('data', name)).equals(whole), 'whole file');
      const ranges: [number, number, string][] = [
        [0, 1, 'first byte'],
        [0, 4097, 'a prefix'],
        [4097, 70_000, 'the middle'],
        [size - 4, 4, 'the last 4 bytes (a pack header length)'],
        [size - 10, 100, 'past the end: shorter'],
        [size, 10, 'at the end: empty'],
        [size + 1000, 10, 'beyond the end: empty'],
        [123, 0, 'length 0: empty'],
        [0, size, 'all of it'],
      ];
      for (let i = 0; i < 16; i++) {
        const offset = Math.floor(Math.random() * size);
        ranges.push([offset, 1 + Math.floor(Math.random() * (size - offset)), 'random']);
      }
      for (const [offset, length, what] of ranges) {
        const got = await backend.load('data', name, { offset, length });
        assert.ok(Buffer.isBuffer(got), `${what}: a Buffer`);
        assert.ok(got.equals(whole.subarray(offset, offset + length)), `${what} (offset ${offset}, length ${length}): got ${got.length} bytes`);
      }
    });

    test('lists each kind apart, with sizes and the storage time; stat gives sizes; remove is idempotent', async (backend) => {
      const before = Date.now();
      const name = hex();
      for (const [i, kind] of NAMED_KINDS.entries()) await backend.save(kind, name, Buffer.alloc(10 + i, i));
      const after = Date.now();
      for (const [i, kind] of NAMED_KINDS.entries()) {
        const listed = await backend.list(kind);
        assert.deepEqual(
          listed.map((f) => [f.name, f.size]),
          [[name, 10 + i]],
          `${kind}/ lists only its own file`,
        );
        const modified = listed[0]!.modifiedMs;
        assert.ok(modified === undefined || (modified >= before - tolerance && modified <= after + tolerance), `${kind}: modifiedMs ${modified} is the storage's time of the save`);
        assert.equal(await backend.stat(kind, name), 10 + i);
        assert.ok((await backend.load(kind, name)).equals(Buffer.alloc(10 + i, i)));
      }
      await backend.remove('index', name);
      await backend.remove('index', name);
      assert.deepEqual(await backend.list('index'), []);
      assert.equal(await backend.stat('index', name), undefined);
      for (const kind of NAMED_KINDS.filter((k) => k !== 'index')) assert.equal(await backend.stat(kind, name), 10 + NAMED_KINDS.indexOf(kind), `removing index/ left ${kind}/ alone`);
    });

    test('a backend that can tell modification times tells them', async (backend) => {
      // Locks and prune's grace period judge ages by them: undefined only where the storage truly has none.
      await backend.save('locks', hex(), Buffer.from('{}'));
      const [lock] = await backend.list('locks');
      if (lock!.modifiedMs !== undefined) assert.ok(Number.isFinite(lock!.modifiedMs) && lock!.modifiedMs > Date.UTC(2020, 0, 1));
    });

    test('missing files: load and ranged load are ENOENT, stat is undefined, remove is fine, listing is empty', async (backend) => {
      const name = hex();
      for (const kind of [...NAMED_KINDS]) {
        assert.deepEqual(await backend.list(kind), [], `${kind}/ lists nothing`);
        await assert.rejects(backend.load(kind, name), isMissing, `load of a missing ${kind} file`);
        await assert.rejects(backend.load(kind, name, { offset: 0, length: 4 }), isMissing, `ranged load of a missing ${kind} file`);
        assert.equal(await backend.stat(kind, name), undefined);
        await backend.remove(kind, name);
      }
      await assert.rejects(backend.load('config', 'config'), isMissing);
      assert.equal(await backend.stat('config', 'config'), undefined);
      assert.deepEqual(await backend.list('config'), []);
      await backend.save('data', name, Buffer.from('here'));
      await backend.remove('data', name);
      await assert.rejects(backend.load('data', name), isMissing, 'a removed file is missing');
      assert.equal(await backend.stat('data', name), undefined);
    });

    test('saving the same content twice stores one file; removing twice is no error', async (backend) => {
      const name = hex();
      const data = randomBytes(5000);
      await backend.save('data', name, data);
      await backend.save('data', name, [data.subarray(0, 100), data.subarray(100)]);
      assert.deepEqual(
        (await backend.list('data')).map((f) => [f.name, f.size]),
        [[name, 5000]],
      );
      assert.ok((await backend.load('data', name)).equals(data));
      await backend.save('config', 'config', Buffer.from('c'));
      await backend.save('config', 'config', Buffer.from('c'));
      assert.equal((await backend.list('config')).length, 1);
      await backend.remove('data', name);
      await backend.remove('data', name);
      assert.deepEqual(await backend.list('data'), []);
    });

    test(`names: ${manyFiles} data files across every first byte, and the names each kind uses`, async (backend) => {
      const names = new Map<string, Buffer>();
      for (let i = 0; i < manyFiles; i++) {
        const id = (i % 256).toString(16).padStart(2, '0') + randomBytes(31).toString('hex');
        names.set(id, Buffer.from(id.slice(0, 8 + (i % 7))));
      }
      const all = [...names];
      for (let at = 0; at < all.length; at += 16) await Promise.all(all.slice(at, at + 16).map(([id, data]) => backend.save('data', id, data)));
      const listed = await backend.list('data');
      assert.equal(listed.length, manyFiles, 'every file listed once');
      for (const f of listed) assert.equal(f.size, names.get(f.name)?.length, `${f.name} listed with its size`);
      for (const id of ['00' + '0'.repeat(62), 'ff'.repeat(32)]) {
        await backend.save('data', id, Buffer.from(id));
        assert.equal((await backend.load('data', id)).toString(), id);
      }
      for (const [id, data] of all.filter((_, i) => i % 37 === 0)) assert.ok((await backend.load('data', id)).equals(data));
      // As the repository names them: keys, index, snapshots, state by SHA-256 of their bytes, locks at random.
      for (const kind of ['keys', 'index', 'snapshots', 'state'] as const) {
        const data = randomBytes(300);
        await backend.save(kind, digest(data), data);
        assert.deepEqual((await backend.list(kind)).map((f) => f.name), [digest(data)]);
      }
    });

    test(`a large file (${Math.round(largeSize / 1048576)} MiB in 1 MiB parts) is stored whole`, async (backend) => {
      const parts = randomParts(largeSize, 1 << 20);
      const whole = Buffer.concat(parts);
      const name = digest(whole);
      await backend.save('data', name, parts);
      assert.equal(await backend.stat('data', name), largeSize);
      assert.deepEqual(
        (await backend.list('data')).map((f) => [f.name, f.size]),
        [[name, largeSize]],
      );
      assert.equal(digest(await backend.load('data', name)), name, 'loaded whole');
      const tail = await backend.load('data', name, { offset: largeSize - 4, length: 4 });
      assert.ok(tail.equals(whole.subarray(largeSize - 4)));
      const middle = await backend.load('data', name, { offset: (largeSize >> 1) - 1000, length: 3 << 20 });
      assert.ok(middle.equals(whole.subarray((largeSize >> 1) - 1000, (largeSize >> 1) - 1000 + (3 << 20))), 'a range across part boundaries');
    });

    test('concurrent writers: many saves at once are all listed and all whole', async (backend) => {
      const files = Array.from({ length: 24 }, (_, i) => randomParts(1 + ((i * 104_729) % 600_000), 64 * 1024));
      const names = files.map((parts) => digest(Buffer.concat(parts)));
      await Promise.all(files.map((parts, i) => backend.save(i % 3 === 0 ? 'index' : 'data', names[i]!, parts)));
      const listed = new Map([...(await backend.list('data')), ...(await backend.list('index'))].map((f) => [f.name, f.size]));
      assert.equal(listed.size, files.length);
      await Promise.all(
        files.map(async (parts, i) => {
          const size = parts.reduce((n, p) => n + p.length, 0);
          assert.equal(listed.get(names[i]!), size, `file ${i} listed with its full size`);
          assert.equal(digest(await backend.load(i % 3 === 0 ? 'index' : 'data', names[i]!)), names[i], `file ${i} whole`);
        }),
      );
      // Concurrent removes and saves of other names do not disturb each other.
      const more = files.slice(0, 6).map(() => randomBytes(1000));
      await Promise.all([...names.filter((_, i) => i % 3 !== 0).map((n) => backend.remove('data', n)), ...more.map((d) => backend.save('data', digest(d), d))]);
      assert.deepEqual((await backend.list('data')).map((f) => f.name).sort(), more.map(digest).sort());
    });

    test('atomic visibility: a file being saved is never listed, stat or loaded half-written', async (backend) => {
      const size = Math.min(largeSize, 12 << 20);
      const parts = randomParts(size, 64 * 1024);
      const whole = Buffer.concat(parts);
      const name = digest(whole);
      let done = false;
      const saving = backend.save('data', name, parts).finally(() => {
        done = true;
      });
      // Two lookers while the save runs: one stats and loads the end (cheap, so it looks often),
      // one lists. Whatever they see of the file must be all of it.
      const looks = { stat: 0, list: 0 };
      const byStat = async (): Promise<void> => {
        do {
          looks.stat++;
          const stat = await backend.stat('data', name);
          if (stat !== undefined) assert.equal(stat, size, 'stat only whole');
          const tail = await backend.load('data', name, { offset: size - 64, length: 64 }).catch((error: unknown) => {
            if (isMissing(error)) return undefined;
            throw error;
          });
          if (tail !== undefined) assert.ok(tail.equals(whole.subarray(size - 64)), `the end of the file is there once it can be loaded (got ${tail.length} bytes)`);
          await yieldToLoop();
        } while (!done);
      };
      const byList = async (): Promise<void> => {
        do {
          looks.list++;
          const listed = (await backend.list('data')).find((f) => f.name === name);
          if (listed) assert.equal(listed.size, size, 'listed only whole');
          await yieldToLoop();
        } while (!done);
      };
      await Promise.all([saving, byStat(), byList()]);
      assert.ok(looks.stat >= 1 && looks.list >= 1);
      assert.equal(digest(await backend.load('data', name)), name);
      if (backend.listTemporary) assert.deepEqual(await backend.listTemporary(), [], 'a finished save leaves no temporary file');
    });

    test('staged files (where the backend stages): invisible until commit, then whole; abort leaves nothing', async (backend) => {
      if (!backend.stage) return; // optional: the packer then saves whole packs
      const staged = await backend.stage('data');
      const parts = randomParts(3 << 20, 300_000);
      const whole = Buffer.concat(parts);
      await staged.append(parts.slice(0, 5));
      await staged.append(parts.slice(5));
      assert.equal(staged.size, whole.length);
      assert.deepEqual(await backend.list('data'), [], 'not listed before commit');
      const name = digest(whole);
      await staged.commit(name);
      assert.deepEqual(
        (await backend.list('data')).map((f) => [f.name, f.size]),
        [[name, whole.length]],
      );
      assert.equal(digest(await backend.load('data', name)), name);
      const dropped = await backend.stage('index');
      await dropped.append([randomBytes(1000)]);
      await dropped.abort();
      await dropped.abort();
      assert.deepEqual(await backend.list('index'), []);
      const twice = await Promise.all([backend.stage('data'), backend.stage('data')]);
      for (const [i, s] of twice.entries()) await s.append([Buffer.from(`file ${i}`)]);
      await Promise.all(twice.map((s, i) => s.commit(digest(Buffer.from(`file ${i}`)))));
      assert.equal((await backend.list('data')).length, 3, 'several staged files at once');
      if (backend.listTemporary) assert.deepEqual(await backend.listTemporary(), [], 'committed and aborted files leave no temporary file');
    });
  });
}
