/**
 * What the archiver reads from a volume that a container changes under it.
 *
 * The hostile test archives a volume, pass after pass (tolerant passes as phase 1, final passes as
 * phase 2 or --mode offline, with and without worker threads), while another process swaps its
 * folders for links to a folder of canaries outside it, and its files for links to canaries,
 * FIFOs and device nodes. The passes run in a child process that is killed if it hangs (a FIFO
 * opened for reading, or /dev/zero read to its end, would block it). Then every blob of the
 * repository is decrypted: no canary byte may be in any; every file a tree holds has the bytes of
 * the volume's file of that name.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Repository } from './repository.js';
import { LocalBackend } from '../backend/local.js';
import { FaultyBackend } from '../backend/faulty.js';
import { Archiver, type ArchiveOptions } from './archiver.js';
import { isZeroChunk, type Tree, type TreeNode } from './tree.js';
import { nativeWalk } from '../fs/native-walk.js';
import { nativeUnavailableReason } from '../fs/native.js';
import { makeHostileVolume } from '../../test/fixture/hostile-volume.js';
import { startSwapper } from '../../test/fixture/swapper.js';

const fastKdf = { algorithm: 'scrypt' as const, N: 1024, r: 8, p: 1 };
const SELF = fileURLToPath(import.meta.url);
const isRoot = process.getuid?.() === 0;

interface PassRecord {
  kind: 'tolerant' | 'final';
  workers: boolean;
  /** The pass's tree; undefined if it failed. */
  tree?: string;
  error?: string;
  warnings: string[];
}

interface ChildConfig {
  repo: string;
  volume: string;
  rounds: number;
  /** Where the child writes its result (JSON), after every pass. */
  result: string;
}

interface ChildResult {
  passes: PassRecord[];
  /** Descriptors of the child still open after the passes, outside the repository. */
  leftOpen?: string[];
}

/**
 * The passes, run in a child process (see the file header). A failed pass is recorded and the
 * next one runs; the index is written after every pass, and the result too, so that even a pass
 * that hangs (and is killed) leaves in the repository what the passes before it stored.
 */
async function runPasses(config: ChildConfig): Promise<void> {
  const repo = await Repository.open(new LocalBackend(config.repo), 'pw');
  await repo.loadIndex();
  const pool = repo.createChunkPool(2);
  const result: ChildResult = { passes: [] };
  const pass = async (record: PassRecord, options: ArchiveOptions, parent: string | undefined): Promise<string | undefined> => {
    result.passes.push(record);
    try {
      record.tree = (await new Archiver(repo, { ...options, onWarning: (m) => record.warnings.push(m) }).archive(config.volume, parent)).tree;
    } catch (error) {
      record.error = String(error);
    }
    await repo.flush();
    writeFileSync(config.result, JSON.stringify(result));
    return record.tree;
  };
  try {
    let previous: string | undefined;
    for (let round = 0; round < config.rounds; round++) {
      const workers = round % 3 !== 2;
      const since = BigInt(Date.now()) * 1_000_000n - 2_000_000_000n;
      const precopy = await pass({ kind: 'tolerant', workers: true, warnings: [] }, { pool, tolerateChanges: true }, previous);
      // Every fourth final pass has no parent: a first backup with --mode offline.
      const parent = round % 4 === 3 ? undefined : precopy;
      previous = await pass({ kind: 'final', workers, warnings: [] }, { ...(workers ? { pool } : {}), racySinceNs: since }, parent);
    }
    const work = dirname(config.volume);
    result.leftOpen = readdirSync('/proc/self/fd')
      .map((fd) => readlinkOrEmpty(`/proc/self/fd/${fd}`))
      .filter((target) => target.startsWith(work) && !target.startsWith(config.repo));
    writeFileSync(config.result, JSON.stringify(result));
  } finally {
    await pool.close();
  }
}

