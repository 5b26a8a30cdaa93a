/**
 * The archiver's journal pass (issue 10): given what changed since a tolerant pass began, the final
 * pass visits only that, and must build exactly the tree a full walk of the folder builds at that
 * moment (same tree ids: same names, owners, modes, times, bytes). Each case runs on a real folder:
 * a tolerant pass (phase 1), then changes, the journal's report of them written by hand (the form
 * fs/change-journal.ts defines), then a journal pass compared with a full walk from scratch.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmodSync, linkSync, mkdirSync, mkdtempSync, renameSync, rmSync, statSync, symlinkSync, unlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Repository } from './repository.js';
import { LocalBackend } from '../backend/local.js';
import { Archiver, type ArchiveResult, type PassFacts } from './archiver.js';
import { isZeroChunk, type Tree, type TreeNode } from './tree.js';
import type { ChunkPool } from './chunk-pool.js';

const fastKdf = { algorithm: 'scrypt' as const, N: 1024, r: 8, p: 1 };
const FOLDERS = 12;
const FILES = 20;

interface Scene {
  work: string;
  volume: string;
  repo: Repository;
}

const folder = (i: number): string => `d${String(i).padStart(2, '0')}`;
const file = (i: number): string => `f${String(i).padStart(2, '0')}`;

/** FOLDERS folders of FILES small files, one larger file, a symlink and a nested folder. */
async function scene(): Promise<Scene> {
  const work = mkdtempSync(join(tmpdir(), 'journal-pass-'));
  const volume = join(work, 'volume');
  for (let d = 0; d < FOLDERS; d++) {
    mkdirSync(join(volume, folder(d)), { recursive: true });
    for (let i = 0; i < FILES; i++) writeFileSync(join(volume, folder(d), file(i)), randomBytes(100 + ((d * FILES + i) * 37) % 3000));
  }
  writeFileSync(join(volume, folder(0), 'big.bin'), randomBytes(300_000));
  symlinkSync('f00', join(volume, folder(1), 'link'));
  mkdirSync(join(volume, folder(1), 'sub'));
  writeFileSync(join(volume, folder(1), 'sub', 'x'), 'x');
  writeFileSync(join(volume, 'top.txt'), 'top');
  const repo = await Repository.init(new LocalBackend(join(work, 'repo')), 'pw', { kdf: fastKdf });
  return { work, volume, repo };
}

interface Parent {
  tree: string;
  facts: PassFacts;
}

/** Phase 1: a tolerant full walk (CVAT running); its trees become readable, as in the backup. */
async function phase1(s: Scene, pool?: ChunkPool): Promise<Parent> {
  const archiver = new Archiver(s.repo, { tolerateChanges: true, ...(pool ? { pool } : {}) });
  const { tree } = await archiver.archive(s.volume, undefined);
  await s.repo.flushPacksOnly();
  assert.ok(archiver.passFacts, 'a full walk gives its facts');
  return { tree, facts: archiver.passFacts };
}

/** What an offline copy holds now: a full walk with nothing to compare with. */
async function truth(s: Scene): Promise<{ tree: string; archiver: Archiver }> {
  const archiver = new Archiver(s.repo);
  const { tree } = await archiver.archive(s.volume, undefined);
  return { tree, archiver };
}

type Changes = Record<string, string[] | 'all'>;

async function journalPass(
  s: Scene,
  parent: Parent,
  changes: Changes,
  options: { pool?: ChunkPool; facts?: Partial<PassFacts>; warnings?: string[] } = {},
): Promise<{ result: ArchiveResult; archiver: Archiver }> {
  const folders = new Map(Object.entries(changes).map(([k, v]) => [k, v === 'all' ? ('all' as const) : new Set(v)]));
  const archiver = new Archiver(s.repo, {
    ...(options.pool ? { pool: options.pool } : {}),
    onWarning: (m) => options.warnings?.push(m),
  });
  const result = await archiver.archive(s.volume, parent.tree, { changes: { folders }, parentPass: { ...parent.facts, ...options.facts } });
  await s.repo.flushPacksOnly();
  return { result, archiver };
}

