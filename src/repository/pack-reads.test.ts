/**
 * A restore's reads from a remote repository by pack (pack-reads.ts): the plan (grouping by pack,
 * merging near ranges, bounded reads), the number and size of requests the verification makes,
 * the write pass served from what the verification kept, and the same over a flaky store
 * (retries of merged ranges, short reads) and with damage on the remote or on this machine.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, openSync, readFileSync, readSync, readdirSync, readlinkSync, rmSync, writeSync, closeSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FileKind, SignedRequest } from '../backend/backend.js';
import { ForwardingBackend } from '../backend/forwarding.js';
import { localCopiesOf, withCache, type CachedBackend } from '../backend/cache.js';
import { FaultyBackend } from '../backend/faulty.js';
import { MemoryBackend } from '../backend/memory.js';
import { RetryBackend, type RetryEvent } from '../backend/retry.js';
import { CorruptArchiveError } from '../errors.js';
import type { BlobLocation } from './blob-index.js';
import { restoreVolumeToFolder, restoreVolumeVerifying } from './folder-restore.js';
import { DirectWriter } from './direct-writes.js';
import { PackReader, planPackReads } from './pack-reads.js';
import type { Repository } from './repository.js';
import { verifySnapshotVolume } from './restorer.js';
import { initTestRepository, instantClock, openTestRepository, prngBytes, writeSnapshot } from './testing.js';
import type { Snapshot, SnapshotVolume } from './tree.js';

const LOCATION = 's3:http://127.0.0.1:9000/bucket/repo';
const CHUNK = 64 * 1024;

/** What reaches the storage: every ranged load of a data pack (attempts of retries included), and how many ran at once. */
class Recorder extends ForwardingBackend {
  constructor(readonly memory: MemoryBackend) {
    super(memory);
  }

  readonly ranged: { pack: string; offset: number; length: number }[] = [];
  /** Packs not recorded (tree packs: the tests count reads of file data). */
  readonly ignore = new Set<string>();
  private running = 0;
  maxRunning = 0;

  override async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    if (kind !== 'data' || !range || this.ignore.has(name)) return this.inner.load(kind, name, range);
    this.ranged.push({ pack: name, ...range });
    this.maxRunning = Math.max(this.maxRunning, ++this.running);
    try {
      await new Promise((resolve) => setTimeout(resolve, 1));
      return await this.inner.load(kind, name, range);
    } finally {
      this.running--;
    }
  }
}


/**
 * A remote that signs loads (as S3 does) for an HTTP server on loopback serving the memory
 * backend's packs: what the workers download shows as `served`, what the main thread loads as
 * `ranged`. `reply` may change a reply (a status, damaged bytes).
 */
class SigningRecorder extends Recorder {
  readonly served: { pack: string; offset: number; length: number }[] = [];
  reply: (pack: string, bytes: Buffer) => { status: number; bytes: Buffer } = (_pack, bytes) => ({ status: 206, bytes });
  private server: Server | undefined;
  private port = 0;