/** Runs the passes in a child process, killed after `timeoutMs`; what they left, and what went wrong. */
function passesInChild(config: ChildConfig, timeoutMs: number): Promise<{ result: ChildResult; problem: string | undefined }> {
  const child = spawn(process.execPath, [SELF], { env: { ...process.env, ARCHIVER_TEST_PASSES: JSON.stringify(config) }, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve) => {
    let problem: string | undefined;
    const timer = setTimeout(() => {
      problem = `the archiver hung: no result after ${timeoutMs / 1000} s`;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('close', (code) => {
      clearTimeout(timer);
      if (code !== 0) problem ??= `the archiver failed (exit ${code}): ${err}`;
      let result: ChildResult = { passes: [] };
      try {
        result = JSON.parse(readFileSync(config.result, 'utf8')) as ChildResult;
      } catch {
        // no pass finished
      }
      resolve({ result, problem });
    });
  });
}

async function content(repo: Repository, node: TreeNode): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (const id of node.content ?? []) parts.push(isZeroChunk(id) ? Buffer.alloc(Number(id.split(':')[1])) : await repo.loadBlob(id));
  return Buffer.concat(parts);
}

/** Every node of a tree, with its path relative to the volume. */
async function* walk(repo: Repository, tree: string, prefix = ''): AsyncGenerator<{ rel: string; node: TreeNode }> {
  const { nodes } = JSON.parse((await repo.loadBlob(tree)).toString('utf8')) as Tree;
  for (const node of nodes) {
    const rel = `${prefix}${Buffer.from(node.name, 'base64').toString('utf8')}`;
    yield { rel, node };
    if (node.type === 'dir' && node.subtree) yield* walk(repo, node.subtree, `${rel}/`);
  }
}

if (process.env['ARCHIVER_TEST_PASSES']) {
  await runPasses(JSON.parse(process.env['ARCHIVER_TEST_PASSES']) as ChildConfig);
} else {
  /** Passes while `hostile`'s swapper runs; checks the repository they leave (see the file header). */
  const againstSwapper = async (t: TestContext, specials: boolean): Promise<void> => {
    const work = mkdtempSync(join(tmpdir(), 'archiver-hostile-'));
    try {
      const hostile = makeHostileVolume(work, { specials });
      const repoPath = join(work, 'repo');
      await Repository.init(new LocalBackend(repoPath), 'pw', { kdf: fastKdf });
      const swapper = await startSwapper(hostile.plan);
      let run;
      try {
        run = await passesInChild({ repo: repoPath, volume: hostile.volume, rounds: 24, result: join(work, 'result.json') }, 120_000);
      } finally {
        const cycles = await swapper.stop();
        assert.ok(cycles > 0, 'the swapper ran');
      }
      const { result, problem } = run;

      // First what matters most, whatever else went wrong: no canary byte in any blob stored.
      const repo = await Repository.open(new LocalBackend(repoPath), 'pw');
      await repo.loadIndex();
      let blobs = 0;
      for (const [id] of repo.blobIds()) {
        const plain = await repo.loadBlob(id);
        assert.equal(plain.includes(hostile.marker), false, `blob ${id.slice(0, 12)} holds canary bytes`);
        blobs++;
      }
      assert.equal(problem, undefined);
      assert.deepEqual(result.passes.filter((p) => p.error !== undefined).map((p) => `${p.kind}: ${p.error}`), [], 'every pass finished');
      assert.equal(result.passes.length, 48);
      assert.ok(blobs > 10, `${blobs} blobs`);
      assert.deepEqual(result.leftOpen, [], 'every descriptor the passes opened is closed');

      // What the trees hold: stable files always, right; a swapped name as whatever it was then;
      // every file's bytes those of the volume's file of that name.
      const seen = new Map<string, number>();
      const note = (what: string): void => void seen.set(what, (seen.get(what) ?? 0) + 1);
      for (const pass of result.passes) {
        const found = new Map<string, TreeNode>();
        for await (const { rel, node } of walk(repo, pass.tree!)) {
          found.set(rel, node);
          if (hostile.swapped.includes(rel)) note(`${rel} as ${node.type}`);
          if (node.type !== 'file' || node.hardlink !== undefined) continue;
          const expected = hostile.files.get(rel);
          assert.ok(expected, `${pass.kind} pass: a file '${rel}' that the volume does not have`);
          if (node.content === undefined) {
            assert.equal(pass.kind, 'tolerant', `${pass.kind} pass: '${rel}' has no content`);
            note('left for the next pass');
            continue;
          }
          assert.ok((await content(repo, node)).equals(expected), `${pass.kind} pass: '${rel}' holds other bytes than the volume's file`);
        }
        for (const rel of hostile.swapped) if (!found.has(rel)) note(`${rel} left out`);
        if (pass.kind === 'final') {
          for (const rel of hostile.stable) assert.ok(found.get(rel), `final pass: stable '${rel}' is missing`);
          assert.equal(found.get('stable/hard-b')?.hardlink, Buffer.from('stable/hard-a').toString('base64'));
          assert.equal(found.get('stable/fifo')?.type, 'fifo');
          assert.equal(found.get('stable/link')?.type, 'symlink');
        }
        for (const warning of pass.warnings) note(`warning: ${warning.replace(/ changed.*/, '')}`);
      }
      // It truly raced: the passes saw the swapped states, not only the volume at rest.
      const raced = [...seen].filter(([what]) => !/as (file|dir)$/.test(what));
      assert.ok(raced.length > 0, `no pass saw a swap: ${JSON.stringify([...seen])}`);
      t.diagnostic(`observed over ${result.passes.length} passes: ${JSON.stringify(Object.fromEntries(seen))}`);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  };

  void describe('Archiver on a volume that another process changes under it', () => {
    void it('folders and files swapped for links to canaries outside: no canary byte is stored, every file kept is right', { timeout: 300_000 }, (t) =>
      againstSwapper(t, false),
    );
    void it(`files swapped for FIFOs${isRoot ? ' and device nodes (/dev/zero, /dev/urandom)' : ''} too: nothing blocks, nothing is read from them`, { timeout: 300_000 }, (t) =>
      againstSwapper(t, true),
    );
  });

  void describe('Archiver closes every descriptor it opens', () => {
    /** Descriptors open on files of the test's volume. */
    const volumeFds = (): string[] => readdirSync('/proc/self/fd').filter((fd) => readlinkOrEmpty(`/proc/self/fd/${fd}`).startsWith(volume));
    /** Files open in `repo` (the packs being filled stream into temporary files there). */
    const repoFiles = (repo: string): string[] =>
      readdirSync('/proc/self/fd')
        .map((fd) => readlinkOrEmpty(`/proc/self/fd/${fd}`))
        .filter((target) => target.startsWith(repo));
    /** Temporary files left in `repo`'s data folders. */
    const temporaries = (repo: string): string[] =>
      readdirSync(join(repo, 'data'), { recursive: true, encoding: 'utf8' }).filter((name) => basename(name).startsWith('.tmp-'));
    /** Runs `hook` when the first sealed chunk reaches the repository: workers are reading then. */
    const onFirstChunk = (repo: Repository, hook: () => void): void => {
      const save = repo.saveSealedBlob.bind(repo);
      let first = true;
      repo.saveSealedBlob = (...args) => {
        if (first) hook();
        first = false;
        return save(...args);
      };
    };
    let work: string;
    let volume: string;

    before(() => {
      work = mkdtempSync(join(tmpdir(), 'archiver-fds-'));
      volume = join(work, 'volume');
      mkdirSync(join(volume, 'd'), { recursive: true });
      for (let i = 0; i < 12; i++) writeFileSync(join(volume, 'd', `big-${i}`), randomBytes(3 << 20));
      for (let i = 0; i < 50; i++) writeFileSync(join(volume, 'd', `small-${i}`), `small ${i}`);
    });
    after(() => rmSync(work, { recursive: true, force: true }));

    void it('when the backup is aborted while workers read', async () => {
      const repo = await Repository.init(new LocalBackend(join(work, 'repo-abort')), 'pw', { kdf: fastKdf });
      const pool = repo.createChunkPool(2);
      try {
        const controller = new AbortController();
        onFirstChunk(repo, () => controller.abort());
        const offered: string[] = [];
        const save = repo.saveSealedBlob.bind(repo);
        repo.saveSealedBlob = (id, ...rest) => {
          offered.push(id);
          return save(id, ...rest);
        };
        await assert.rejects(new Archiver(repo, { pool, signal: controller.signal }).archive(volume, undefined), { name: 'AbortError' });
        assert.deepEqual(volumeFds(), []);
        // The backup that gave up drops the packs it was filling: their files closed and deleted.
        assert.ok(repoFiles(join(work, 'repo-abort')).length > 0, 'a pack was being filled');
        await repo.abandonWrites();
        assert.deepEqual(repoFiles(join(work, 'repo-abort')), []);
        assert.deepEqual(temporaries(join(work, 'repo-abort')), []);
        // ... and forgets their blobs: the repository claims only what is stored, so a later save stores them.
        assert.ok(offered.length > 0);
        assert.deepEqual(
          offered.filter((id) => repo.has(id) && repo.location(id) === undefined),
          [],
          'no blob of a dropped pack is taken as stored',
        );
      } finally {
        await pool.close();
      }
    });

    void it('when storing a chunk fails', async () => {
      const backend = new FaultyBackend(new LocalBackend(join(work, 'repo-fault')), { failSaves: { kind: 'data', nth: [1, 2, 3] } });
      const repo = await Repository.init(backend, 'pw', { kdf: fastKdf });
      const pool = repo.createChunkPool(2);
      try {
        await assert.rejects(new Archiver(repo, { pool }).archive(volume, undefined), /injected fault/);
        assert.deepEqual(volumeFds(), []);
        await repo.abandonWrites();
        assert.deepEqual(repoFiles(join(work, 'repo-fault')), []);
        assert.deepEqual(temporaries(join(work, 'repo-fault')), []);
      } finally {
        await pool.close();
      }
    });

    void it('(and counts every sealed byte it adds, with many files in flight)', async () => {
      const repo = await Repository.init(new LocalBackend(join(work, 'repo-count')), 'pw', { kdf: fastKdf });
      const pool = repo.createChunkPool(2);
      try {
        // A slow store (as a pack write is now and then): chunks of other files arrive meanwhile.
        const save = repo.saveSealedBlob.bind(repo);
        repo.saveSealedBlob = async (...args) => {
          await new Promise((resolve) => setTimeout(resolve, 1));
          return save(...args);
        };
        const archiver = new Archiver(repo, { pool });
        await archiver.archive(volume, undefined);
        await repo.flush();
        let stored = 0;
        for (const [, where] of repo.blobIds()) stored += where.length;
        assert.equal(archiver.stats.bytesAdded, stored);
        assert.deepEqual(volumeFds(), []);
      } finally {
        await pool.close();
      }
    });

    void it('when the worker threads end while they read', async () => {
      const repo = await Repository.init(new LocalBackend(join(work, 'repo-workers')), 'pw', { kdf: fastKdf });
      const pool = repo.createChunkPool(2);
      let closing: Promise<void> | undefined;
      onFirstChunk(repo, () => void (closing = pool.close()));
      await assert.rejects(new Archiver(repo, { pool }).archive(volume, undefined), /worker/);
      await closing;
      assert.deepEqual(volumeFds(), []);
      await repo.abandonWrites();
      assert.deepEqual(repoFiles(join(work, 'repo-workers')), []);
      assert.deepEqual(temporaries(join(work, 'repo-workers')), []);
    });
  });

  void describe('the native walk and the plain walk', { skip: !nativeWalk() && `no native walk: ${nativeUnavailableReason() || 'an old build'}` }, () => {
    void it('make the same trees (same ids), first backup and nothing-changed backup, each as the parent of the other', async () => {
      const work = mkdtempSync(join(tmpdir(), 'archiver-walks-'));
      try {
        const volume = join(work, 'volume');
        mkdirSync(join(volume, 'a', 'b', 'c'), { recursive: true });
        mkdirSync(join(volume, 'empty'));
        mkdirSync(join(volume, '.cvat-backup-retired'));
        for (let d = 0; d < 12; d++) {
          mkdirSync(join(volume, 'jobs', `job${d}`), { recursive: true });
          for (let i = 0; i < 150; i++) writeFileSync(join(volume, 'jobs', `job${d}`, `frame${i}.json`), `{"frame": ${d * 1000 + i}}\n`);
        }
        const sneaky = join(volume, 'jobs', 'job6', 'frame8.json');
        utimesSync(sneaky, 1_000_000_000, 1_000_000_000); // whole seconds: put back exactly below
        writeFileSync(join(volume, 'a', 'b', 'c', 'big.bin'), randomBytes(300_000));
        writeFileSync(join(volume, 'a', 'zeros'), Buffer.alloc(100_000));
        writeFileSync(join(volume, 'a', 'empty-file'), '');
        writeFileSync(Buffer.concat([Buffer.from(`${volume}/a/`), Buffer.from([0xff, 0x0a, 0x20, 0x41])]), 'odd name');
        // Hard links across folders: the first name in tree order is the one stored.
        writeFileSync(join(volume, 'jobs', 'job3', 'linked'), 'linked');
        execFileSync('ln', [join(volume, 'jobs', 'job3', 'linked'), join(volume, 'a', 'b', 'linked-too')]);
        execFileSync('ln', [join(volume, 'jobs', 'job3', 'linked'), join(volume, 'z-last')]);
        symlinkSync('../../etc/passwd', join(volume, 'a', 'link'));
        execFileSync('mkfifo', [join(volume, 'a', 'fifo')]);
        if (isRoot) execFileSync('mknod', [join(volume, 'a', 'zero'), 'c', '1', '5']);
        const repo = await Repository.init(new LocalBackend(join(work, 'repo')), 'pw', { kdf: fastKdf });
        const pool = repo.createChunkPool(2);
        try {
          const archive = async (walk: 'native' | 'plain', parent: string | undefined): Promise<string> => {
            const { tree } = await new Archiver(repo, { pool, walk, onWarning: () => undefined }).archive(volume, parent);
            await repo.flush();
            return tree;
          };
          const nativeFirst = await archive('native', undefined);
          const plainFirst = await archive('plain', undefined);
          assert.equal(nativeFirst, plainFirst);
          assert.equal(await archive('native', plainFirst), plainFirst);
          assert.equal(await archive('plain', nativeFirst), nativeFirst);
          // Something changed: a new file deep down, a file rewritten, a folder's mode, and a file
          // rewritten in place with the same size and its mtime put back (only its ctime moved).
          writeFileSync(sneaky, readFileSync(sneaky, 'utf8').replace('6008', '9999'));
          utimesSync(sneaky, 1_000_000_000, 1_000_000_000);
          assert.equal(statSync(sneaky, { bigint: true }).mtimeNs, 1_000_000_000_000_000_000n);
          writeFileSync(join(volume, 'a', 'b', 'c', 'new'), 'new');
          writeFileSync(join(volume, 'jobs', 'job5', 'frame7.json'), 'rewritten, longer than before');
          chmodSync(join(volume, 'jobs', 'job9'), 0o700);
          const nativeNext = await archive('native', nativeFirst);
          assert.notEqual(nativeNext, nativeFirst);
          assert.equal(await archive('plain', plainFirst), nativeNext);
          await repo.flush();
          const nodes = new Map<string, TreeNode>();
          for await (const { rel, node } of walk(repo, nativeNext)) nodes.set(rel, node);
          assert.equal(nodes.get('a/b/linked-too')?.content?.length, 1);
          assert.equal(Buffer.from(nodes.get('jobs/job3/linked')!.hardlink!, 'base64').toString(), 'a/b/linked-too');
          assert.equal((await content(repo, nodes.get('jobs/job5/frame7.json')!)).toString(), 'rewritten, longer than before');
          assert.equal((await content(repo, nodes.get('jobs/job6/frame8.json')!)).toString(), '{"frame": 9999}\n');
          assert.equal(nodes.has('.cvat-backup-retired'), false);
        } finally {
          await pool.close();
        }
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
    });
  });

  void describe("cvat-backup's own folders", () => {
    void it('are left out at the volume root with a warning, and kept below it', async () => {
      const work = mkdtempSync(join(tmpdir(), 'archiver-own-'));
      try {
        const volume = join(work, 'volume');
        mkdirSync(join(volume, '.cvat-backup-retired', 'old'), { recursive: true });
        writeFileSync(join(volume, '.cvat-backup-retired', 'old', 'frame.jpg'), 'old data');
        mkdirSync(join(volume, 'data'));
        writeFileSync(join(volume, 'data', '.cvat-backup-notes'), 'user data');
        writeFileSync(join(volume, 'frame.jpg'), 'new data');
        const repo = await Repository.init(new LocalBackend(join(work, 'repo')), 'pw', { kdf: fastKdf });
        const warnings: string[] = [];
        const { tree } = await new Archiver(repo, { onWarning: (m) => warnings.push(m) }).archive(volume, undefined);
        await repo.flush();
        const paths: string[] = [];
        for await (const { rel } of walk(repo, tree)) paths.push(rel);
        assert.deepEqual(paths.sort(), ['data', 'data/.cvat-backup-notes', 'frame.jpg']);
        assert.equal(warnings.length, 1);
        assert.match(warnings[0]!, /\.cvat-backup-retired.*left out/);
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
    });
  });
}

function readlinkOrEmpty(path: string): string {
  try {
    return readlinkSync(path);
  } catch {
    return '';
  }
}