/** The journal pass used the journal and built the tree a full walk builds now, with the same counts. */
async function assertSameAsWalk(s: Scene, pass: { result: ArchiveResult; archiver: Archiver }, used = true): Promise<void> {
  const walk = await truth(s);
  if (used) assert.deepEqual(pass.result.journal, { used: true });
  assert.equal(pass.result.tree, walk.tree, 'the journal pass builds the same tree as a full walk');
  for (const k of ['entries', 'files', 'bytes'] as const) assert.equal(pass.archiver.stats[k], walk.archiver.stats[k], k);
}

async function loadTree(repo: Repository, id: string): Promise<Tree> {
  return JSON.parse((await repo.loadBlob(id)).toString('utf8')) as Tree;
}

async function nodeAt(repo: Repository, tree: string, path: string): Promise<TreeNode | undefined> {
  const [head, ...rest] = path.split('/');
  const node = (await loadTree(repo, tree)).nodes.find((n) => Buffer.from(n.name, 'base64').toString() === head);
  if (!node || rest.length === 0) return node;
  return node.subtree ? nodeAt(repo, node.subtree, rest.join('/')) : undefined;
}

async function contentOf(repo: Repository, node: TreeNode): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (const id of node.content ?? []) parts.push(isZeroChunk(id) ? Buffer.alloc(Number(id.split(':')[1])) : await repo.loadBlob(id));
  return Buffer.concat(parts);
}

/** A copy of `tree` with the node at `path` patched (and the folders above it saved anew). */
async function patched(repo: Repository, tree: string, path: string, patch: (node: TreeNode) => void): Promise<string> {
  const [head, ...rest] = path.split('/');
  const t = await loadTree(repo, tree);
  const node = t.nodes.find((n) => Buffer.from(n.name, 'base64').toString() === head)!;
  if (rest.length === 0) patch(node);
  else node.subtree = await patched(repo, node.subtree!, rest.join('/'), patch);
  const { id } = await repo.saveBlob('tree', Buffer.from(JSON.stringify(t)));
  await repo.flushPacksOnly();
  return id;
}

async function inScene(body: (s: Scene) => Promise<void>): Promise<void> {
  const s = await scene();
  try {
    await body(s);
  } finally {
    rmSync(s.work, { recursive: true, force: true });
  }
}

