/**
 * The local cache of remote repositories and the downtime spool (cache.ts, spool.ts), on a memory
 * "remote" behind the fault-injecting wrapper, which counts every request that reaches it.
 * Repository-level behaviour (authentication failures of cached copies, a two-phase backup's
 * final pass) is tested in src/repository/remote-cache.test.ts.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, writeSync, chmodSync, chownSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FileKind, SignedRequest } from './backend.js';
import { CachedBackend, cacheFolderFor, cacheRoot, withCache } from './cache.js';
import { conformance } from './conformance.js';
import { FaultyBackend, type BackendMethod, type FaultScript } from './faulty.js';
import { LocalBackend } from './local.js';
import { MemoryBackend } from './memory.js';
import { openBackend } from './open.js';
import { removeStaleSpools } from './spool.js';

const METHODS: BackendMethod[] = ['exists', 'create', 'save', 'load', 'list', 'stat', 'remove', 'listTemporary', 'removeTemporary'];
const LOCATION = 'sftp:backup@127.0.0.1:/srv/repo';

/** 64 hex digits from a short tag (names like the repository's). */
const id = (tag: string): string => Buffer.from(tag.padEnd(32, '.')).toString('hex').slice(0, 64);

interface Subject {
  root: string;
  inner: MemoryBackend;
  remote: FaultyBackend;
  cache: CachedBackend;
  warnings: string[];
  /** Requests that reached the remote so far (every method). */
  requests: () => number;
}

async function withSubject(fn: (s: Subject) => Promise<void>, script: FaultScript = {}): Promise<void> {
  const root = mkdtempSync(join(tmpdir(), 'cache-test-'));
  try {
    const inner = new MemoryBackend({ location: LOCATION });
    const remote = new FaultyBackend(inner, script);
    const warnings: string[] = [];
    const cache = await withCache(remote, { dir: root, onWarning: (m) => warnings.push(m) });
    assert.ok(cache instanceof CachedBackend, 'a remote gets a cache');
    await cache.create();
    await fn({ root, inner, remote, cache, warnings, requests: () => METHODS.reduce((n, m) => n + remote.count(m), 0) });
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

/** Files under `dir` (relative paths), recursively. */
function filesUnder(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, encoding: 'utf8' })
    .filter((p) => lstatSync(join(dir, p)).isFile())
    .sort();
}

conformance('memory behind its cache', async () => {
  const root = mkdtempSync(join(tmpdir(), 'cache-conformance-'));
  return { backend: await withCache(new MemoryBackend({ location: LOCATION }), { dir: root }), dispose: () => rmSync(root, { recursive: true, force: true }) };
});