  async start(): Promise<void> {
    this.server = createServer((request, response) => {
      const pack = /^\/data\/([0-9a-f]+)$/.exec(request.url ?? '')?.[1];
      const range = /^bytes=(\d+)-(\d+)$/.exec(request.headers['range'] ?? '');
      const whole = pack === undefined ? undefined : this.memory.raw('data', pack);
      if (request.headers['authorization'] !== 'signature' || !range || !whole) {
        response.writeHead(403).end();
        return;
      }
      const [offset, last] = [Number(range[1]), Number(range[2])];
      this.served.push({ pack: pack!, offset, length: last + 1 - offset });
      const { status, bytes } = this.reply(pack!, whole.subarray(offset, last + 1));
      response.writeHead(status, { 'content-length': bytes.length }).end(bytes);
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as AddressInfo).port;
  }

  async stop(): Promise<void> {
    await new Promise((resolve) => this.server?.close(resolve));
  }

  override readonly signedLoad = (kind: FileKind, name: string, range: { offset: number; length: number }): Promise<SignedRequest | undefined> =>
    Promise.resolve({ url: `http://127.0.0.1:${this.port}/${kind}/${name}`, headers: { authorization: 'signature', range: `bytes=${range.offset}-${range.offset + range.length - 1}` } });
}

/** A repository behind a signing remote and its cache, with reads kept; `fn` runs with them. */
async function withSigningRemote(
  work: string,
  input: Record<string, Buffer>,
  fn: (t: { remote: SigningRecorder; repo: Repository; volume: SnapshotVolume; pool: ReturnType<Repository['createChunkPool']>; kept: { end(): Promise<void> } }) => Promise<void>,
  flushEvery = 8,
): Promise<void> {
  const memory = new MemoryBackend({ location: LOCATION });
  const id = await writeSnapshot(await initTestRepository(memory), input, { chunk: CHUNK, flushEvery });
  const remote = new SigningRecorder(memory);
  await remote.start();
  const cache = (await withCache(remote, { dir: join(work, 'cache') })) as CachedBackend;
  const repo = await openTestRepository(cache);
  await repo.loadIndex();
  const volume = await volumeOf(repo, id);
  remote.ignore.add(repo.location(volume.tree)!.pack);
  const pool = repo.createChunkPool(2);
  const kept = await cache.keepReads();
  try {
    await fn({ remote, repo, volume, pool, kept });
  } finally {
    await kept.end();
    await pool.close();
    await remote.stop();
  }
}

async function withWork(fn: (work: string) => Promise<void>): Promise<void> {
  const work = mkdtempSync(join(tmpdir(), 'pack-reads-'));
  try {
    await fn(work);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** 24 files of 3 chunks each (72 data blobs) in 3 data packs; name → bytes. */
function files(seed = 1, count = 24): Record<string, Buffer> {
  const out: Record<string, Buffer> = {};
  for (let i = 0; i < count; i++) out[`f${String(i).padStart(2, '0')}.bin`] = prngBytes(seed + i, 3 * CHUNK - 100 * i);
  return out;
}

/** A reply function that flips a byte in the middle of the first reply only (damage on the way). */
function damageFirstReply(): (pack: string, bytes: Buffer) => { status: number; bytes: Buffer } {
  let damaged = 0;
  return (_pack, bytes) => {
    if (damaged++ > 0) return { status: 206, bytes };
    const copy = Buffer.from(bytes);
    copy[copy.length >> 1]! ^= 0xff;
    return { status: 206, bytes: copy };
  };
}

async function volumeOf(repo: Repository, id: string): Promise<SnapshotVolume> {
  return (await repo.loadObject<Snapshot>('snapshots', id)).volumes[0]!;
}

function folderContents(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of readdirSync(dir).sort()) out[name] = readFileSync(join(dir, name)).toString('base64');
  return out;
}

function expected(input: Record<string, Buffer>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of Object.keys(input).sort()) out[name] = input[name]!.toString('base64');
  return out;
}

function location(pack: string, offset: number, length: number): BlobLocation {
  return { pack, type: 'data', offset, length, rawLength: length };
}

void describe('planPackReads', () => {
  void it('groups blobs by pack (in the order they are first named), merges near neighbours, splits at wide gaps and at the length bound, reads a blob named twice once', () => {
    const plan = planPackReads(
      [
        { id: 'b2', where: location('B', 100, 50) },
        { id: 'a1', where: location('A', 0, 10) },
        { id: 'b1', where: location('B', 0, 100) }, // adjacent to b2: one read
        { id: 'a2', where: location('A', 15, 10) }, // a gap of 5: merged
        { id: 'a3', where: location('A', 100, 10) }, // a gap of 75: a read of its own
        { id: 'a1', where: location('A', 0, 10) },
        { id: 'b3', where: location('B', 150, 100) }, // would make B's read 250 long: split
        { id: 'c1', where: location('C', 0, 400) }, // longer than a read may be: alone
      ],
      { maxGap: 10, maxLength: 200 },
    );
    assert.deepEqual(
      plan.map((r) => [r.pack, r.offset, r.length, r.blobs.map((b) => b.id).join(',')]),
      [
        ['B', 0, 150, 'b1,b2'],
        ['B', 150, 100, 'b3'],
        ['A', 0, 25, 'a1,a2'],
        ['A', 100, 10, 'a3'],
        ['C', 0, 400, 'c1'],
      ],
    );
  });
});

void describe('a restore from a remote repository reads by pack', () => {
  void it('verification asks for each pack\'s blobs in one ranged read, several at once; the write pass then reads nothing from the remote and restores byte for byte', () =>
    withWork(async (work) => {
      const memory = new MemoryBackend({ location: LOCATION });
      const input = files();
      const id = await writeSnapshot(await initTestRepository(memory), input, { chunk: CHUNK, flushEvery: 8 });
      const packs = (await memory.list('data')).length;
      const recorder = new Recorder(memory);
      const cache = (await withCache(recorder, { dir: join(work, 'cache') })) as CachedBackend;
      const repo = await openTestRepository(cache);
      await repo.loadIndex();
      const volume = await volumeOf(repo, id);
      const pool = repo.createChunkPool(2);
      const kept = await cache.keepReads();
      try {
        await verifySnapshotVolume(repo, volume, { pool });
        // Today's code asked for every blob apart: 72 reads.
        assert.ok(packs >= 3, `${packs} data packs and tree packs`);
        assert.equal(recorder.ranged.length, 3, `one read per data pack: ${JSON.stringify(recorder.ranged)}`);
        assert.ok(recorder.maxRunning >= 2, `reads ran at once (${recorder.maxRunning})`);
        const target = join(work, 'restored');
        mkdirSync(target);
        await restoreVolumeToFolder(repo, volume, target, { pool });
        assert.equal(recorder.ranged.length, 3, 'the write pass read what the verification kept');
        assert.deepEqual(folderContents(target), expected(input));
      } finally {
        await kept.end();
        await pool.close();
      }
    }));

  void it('without kept reads (no cache) verification still reads by pack and checks every blob; damage in a needed blob is found, damage between needed blobs is not this snapshot\'s', () =>
    withWork(async () => {
      const memory = new MemoryBackend({ location: LOCATION });
      const writer = await initTestRepository(memory);
      const all = files(7, 6);
      const full = await writeSnapshot(writer, all, { chunk: CHUNK });
      const partOf = Object.fromEntries(Object.entries(all).filter(([name]) => name !== 'f02.bin'));
      const part = await writeSnapshot(writer, partOf, { chunk: CHUNK });
      const recorder = new Recorder(memory);
      const repo = await openTestRepository(recorder);
      await repo.loadIndex();
      for (const snapshot of [full, part]) recorder.ignore.add(repo.location((await volumeOf(repo, snapshot)).tree)!.pack);
      await verifySnapshotVolume(repo, await volumeOf(repo, part));
      assert.equal(recorder.ranged.length, 1, 'the skipped file\'s blobs are a gap inside one read');
      // Damage the middle blob of f02.bin (not in `part`): `part` is still whole, `full` is not.
      const tree = await repo.loadBlob((await volumeOf(repo, full)).tree);
      const f02 = (JSON.parse(tree.toString()) as { nodes: { name: string; content: string[] }[] }).nodes.find((n) => Buffer.from(n.name, 'base64').toString() === 'f02.bin')!;
      const where = repo.location(f02.content[1]!)!;
      memory.raw('data', where.pack)![where.offset + 20]! ^= 0xff;
      await verifySnapshotVolume(repo, await volumeOf(repo, part));
      await assert.rejects(verifySnapshotVolume(repo, await volumeOf(repo, full)), (error: Error) => {
        assert.ok(error instanceof CorruptArchiveError, String(error));
        assert.match(error.message, new RegExp(f02.content[1]!.slice(0, 12)));
        return true;
      });
    }));

  void it('reads in flight and their lengths stay bounded, however many blobs are added', async () => {
    const memory = new MemoryBackend({ location: LOCATION });
    const id = await writeSnapshot(await initTestRepository(memory), files(3, 40), { chunk: CHUNK, flushEvery: 4 });
    const recorder = new Recorder(memory);
    const repo = await openTestRepository(recorder);
    await repo.loadIndex();
    const volume = await volumeOf(repo, id);
    recorder.ignore.add(repo.location(volume.tree)!.pack);
    const tree = JSON.parse((await repo.loadBlob(volume.tree)).toString()) as { nodes: { content: string[] }[] };
    let checked = 0;
    const counted = new PackReader(repo, { concurrency: 3, windowBlobs: 16, plan: { maxGap: 1024, maxLength: 4 * CHUNK }, onBlob: () => checked++ });
    for (const node of tree.nodes) for (const ref of node.content) await counted.add(ref);
    await counted.finish();
    assert.equal(checked, 120, 'every blob checked once');
    assert.ok(recorder.maxRunning <= 3, `at most 3 reads at once (${recorder.maxRunning})`);
    assert.ok(
      recorder.ranged.every((r) => r.length <= 4 * CHUNK + 64),
      'no read longer than the bound (a sealed blob is a little longer than its chunk)',
    );
    assert.ok(recorder.ranged.length <= 40, `far fewer reads than blobs: ${recorder.ranged.length}`);
  });

  void it('over a flaky store (resets, throttling, dropped and short reads of merged ranges, retried) the restore is byte-exact', () =>
    withWork(async (work) => {
      const memory = new MemoryBackend({ location: LOCATION });
      const input = files(11);
      const id = await writeSnapshot(await initTestRepository(memory), input, { chunk: CHUNK, flushEvery: 6 });
      const recorder = new Recorder(memory);
      const faulty = new FaultyBackend(recorder, { random: { seed: 5, probability: { load: 0.4 }, kinds: ['reset', 'throttle', 'drop', 'short-read'] } });
      const events: RetryEvent[] = [];
      const retry = new RetryBackend(faulty, { clock: instantClock(), random: () => 0.5, onRetry: (e) => events.push(e) });
      const cache = (await withCache(retry, { dir: join(work, 'cache') })) as CachedBackend;
      const repo = await openTestRepository(cache);
      await repo.loadIndex();
      const volume = await volumeOf(repo, id);
      const pool = repo.createChunkPool(2);
      const kept = await cache.keepReads();
      try {
        await verifySnapshotVolume(repo, volume, { pool });
        assert.ok(events.some((e) => e.reason === 'short read'), `a short read was retried: ${events.map((e) => e.reason).join(', ')}`);
        const merged = recorder.ranged.filter((r) => r.length > 2 * CHUNK);
        assert.ok(merged.length > 0, 'merged ranges were read');
        assert.ok((faulty.randomFaults.get('short-read') ?? 0) + (faulty.randomFaults.get('drop') ?? 0) > 0, 'transfers were cut');
        const target = join(work, 'restored');
        mkdirSync(target);
        await restoreVolumeToFolder(repo, volume, target, { pool });
        assert.deepEqual(folderContents(target), expected(input));
      } finally {
        await kept.end();
        await pool.close();
      }
    }));

  void it('a kept copy damaged on this machine is dropped and read again from the remote: the restore is still byte-exact', () =>
    withWork(async (work) => {
      const memory = new MemoryBackend({ location: LOCATION });
      const input = files(21, 8);
      const id = await writeSnapshot(await initTestRepository(memory), input, { chunk: CHUNK });
      const recorder = new Recorder(memory);
      const cache = (await withCache(recorder, { dir: join(work, 'cache') })) as CachedBackend;
      const repo = await openTestRepository(cache);
      await repo.loadIndex();
      const volume = await volumeOf(repo, id);
      const pool = repo.createChunkPool(2);
      const kept = await cache.keepReads();
      try {
        await verifySnapshotVolume(repo, volume, { pool });
        const reads = recorder.ranged.length;
        // Flip bytes all over the kept file (a disk that lies).
        const tree = JSON.parse((await repo.loadBlob(volume.tree)).toString()) as { nodes: { content: string[] }[] };
        const first = repo.location(tree.nodes[0]!.content[0]!)!;
        const path = cache.keptAt(first.pack, first)!.path;
        const fd = openSync(path, 'r+');
        const byte = Buffer.alloc(1);
        for (let at = 100; readSync(fd, byte, 0, 1, at) === 1; at += 50_000) {
          byte[0]! ^= 0xff;
          writeSync(fd, byte, 0, 1, at);
        }
        closeSync(fd);
        const target = join(work, 'restored');
        mkdirSync(target);
        await restoreVolumeToFolder(repo, volume, target, { pool });
        assert.ok(recorder.ranged.length > reads, 'damaged blobs were read from the remote');
        assert.deepEqual(folderContents(target), expected(input));
      } finally {
        await kept.end();
        await pool.close();
      }
    }));

  void it('with a remote that signs loads, the workers download each pack read themselves: the main thread loads nothing, the write pass reads the kept copies, the restore is byte-exact', () =>
    withWork(async (work) => {
      const input = files(31);
      await withSigningRemote(work, input, async ({ remote, repo, volume, pool }) => {
        await verifySnapshotVolume(repo, volume, { pool });
        assert.equal(remote.served.length, 3, `one download per data pack, on the workers: ${JSON.stringify(remote.served)}`);
        assert.deepEqual(remote.ranged, [], 'no data read on the main thread');
        const target = join(work, 'restored');
        mkdirSync(target);
        await restoreVolumeToFolder(repo, volume, target, { pool });
        assert.equal(remote.served.length + remote.ranged.length, 3, 'the write pass read what the workers kept');
        assert.deepEqual(folderContents(target), expected(input));
      });
    }));

  void it('downloads that fail on the workers (HTTP 503, a short body) are made again through the backend; after three failures without a success the workers are not asked again', () =>
    withWork(async (work) => {
      const input = files(41);
      await withSigningRemote(work, input, async ({ remote, repo, volume, pool }) => {
        remote.reply = (_pack, bytes) => (remote.served.length % 2 === 1 ? { status: 503, bytes: Buffer.alloc(0) } : { status: 206, bytes: bytes.subarray(0, bytes.length - 1) });
        await verifySnapshotVolume(repo, volume, { pool });
        const packs = new Set(remote.ranged.map((r) => r.pack)).size;
        assert.equal(remote.ranged.length, packs, 'every pack read once through the backend');
        assert.ok(packs >= 12, `${packs} packs`);
        // Five reads run at once: a few more may start before the third failure is counted.
        assert.ok(remote.served.length >= 3 && remote.served.length <= 8, `a few failed downloads on the workers, then none (${remote.served.length} of ${packs})`);
        const target = join(work, 'restored');
        mkdirSync(target);
        await restoreVolumeToFolder(repo, volume, target, { pool });
        assert.deepEqual(folderContents(target), expected(input));
      }, 2);
    }));

  void it('a blob damaged in a worker\'s download is read again through the backend (the remote decides), and the restore is byte-exact', () =>
    withWork(async (work) => {
      const input = files(51);
      await withSigningRemote(work, input, async ({ remote, repo, volume, pool }) => {
        remote.reply = damageFirstReply();
        await verifySnapshotVolume(repo, volume, { pool });
        assert.equal(remote.served.length, 3);
        assert.equal(remote.ranged.length, 1, `the damaged blob was read again: ${JSON.stringify(remote.ranged)}`);
        const target = join(work, 'restored');
        mkdirSync(target);
        await restoreVolumeToFolder(repo, volume, target, { pool });
        assert.deepEqual(folderContents(target), expected(input));
      });
    }));

  void it('damage on the remote itself, in a blob the workers download, fails the verification', () =>
    withWork(async (work) => {
      const input = files(61, 6);
      await withSigningRemote(work, input, async ({ remote, repo, volume, pool }) => {
        const tree = JSON.parse((await repo.loadBlob(volume.tree)).toString()) as { nodes: { content: string[] }[] };
        const victim = tree.nodes[2]!.content[1]!;
        const where = repo.location(victim)!;
        remote.memory.raw('data', where.pack)![where.offset + 30]! ^= 0xff;
        await assert.rejects(verifySnapshotVolume(repo, volume, { pool }), (error: Error) => {
          assert.ok(error instanceof CorruptArchiveError, String(error));
          assert.match(error.message, new RegExp(victim.slice(0, 12)));
          return true;
        });
        assert.ok(remote.served.length > 0, 'the workers downloaded');
      });
    }));

  void it('once written, the workers close the kept reads file (closeFiles) and ending them leaves no descriptor of this process on it: its dirty pages are dropped, not written by the volumes\' sync', () =>
    withWork(async (work) => {
      const input = files(71, 8);
      await withSigningRemote(work, input, async ({ repo, volume, pool, kept }) => {
        const cache = localCopiesOf(repo.backend)!;
        await verifySnapshotVolume(repo, volume, { pool });
        const tree = JSON.parse((await repo.loadBlob(volume.tree)).toString()) as { nodes: { content: string[] }[] };
        const first = repo.location(tree.nodes[0]!.content[0]!)!;
        const path = cache.keptAt(first.pack, first)!.path;
        const target = join(work, 'restored');
        mkdirSync(target);
        await restoreVolumeToFolder(repo, volume, target, { pool });
        const holding = (): string[] =>
          readdirSync('/proc/self/fd').flatMap((fd) => {
            try {
              const link = readlinkSync(join('/proc/self/fd', fd));
              return link.startsWith(path) ? [link] : [];
            } catch {
              return [];
            }
          });
        assert.ok(holding().length >= 2, `the workers and the cache read it: ${holding().join(', ')}`);
        await pool.closeFiles();
        // What snapshot-restore's written() does next: the kept reads end (closed, deleted).
        await kept.end();
        assert.deepEqual(holding(), [], 'no descriptor left on the kept reads');
        assert.deepEqual(folderContents(target), expected(input));
      });
    }));

  void it('a worker that cannot write its download into the kept reads still authenticates it; the range is not taken as kept, and the write pass reads it from the remote', () =>
    withWork(async (work) => {
      const input = files(81, 8);
      await withSigningRemote(work, input, async ({ remote, repo, volume, pool }) => {
        const cache = localCopiesOf(repo.backend)!;
        // The kept reads' file is gone from its folder (a hand, a cleaner): the workers cannot open it.
        const room = cache.reserveKept('0'.repeat(64), { offset: 0, length: 1 })!;
        rmSync(room.path);
        await verifySnapshotVolume(repo, volume, { pool });
        assert.ok(remote.served.length > 0, 'downloaded on the workers');
        assert.deepEqual(remote.ranged, [], 'authenticated there');
        const target = join(work, 'restored');
        mkdirSync(target);
        await restoreVolumeToFolder(repo, volume, target, { pool });
        assert.ok(remote.ranged.length > 0, 'the write pass read from the remote');
        assert.deepEqual(folderContents(target), expected(input));
      });
    }));

  void it('one pass (restoreVolumeVerifying): the writes wait for the download by pack alongside and read the kept copies; nothing is loaded twice, the restore is byte-exact', () =>
    withWork(async (work) => {
      const input = files(71);
      await withSigningRemote(work, input, async ({ remote, repo, volume, pool }) => {
        const target = join(work, 'restored');
        mkdirSync(target);
        const result = await restoreVolumeVerifying(repo, volume, target, { pool });
        assert.equal(remote.served.length, 3, `one download per data pack, on the workers: ${JSON.stringify(remote.served)}`);
        assert.deepEqual(remote.ranged, [], 'no blob read on its own: every write waited for the download');
        assert.deepEqual(folderContents(target), expected(input));
        assert.equal(result.stats.files, 24);
      });
    }));

  void it('one pass: damage on the remote fails the restore with the damage (not a stuck or aborted write), and no write waits on', () =>
    withWork(async (work) => {
      const input = files(81, 6);
      await withSigningRemote(work, input, async ({ remote, repo, volume, pool }) => {
        const tree = JSON.parse((await repo.loadBlob(volume.tree)).toString()) as { nodes: { content: string[] }[] };
        const victim = tree.nodes[4]!.content[0]!;
        const where = repo.location(victim)!;
        remote.memory.raw('data', where.pack)![where.offset + 30]! ^= 0xff;
        const target = join(work, 'restored');
        mkdirSync(target);
        await assert.rejects(restoreVolumeVerifying(repo, volume, target, { pool }), (error: Error) => {
          assert.ok(error instanceof CorruptArchiveError, String(error));
          assert.match(error.message, new RegExp(victim.slice(0, 12)));
          return true;
        });
      });
    }));

  void it('one pass: a download damaged on the way is not checked by the download but by the write, which reads that blob again from the remote; byte-exact', () =>
    withWork(async (work) => {
      const input = files(91);
      await withSigningRemote(work, input, async ({ remote, repo, volume, pool }) => {
        remote.reply = damageFirstReply();
        const target = join(work, 'restored');
        mkdirSync(target);
        await restoreVolumeVerifying(repo, volume, target, { pool });
        assert.equal(remote.served.length, 3);
        assert.ok(remote.ranged.length >= 1, `the damaged blob was read again from the remote: ${JSON.stringify(remote.ranged)}`);
        assert.deepEqual(folderContents(target), expected(input));
      });
    }));

  void it('one pass without signed requests (SFTP, rest): each pack read is made here once and handed to a worker that writes the files; several windows, reads bounded; nothing kept on this machine; byte-exact', () =>
    withWork(async (work) => {
      const memory = new MemoryBackend({ location: LOCATION });
      const input = files(101, 40);
      const id = await writeSnapshot(await initTestRepository(memory), input, { chunk: CHUNK, flushEvery: 8 });
      const recorder = new Recorder(memory);
      const cache = (await withCache(recorder, { dir: join(work, 'cache') })) as CachedBackend;
      const repo = await openTestRepository(cache);
      await repo.loadIndex();
      const volume = await volumeOf(repo, id);
      recorder.ignore.add(repo.location(volume.tree)!.pack);
      const pool = repo.createChunkPool(2);
      // Reads are kept (as in every restore from a remote), but a one-pass write reads each range once.
      const kept = await cache.keepReads();
      try {
        const target = join(work, 'restored');
        mkdirSync(target);
        // Windows of 8 files: 40 files make 5 of them.
        await restoreVolumeToFolder(repo, volume, target, { pool, direct: new DirectWriter(repo, pool, { maxFiles: 8, concurrency: 3 }) });
        assert.deepEqual(folderContents(target), expected(input));
        assert.ok(recorder.ranged.length >= 5 && recorder.ranged.length < 40, `a few reads per window, not one per blob (${recorder.ranged.length} reads for 120 chunks)`);
        assert.ok(recorder.maxRunning <= 3, `at most 3 reads at once (${recorder.maxRunning})`);
        assert.ok(recorder.ranged.every((r) => r.length <= 4 << 20));
        const copies = recorder.ranged.filter((r) => cache.keptAt(r.pack, r) !== undefined);
        assert.deepEqual(copies, [], 'no copy of what the one pass read was written on this machine');
      } finally {
        await kept.end();
        await pool.close();
      }
    }));
});