void describe('the final pass with a change journal', () => {
  void it('creates, deletes, renames within and across folders: the same tree as a full walk; the other folders are not visited', () =>
    inScene(async (s) => {
      const parent = await phase1(s);
      writeFileSync(join(s.volume, 'd02', 'new'), randomBytes(500));
      unlinkSync(join(s.volume, 'd03', 'f04'));
      renameSync(join(s.volume, 'd04', 'f01'), join(s.volume, 'd04', 'zz'));
      renameSync(join(s.volume, 'd05', 'f02'), join(s.volume, 'd06', 'moved'));
      const pass = await journalPass(s, parent, { d02: ['new'], d03: ['f04'], d04: ['f01', 'zz'], d05: ['f02'], d06: ['moved'] });
      await assertSameAsWalk(s, pass);
      // The root and the five changed folders: their trees loaded, their changed names and the
      // five folders on the way looked up; nothing listed, no other folder touched.
      assert.deepEqual(pass.archiver.visits, { foldersListed: 0, lookups: 6 + 5, treesLoaded: 6 });
      const walk = await truth(s);
      assert.equal(walk.archiver.visits.foldersListed, FOLDERS + 2, 'a full walk lists every folder');
      assert.equal(pass.archiver.stats.filesUnchanged, pass.archiver.stats.files - 3, 'only the new file and the two renamed ones were read');
    }));

  void it('a renamed folder and new nested folders with files are walked in full', () =>
    inScene(async (s) => {
      const parent = await phase1(s);
      renameSync(join(s.volume, 'd07'), join(s.volume, 'd07-moved'));
      mkdirSync(join(s.volume, 'new', 'deep'), { recursive: true });
      writeFileSync(join(s.volume, 'new', 'deep', 'a'), randomBytes(700));
      writeFileSync(join(s.volume, 'new', 'b'), randomBytes(70_000));
      // A folder deleted with its files, and one replaced by a file.
      rmSync(join(s.volume, 'd08'), { recursive: true });
      rmSync(join(s.volume, 'd09'), { recursive: true });
      writeFileSync(join(s.volume, 'd09'), 'now a file');
      const pass = await journalPass(s, parent, {
        '': ['d07', 'd07-moved', 'new', 'd08', 'd09'],
        new: ['deep', 'b'],
        'new/deep': ['a'],
        d08: FILES > 0 ? Array.from({ length: FILES }, (_, i) => file(i)) : [],
      });
      await assertSameAsWalk(s, pass);
    }));

  void it('a file rewritten in place with the same size and mtime is read again (a walk trusting metadata keeps the old bytes)', () =>
    inScene(async (s) => {
      const parent = await phase1(s);
      const path = join(s.volume, 'd09', 'f04');
      const before = statSync(path);
      const newBytes = randomBytes(Number(before.size));
      writeFileSync(path, newBytes);
      utimesSync(path, before.atime, before.mtime);
      const after = statSync(path, { bigint: true });
      // As if the write fell in the same timestamp tick as phase 1's read of it (coarse
      // timestamps; utimes here keeps only microseconds): the parent's node then matches the
      // file's size, mtime, ctime and inode.
      const sameTick = {
        ...parent,
        tree: await patched(s.repo, parent.tree, 'd09/f04', (n) => {
          n.mtimeNs = after.mtimeNs.toString();
          n.ctimeNs = after.ctimeNs.toString();
        }),
      };
      const { tree: walked } = await new Archiver(s.repo).archive(s.volume, sameTick.tree);
      await s.repo.flushPacksOnly();
      assert.notDeepEqual(await contentOf(s.repo, (await nodeAt(s.repo, walked, 'd09/f04'))!), newBytes, 'the walk trusts the metadata');
      const pass = await journalPass(s, sameTick, { d09: ['f04'] });
      await assertSameAsWalk(s, pass);
      assert.deepEqual(await contentOf(s.repo, (await nodeAt(s.repo, pass.result.tree, 'd09/f04'))!), newBytes, 'the journal pass read the new bytes');
    }));

  void it('chmod of a file and of a folder, a symlink pointed elsewhere, a file grown, with worker threads', async () => {
    const s = await scene();
    const pool = s.repo.createChunkPool(2);
    try {
      await pool.ready();
      const parent = await phase1(s, pool);
      chmodSync(join(s.volume, 'd10', 'f01'), 0o600);
      chmodSync(join(s.volume, 'd11'), 0o700);
      unlinkSync(join(s.volume, 'd01', 'link'));
      symlinkSync('f02', join(s.volume, 'd01', 'link'));
      writeFileSync(join(s.volume, 'd00', 'big.bin'), randomBytes(400_000));
      writeFileSync(join(s.volume, 'd01', 'sub', 'x'), 'xx');
      const pass = await journalPass(s, parent, { '': ['d11'], d10: ['f01'], d01: ['link'], d00: ['big.bin'], 'd01/sub': ['x'] }, { pool });
      await assertSameAsWalk(s, pass);
      assert.equal(pass.archiver.stats.bytesRead, 400_000 + 2 + (await nodeAt(s.repo, pass.result.tree, 'd10/f01'))!.size);
    } finally {
      await pool.close();
      rmSync(s.work, { recursive: true, force: true });
    }
  });

  void it('an overflowed folder (all) is listed in full; an overflowed root walks everything', () =>
    inScene(async (s) => {
      const parent = await phase1(s);
      writeFileSync(join(s.volume, 'd02', 'new'), randomBytes(500));
      unlinkSync(join(s.volume, 'd02', 'f00'));
      const pass = await journalPass(s, parent, { d02: 'all' });
      await assertSameAsWalk(s, pass);
      assert.equal(pass.archiver.visits.foldersListed, 1);
      const root = await journalPass(s, parent, { '': 'all' });
      await assertSameAsWalk(s, root);
      assert.equal(root.archiver.visits.foldersListed, FOLDERS + 2);
    }));

  void it('a file the tolerant pass left without content is read, in a folder visited or not', () =>
    inScene(async (s) => {
      const parent = await phase1(s);
      // As a tolerant pass leaves a file that changed while it read it.
      let tree = await patched(s.repo, parent.tree, 'd03/f01', (n) => delete n.content);
      tree = await patched(s.repo, tree, 'd04/f02', (n) => delete n.content);
      writeFileSync(join(s.volume, 'd03', 'new'), 'n');
      // d03 is visited for its change: its empty node is read anyway; d04 is only in the pass's own record.
      const pass = await journalPass(s, { tree, facts: { ...parent.facts, incomplete: new Map([['d04', new Set(['f02'])]]) } }, { d03: ['new'] });
      await assertSameAsWalk(s, pass);
    }));

  void it("cvat-backup's own folder appearing at the root is left out with the walk's warning", () =>
    inScene(async (s) => {
      const parent = await phase1(s);
      mkdirSync(join(s.volume, '.cvat-backup-retired'));
      writeFileSync(join(s.volume, '.cvat-backup-retired', 'x'), 'x');
      const warnings: string[] = [];
      const pass = await journalPass(s, parent, { '': ['.cvat-backup-retired'], '.cvat-backup-retired': ['x'] }, { warnings });
      await assertSameAsWalk(s, pass);
      assert.equal(warnings.length, 1);
      assert.match(warnings[0]!, /\.cvat-backup-retired.*left out/);
    }));

  void describe('hard links: the volume is walked in full when a changed name is, or was, linked', () => {
    void it('a change beside linked files uses the journal; a new link, a link removed, a new folder holding a link do not', () =>
      inScene(async (s) => {
        writeFileSync(join(s.volume, 'd10', 'a'), randomBytes(900));
        linkSync(join(s.volume, 'd10', 'a'), join(s.volume, 'd10', 'b'));
        const parent = await phase1(s);
        assert.deepEqual([...parent.facts.linked].sort(), ['d10/a', 'd10/b']);

        writeFileSync(join(s.volume, 'd02', 'f00'), randomBytes(10));
        await assertSameAsWalk(s, await journalPass(s, parent, { d02: ['f00'] }));
        // Also in their folder, whose listing (so its mtime) changed: it is recursed into.
        writeFileSync(join(s.volume, 'd10', 'new'), randomBytes(10));
        await assertSameAsWalk(s, await journalPass(s, parent, { '': ['d10'], d02: ['f00'], d10: ['new'] }));
        // But a folder holding linked files, renamed: the links' first names moved.
        renameSync(join(s.volume, 'd10'), join(s.volume, 'd10-moved'));
        const moved = await journalPass(s, parent, { '': ['d10', 'd10-moved'], 'd10-moved': 'all' });
        assert.match((moved.result.journal as { reason: string }).reason, /'d10' is gone and held files with several hard links/);
        await assertSameAsWalk(s, moved, false);
        renameSync(join(s.volume, 'd10-moved'), join(s.volume, 'd10'));

        // A new name for a file phase 1 saw with one link: every name's ctime changed.
        linkSync(join(s.volume, 'd03', 'f00'), join(s.volume, 'd04', 'h'));
        const added = await journalPass(s, parent, { d04: ['h'] });
        assert.deepEqual(added.result.journal, { used: false, reason: "'d04/h' has several hard links" });
        await assertSameAsWalk(s, added, false);
        unlinkSync(join(s.volume, 'd04', 'h'));

        // The second name removed: the first now has one link (and another ctime), unreported.
        unlinkSync(join(s.volume, 'd10', 'b'));
        const removed = await journalPass(s, parent, { d10: ['b'] });
        assert.equal(removed.result.journal?.used, false);
        assert.match((removed.result.journal as { reason: string }).reason, /hard links/);
        await assertSameAsWalk(s, removed, false);

        // A new folder, walked in full, holding a link to a file elsewhere.
        mkdirSync(join(s.volume, 'n'));
        linkSync(join(s.volume, 'd05', 'f00'), join(s.volume, 'n', 'h'));
        const inNew = await journalPass(s, parent, { '': ['n'], n: ['h'] });
        assert.equal(inNew.result.journal?.used, false);
        await assertSameAsWalk(s, inNew, false);
      }));

    void it('a file linked from outside the volume: a write through the other name is never reported, so no journal', () =>
      inScene(async (s) => {
        linkSync(join(s.volume, 'd06', 'f00'), join(s.work, 'outside'));
        const parent = await phase1(s);
        assert.equal(parent.facts.linksOutside, true);
        writeFileSync(join(s.work, 'outside'), randomBytes(50));
        writeFileSync(join(s.volume, 'd02', 'f00'), randomBytes(10));
        const pass = await journalPass(s, parent, { d02: ['f00'] });
        assert.equal(pass.result.journal?.used, false);
        await assertSameAsWalk(s, pass, false);
      }));
  });
});