void describe('cache of a remote repository', () => {
  void it('keeps index files, snapshots and tree packs (not data packs); a hit asks the remote nothing; concurrent first reads download once', () =>
    withSubject(async ({ inner, remote, cache }) => {
      await cache.save('index', id('i1'), Buffer.from('sealed index'));
      await cache.save('snapshots', id('s1'), [Buffer.from('sealed '), Buffer.from('snapshot')]);
      await cache.save('data', id('tree'), Buffer.from('0123456789 tree pack'), { metadata: true });
      await cache.save('data', id('data'), Buffer.from('0123456789 data pack'));
      const loads = remote.count('load');
      assert.equal((await cache.load('index', id('i1'))).toString(), 'sealed index');
      assert.equal((await cache.load('snapshots', id('s1'))).toString(), 'sealed snapshot');
      assert.equal((await cache.load('data', id('tree'), { offset: 11, length: 4 }, { metadata: true })).toString(), 'tree');
      assert.equal(remote.count('load'), loads, 'index, snapshot and tree pack came from the cache');
      assert.equal((await cache.load('data', id('data'), { offset: 11, length: 4 })).toString(), 'data');
      assert.equal(remote.count('load'), loads + 1, 'a data pack is read from the remote');
      await cache.load('data', id('tree'), { offset: 0, length: 4 });
      assert.equal(remote.count('load'), loads + 2, 'a reader that does not say "metadata" (prune, check) reads the remote');

      // A tree pack another machine wrote: fetched whole once, however many readers ask at once.
      await inner.save('data', id('other'), Buffer.from('abcdefghij'));
      const parts = await Promise.all([0, 2, 4, 6].map((offset) => cache.load('data', id('other'), { offset, length: 2 }, { metadata: true })));
      assert.deepEqual(parts.map(String), ['ab', 'cd', 'ef', 'gh']);
      assert.equal(remote.count('load'), loads + 3);
      assert.equal((await cache.load('data', id('other'), { offset: 8, length: 100 }, { metadata: true })).toString(), 'ij', 'a range past the end is shorter');
      assert.equal(remote.count('load'), loads + 3);
      await inner.save('index', id('i2'), Buffer.from('written elsewhere'));
      assert.equal((await cache.load('index', id('i2'))).toString(), 'written elsewhere');
      assert.equal((await cache.load('index', id('i2'))).toString(), 'written elsewhere');
      assert.equal(remote.count('load'), loads + 4);
    }));

  void it('keepReads (a restore): a ranged data read is downloaded once and read again from this machine until the end; forget drops a pack\'s ranges; a budget of 0 keeps nothing', () =>
    withSubject(async ({ root, inner, remote, cache }) => {
      await inner.save('data', id('p1'), Buffer.from('0123456789 data pack one'));
      await inner.save('data', id('p2'), Buffer.from('abcdefghij data pack two'));
      const kept = await cache.keepReads();
      const spool = join(cacheFolderFor(root, LOCATION), 'spool');
      assert.equal(readdirSync(spool).length, 1, 'a spool folder of its own (a crash leaves it to removeStaleSpools)');
      const loads = remote.count('load');
      assert.equal((await cache.load('data', id('p1'), { offset: 2, length: 5 })).toString(), '23456');
      assert.equal((await cache.load('data', id('p2'), { offset: 0, length: 3 })).toString(), 'abc');
      assert.equal(remote.count('load'), loads + 2);
      assert.equal((await cache.load('data', id('p1'), { offset: 2, length: 5 })).toString(), '23456', 'the second read of a range');
      assert.equal((await cache.load('data', id('p2'), { offset: 0, length: 3 })).toString(), 'abc');
      assert.equal(remote.count('load'), loads + 2, 'came from this machine');
      assert.equal((await cache.load('data', id('p1'), { offset: 3, length: 5 })).toString(), '34567', 'another range is another read');
      assert.equal((await cache.load('data', id('p1'))).toString(), '0123456789 data pack one', 'a whole-pack read (check, prune) is not kept');
      assert.equal(remote.count('load'), loads + 4);
      // A reader that needs the bytes once (a restore writing as it verifies) gets a kept range from
      // this machine, and leaves no copy of one that is not.
      assert.equal((await cache.load('data', id('p2'), { offset: 0, length: 3 }, { once: true })).toString(), 'abc');
      assert.equal(remote.count('load'), loads + 4, 'a kept range serves a read-once reader too');
      assert.equal((await cache.load('data', id('p2'), { offset: 4, length: 5 }, { once: true })).toString(), 'efghi');
      assert.equal((await cache.load('data', id('p2'), { offset: 4, length: 5 })).toString(), 'efghi');
      assert.equal(remote.count('load'), loads + 6, 'what a read-once reader got was not kept');
      assert.equal((await cache.load('data', id('p2'), { offset: 4, length: 5 })).toString(), 'efghi');
      assert.equal(remote.count('load'), loads + 6);
      assert.equal(await cache.forget('data', id('p1')), true, 'a damaged range: forget says there was a copy');
      assert.equal((await cache.load('data', id('p1'), { offset: 2, length: 5 })).toString(), '23456');
      assert.equal(remote.count('load'), loads + 7, 'read from the remote again');
      await kept.end();
      assert.deepEqual(readdirSync(spool), [], 'the file is gone at the end');
      await cache.load('data', id('p2'), { offset: 0, length: 3 });
      assert.equal(remote.count('load'), loads + 8, 'after the end, reads go to the remote');

      const none = await cache.keepReads({ reserveBytes: Number.MAX_SAFE_INTEGER });
      await cache.load('data', id('p2'), { offset: 0, length: 3 });
      await cache.load('data', id('p2'), { offset: 0, length: 3 });
      assert.equal(remote.count('load'), loads + 10, 'no room left: nothing kept');
      await none.end();
    }));

  void it('signedLoad is the remote\'s, except for bytes on this machine (spooled, kept); reserveKept: a range another thread writes counts as kept once it arrived', async () => {
    const root = mkdtempSync(join(tmpdir(), 'cache-test-'));
    try {
      const loads: string[] = [];
      const inner = new (class extends MemoryBackend {
        override load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
          if (kind === 'data') loads.push(name);
          return super.load(kind, name, range);
        }
        signedLoad(kind: FileKind, name: string, range: { offset: number; length: number }): Promise<SignedRequest | undefined> {
          return Promise.resolve({ url: `http://127.0.0.1:1/${kind}/${name}`, headers: { range: `bytes=${range.offset}-${range.offset + range.length - 1}` } });
        }
      })({ location: LOCATION });
      const cache = (await withCache(inner, { dir: root })) as CachedBackend;
      await cache.create();
      await inner.save('data', id('p1'), Buffer.from('0123456789 data pack one'));
      assert.equal((await cache.signedLoad('data', id('p1'), { offset: 2, length: 5 }))?.headers['range'], 'bytes=2-6', 'the remote\'s request');
      assert.equal(cache.reserveKept(id('p1'), { offset: 0, length: 10 }), undefined, 'no room while reads are not kept');

      const kept = await cache.keepReads();
      await cache.load('data', id('p1'), { offset: 2, length: 5 });
      assert.equal(await cache.signedLoad('data', id('p1'), { offset: 3, length: 3 }), undefined, 'a kept range is read here');
      assert.ok(await cache.signedLoad('data', id('p1'), { offset: 10, length: 3 }), 'another range is the remote\'s');
      // Another thread's download: written at the reserved position, kept once it arrived.
      const room = cache.reserveKept(id('p1'), { offset: 12, length: 4 })!;
      assert.ok(room, 'room');
      const before = loads.length;
      await cache.load('data', id('p1'), { offset: 12, length: 4 });
      assert.equal(loads.length, before + 1, 'not kept before it arrived');
      const fd = openSync(room.path, 'r+');
      writeSync(fd, Buffer.from('data'), 0, 4, room.position);
      closeSync(fd);
      room.arrived();
      assert.deepEqual(cache.keptAt(id('p1'), { offset: 13, length: 2 }), { path: room.path, position: room.position + 1 });
      assert.equal((await cache.load('data', id('p1'), { offset: 12, length: 4 })).toString(), 'data');
      assert.equal(loads.length, before + 1, 'read here once it arrived');
      await kept.end();

      const deferred = await cache.deferUploads();
      await cache.save('data', id('p2'), Buffer.from('spooled pack'));
      assert.equal(await cache.signedLoad('data', id('p2'), { offset: 0, length: 4 }), undefined, 'a spooled file is not on the remote yet');
      await deferred.discard();
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  void it('the remote listing is the truth: copies of files it no longer lists, or lists with another size, are dropped; remove and a missing stat drop them too', () =>
    withSubject(async ({ root, inner, remote, cache }) => {
      for (const n of ['a', 'b', 'c', 'd']) await cache.save('index', id(n), Buffer.from(`index ${n}`));
      await cache.save('data', id('t'), Buffer.from('tree pack'), { metadata: true });
      const dir = cacheFolderFor(root, LOCATION);
      const cached = (): string[] => filesUnder(join(dir, 'index')).map((p) => Buffer.from(p, 'hex').toString().replace(/\.+$/, ''));
      assert.deepEqual(cached(), ['a', 'b', 'c', 'd']);
      await inner.remove('index', id('a')); // a prune elsewhere
      inner.replace('index', id('b'), Buffer.from('index b, another size'));
      await cache.list('index');
      assert.deepEqual(cached(), ['c', 'd']);
      const loads = remote.count('load');
      assert.equal((await cache.load('index', id('b'))).toString(), 'index b, another size', 'read from the remote again');
      assert.equal(remote.count('load'), loads + 1);
      await cache.remove('index', id('c'));
      assert.deepEqual(cached(), ['b', 'd']);
      await inner.remove('index', id('d'));
      assert.equal(await cache.stat('index', id('d')), undefined);
      assert.deepEqual(cached(), ['b']);
      await inner.remove('data', id('t'));
      await cache.list('data');
      assert.deepEqual(filesUnder(join(dir, 'data')), [], 'a tree pack the remote no longer lists');
    }));

  void it('cached tree packs no index names any more are dropped once an hour old (younger ones may be another backup\'s new packs)', () =>
    withSubject(async ({ root, cache }) => {
      for (const n of ['kept', 'gone']) await cache.save('data', id(n), Buffer.from(n), { metadata: true });
      const dir = join(cacheFolderFor(root, LOCATION), 'data');
      assert.equal(await cache.dropPacksExcept((name) => name === id('kept')), 0, 'both are young');
      assert.equal(filesUnder(dir).length, 2);
      assert.equal(await cache.dropPacksExcept((name) => name === id('kept'), Date.now() + 2 * 3600_000), 1);
      assert.deepEqual(filesUnder(dir), [join(id('kept').slice(0, 2), id('kept'))]);
    }));

  void it('a cached copy that is not a plain file (a link, a folder) is never followed: dropped, and the remote read', () =>
    withSubject(async ({ root, remote, cache }) => {
      const dir = cacheFolderFor(root, LOCATION);
      await cache.save('snapshots', id('s'), Buffer.from('the snapshot'));
      await cache.save('index', id('i'), Buffer.from('the index'));
      const secret = join(root, 'secret');
      writeFileSync(secret, 'not yours');
      rmSync(join(dir, 'snapshots', id('s')));
      symlinkSync(secret, join(dir, 'snapshots', id('s')));
      rmSync(join(dir, 'index', id('i')));
      mkdirSync(join(dir, 'index', id('i')));
      const loads = remote.count('load');
      assert.equal((await cache.load('snapshots', id('s'))).toString(), 'the snapshot');
      assert.equal((await cache.load('index', id('i'))).toString(), 'the index');
      assert.equal(remote.count('load'), loads + 2);
      assert.ok(lstatSync(join(dir, 'snapshots', id('s'))).isFile(), 'replaced by a good copy');
      assert.equal(readFileSync(secret, 'utf8'), 'not yours');
      // Names unlike ours are never made into paths.
      await remote.save('index', '../../escape', Buffer.from('x'));
      assert.equal((await cache.load('index', '../../escape')).toString(), 'x');
      assert.equal(existsSync(join(dir, '..', 'escape')), false);
    }));

  void it('folders 0700, files 0600, only what the repository stored; a folder opened to others is closed, one of another user is not used', async () => {
    await withSubject(async ({ root, cache }) => {
      await cache.save('index', id('i'), Buffer.from('sealed index'));
      await cache.save('data', id('t'), Buffer.from('sealed tree pack'), { metadata: true });
      await cache.save('config', 'config', Buffer.from('sealed config'));
      const dir = cacheFolderFor(root, LOCATION);
      assert.equal(statSync(root).mode & 0o777, 0o700);
      for (const d of [dir, join(dir, 'index'), join(dir, 'data'), dirname(join(dir, 'data', id('t').slice(0, 2), id('t')))]) assert.equal(statSync(d).mode & 0o777, 0o700, d);
      for (const f of filesUnder(dir)) assert.equal(statSync(join(dir, f)).mode & 0o777, 0o600, f);
      const stored = filesUnder(dir).map((f) => readFileSync(join(dir, f), 'utf8'));
      assert.ok(stored.includes('sealed index') && stored.includes('sealed tree pack') && stored.includes('sealed config'));
      assert.deepEqual(filesUnder(join(dir, 'keys')), []);
    });
    const root = mkdtempSync(join(tmpdir(), 'cache-perm-'));
    try {
      const remote = new MemoryBackend({ location: LOCATION });
      const dir = cacheFolderFor(root, LOCATION);
      mkdirSync(dir, { recursive: true, mode: 0o755 });
      chmodSync(root, 0o755);
      chmodSync(dir, 0o777);
      assert.ok((await withCache(remote, { dir: root })) instanceof CachedBackend);
      assert.equal(statSync(dir).mode & 0o777, 0o700);
      assert.equal(statSync(root).mode & 0o777, 0o700);
      if (process.getuid?.() === 0) {
        chownSync(dir, 65534, 65534);
        const warnings: string[] = [];
        assert.equal(await withCache(remote, { dir: root, onWarning: (m) => warnings.push(m) }), remote, 'no cache in a folder of another user');
        assert.match(warnings.join('\n'), /belongs to user 65534.*without the cache/);
      }
      assert.equal(await withCache(remote, { dir: root, disabled: true }), remote, '--no-cache');
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  void it('a repository created anew at the same location empties the cache', () =>
    withSubject(async ({ root, inner, cache }) => {
      await cache.save('config', 'config', Buffer.from('config of repository 1'));
      await cache.save('index', id('i'), Buffer.from('index of repository 1'));
      const dir = cacheFolderFor(root, LOCATION);
      assert.deepEqual(await cache.load('config', 'config'), Buffer.from('config of repository 1'));
      assert.equal(filesUnder(join(dir, 'index')).length, 1, 'the same repository keeps its cache');
      inner.replace('config', 'config', Buffer.from('config of repository 2'));
      await cache.load('config', 'config');
      assert.equal(filesUnder(join(dir, 'index')).length, 0);
    }));

  void it('default folder: $CVAT_BACKUP_CACHE_DIR, else $XDG_CACHE_HOME/cvat-backup, else ~/.cache/cvat-backup; one folder per location, named by its hash', async () => {
    assert.equal(cacheRoot({ CVAT_BACKUP_CACHE_DIR: '/c', XDG_CACHE_HOME: '/x', HOME: '/h' }), '/c');
    assert.equal(cacheRoot({ XDG_CACHE_HOME: '/x', HOME: '/h' }), '/x/cvat-backup');
    assert.equal(cacheRoot({ XDG_CACHE_HOME: 'relative', HOME: '/h' }), '/h/.cache/cvat-backup');
    assert.notEqual(cacheFolderFor('/c', 'sftp:a@h:/r1'), cacheFolderFor('/c', 'sftp:a@h:/r2'));
    assert.doesNotMatch(cacheFolderFor('/c', 'sftp:a@h:/r1'), /sftp|r1/);
    // A local repository never gets one.
    const dir = mkdtempSync(join(tmpdir(), 'cache-local-'));
    try {
      const backend = await openBackend(join(dir, 'repo'), { cache: { dir: join(dir, 'cache') } });
      assert.ok(backend instanceof LocalBackend);
      assert.equal(existsSync(join(dir, 'cache')), false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

void describe('deferred uploads (the downtime spool)', () => {
  void it('while deferred, writes go to the spool and are read from it: no request reaches the remote but locks; upload sends data before index and keeps metadata in the cache', () =>
    withSubject(async ({ root, inner, remote, cache, requests }) => {
      await cache.save('index', id('old'), Buffer.from('an index from before'));
      const deferred = await cache.deferUploads();
      const before = requests();
      await cache.save('data', id('d1'), [Buffer.from('data '), Buffer.from('pack 1')]);
      await cache.save('data', id('t1'), Buffer.from('tree pack 1'), { metadata: true });
      await cache.save('index', id('i1'), Buffer.from('index naming d1 and t1'));
      await cache.save('data', id('d2'), Buffer.from('data pack 2'));
      assert.equal((await cache.load('data', id('d1'), { offset: 5, length: 4 })).toString(), 'pack');
      assert.equal((await cache.load('data', id('t1'), undefined, { metadata: true })).toString(), 'tree pack 1');
      assert.equal((await cache.load('index', id('old'))).toString(), 'an index from before', 'the cache still serves');
      assert.equal(await cache.stat('index', id('i1')), 'index naming d1 and t1'.length);
      assert.equal(requests(), before, 'nothing reached the remote');
      await cache.save('locks', id('lock'), Buffer.from('{}'));
      assert.equal(requests(), before + 1, 'a lock is saved on the remote at once');
      assert.deepEqual((await cache.list('data')).map((f) => f.name).sort(), [id('d1'), id('d2'), id('t1')].sort(), 'a listing shows spooled files');
      assert.deepEqual((await inner.list('data')).map((f) => f.name), [], 'the remote holds none yet');
      assert.deepEqual(
        deferred.pending().map((f) => [f.kind, f.size]),
        [
          ['data', 11],
          ['data', 11],
          ['index', 22],
          ['data', 11],
        ],
      );

      const order: string[] = [];
      const saving = remote.count('save');
      await deferred.upload(['data', 'index'], { onUploaded: (f) => order.push(`${f.kind}/${Buffer.from(f.name, 'hex').toString().replace(/\.+$/, '')}`) });
      assert.equal(remote.count('save'), saving + 4);
      assert.deepEqual(order.slice(3), ['index/i1'], 'every pack is uploaded before the index');
      assert.deepEqual(order.slice(0, 3).sort(), ['data/d1', 'data/d2', 'data/t1']);
      await deferred.end();
      assert.equal((await inner.load('index', id('i1'))).toString(), 'index naming d1 and t1');
      assert.equal((await inner.load('data', id('d1'))).toString(), 'data pack 1');
      const loads = remote.count('load');
      assert.equal((await cache.load('data', id('t1'), { offset: 0, length: 4 }, { metadata: true })).toString(), 'tree');
      assert.equal((await cache.load('index', id('i1'))).toString(), 'index naming d1 and t1');
      assert.equal(remote.count('load'), loads, 'uploaded metadata moved into the cache');
      assert.deepEqual(readdirSync(join(cacheFolderFor(root, LOCATION), 'spool')), [], 'the spool folder is gone');
      await cache.save('index', id('i2'), Buffer.from('after'));
      assert.equal((await inner.load('index', id('i2'))).toString(), 'after', 'writes go to the remote again');
    }));

  void it('a failed upload is retried; one that keeps failing is reported, stays spooled and readable, and a second upload sends it', () =>
    withSubject(
      async ({ inner, cache }) => {
        const deferred = await cache.deferUploads();
        for (const n of ['d1', 'd2', 'd3']) await cache.save('data', id(n), Buffer.from(`pack ${n}`));
        await cache.save('index', id('i'), Buffer.from('index'));
        const retries: string[] = [];
        const sleeps: number[] = [];
        const options = {
          concurrency: 1,
          sleep: (ms: number) => {
            sleeps.push(ms);
            return Promise.resolve();
          },
          onRetry: (_f: unknown, e: unknown, attempt: number) => retries.push(`${attempt}: ${(e as Error).message}`),
        };
        // Save calls 1 and 2 fail (d1 succeeds on its third try); calls 4-6 fail (d2 three times in a row).
        await assert.rejects(deferred.upload(['data', 'index'], options), /injected fault: save of data\/.* \(#6\)/);
        assert.deepEqual(sleeps, [1000, 2000, 1000, 2000], 'waits grow between tries');
        assert.equal(retries.length, 4);
        assert.deepEqual((await inner.list('index')).map((f) => f.name), [], 'no index is uploaded while a pack is missing');
        assert.deepEqual((await inner.list('data')).map((f) => f.name).sort(), [id('d1'), id('d3')].sort());
        assert.deepEqual(deferred.pending().map((f) => f.name), [id('d2'), id('i')]);
        assert.equal((await cache.load('data', id('d2'))).toString(), 'pack d2', 'still read from the spool');
        await assert.rejects(deferred.end(), /not uploaded/);
        await deferred.upload(['data', 'index'], options);
        await deferred.end();
        assert.deepEqual((await inner.list('data')).map((f) => f.name).sort(), [id('d1'), id('d2'), id('d3')].sort());
        assert.equal((await inner.load('index', id('i'))).toString(), 'index');
      },
      { rules: [{ method: 'save', kind: 'data', nth: [1, 2, 4, 5, 6] }] },
    ));

  void it('a process killed during the downtime leaves the remote as it was and only its spool, which the next open deletes; a live process keeps its spool', async () => {
    const work = mkdtempSync(join(tmpdir(), 'cache-crash-'));
    try {
      const repoDir = join(work, 'remote');
      const root = join(work, 'cache');
      const remote = new LocalBackend(repoDir);
      await remote.create();
      await remote.save('index', id('before'), Buffer.from('index from before'));
      const cacheModule = join(dirname(fileURLToPath(import.meta.url)), 'cache.js');
      const localModule = join(dirname(fileURLToPath(import.meta.url)), 'local.js');
      const child = spawnSync(
        process.execPath,
        [
          '--input-type=module',
          '-e',
          `const { withCache } = await import(${JSON.stringify(cacheModule)});
           const { LocalBackend } = await import(${JSON.stringify(localModule)});
           const cache = await withCache(new LocalBackend(${JSON.stringify(repoDir)}), { dir: ${JSON.stringify(root)} });
           await cache.deferUploads();
           await cache.save('data', '${id('p1')}', Buffer.alloc(100000, 1));
           await cache.save('index', '${id('i1')}', Buffer.from('index'));
           process.kill(process.pid, 'SIGKILL');`,
        ],
        { encoding: 'utf8' },
      );
      assert.equal(child.signal, 'SIGKILL', child.stderr);
      const dir = cacheFolderFor(root, repoDir);
      const spools = readdirSync(join(dir, 'spool'));
      assert.equal(spools.length, 1);
      assert.equal(filesUnder(join(dir, 'spool', spools[0]!)).filter((f) => !f.endsWith('owner')).length, 2, 'the spooled files are on disk (fsynced)');
      assert.deepEqual((await remote.list('data')).map((f) => f.name), [], 'no pack reached the remote');
      assert.deepEqual((await remote.list('index')).map((f) => f.name), [id('before')], 'the remote index is as it was');

      // A live process's spool (ours) stays; the dead one's goes with the next open.
      const ours = (await withCache(remote, { dir: root })) as CachedBackend;
      const deferred = await ours.deferUploads();
      assert.deepEqual(readdirSync(join(dir, 'spool')).length, 1, 'the next open deleted the dead spool; ours is new');
      assert.ok(!readdirSync(join(dir, 'spool')).includes(spools[0]!));
      await withCache(remote, { dir: root });
      assert.equal(readdirSync(join(dir, 'spool')).length, 1, 'a live process keeps its spool');
      assert.deepEqual(await removeStaleSpools(join(dir, 'spool')), []);
      await deferred.discard();
      assert.deepEqual(readdirSync(join(dir, 'spool')), []);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  });
});
