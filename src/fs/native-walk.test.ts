/**
 * The native folder listing against lstat, entry by entry, and its checked opens against entries
 * swapped after they were listed. Skipped with CVAT_BACKUP_NATIVE=off (the plain walk is then
 * used); where the helper should be built, a missing helper fails native.test.ts.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, fstatSync, lstatSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isChangedError } from './beneath.js';
import { nativeWalk, NUMS, TEXTS, type FolderListing, type NativeWalk } from './native-walk.js';

const isRoot = process.getuid?.() === 0;
const off = process.env['CVAT_BACKUP_NATIVE'] === 'off';

/** Entry i of a listing, decoded. */
function entryOf(l: FolderListing, i: number): { name: Buffer; base64: string; mtimeNs: string; ctimeNs: string; ino: string; dev: string; nums: number[] } {
  const text = l.text.toString('latin1');
  const t = i * TEXTS;
  const field = (k: number): string => text.slice(t + k === 0 ? 0 : l.textEnds[t + k - 1], l.textEnds[t + k]);
  return {
    name: l.names.subarray(i === 0 ? 0 : l.nameEnds[i - 1], l.nameEnds[i]),
    base64: field(0),
    mtimeNs: field(1),
    ctimeNs: field(2),
    ino: field(3),
    dev: field(4),
    nums: Array.from(l.nums.subarray(i * NUMS, (i + 1) * NUMS)),
  };
}

describe('native folder listing (native/walk.c)', { skip: off && 'CVAT_BACKUP_NATIVE=off' }, () => {
  let work: string;
  let walk: NativeWalk;
  before(() => {
    work = mkdtempSync(join(tmpdir(), 'native-walk-'));
    const w = nativeWalk();
    assert.ok(w, 'the native helper has no listFolder (build it: sh scripts/build-native.sh)');
    walk = w;
  });
  after(() => rmSync(work, { recursive: true, force: true }));

  it('lists every entry as lstat sees it: every type, odd name bytes, 10,000 entries, sorted by name bytes', async () => {
    const dir = join(work, 'all');
    mkdirSync(dir);
    const names: Buffer[] = [];
    const add = (name: Buffer): Buffer => (names.push(name), Buffer.concat([Buffer.from(`${dir}/`), name]));
    for (let i = 0; i < 10_000; i++) writeFileSync(add(Buffer.from(`f${i}`)), 'x'.repeat(i % 50));
    writeFileSync(add(Buffer.from([0xff, 0xfe, 0x0a, 0x20, 0x41])), 'not UTF-8, a newline and a space');
    writeFileSync(add(Buffer.from('ü-é')), '');
    mkdirSync(add(Buffer.from('folder')));
    symlinkSync('/etc/passwd', add(Buffer.from('link')));
    execFileSync('mkfifo', [add(Buffer.from('fifo')).toString()]);
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(add(Buffer.from('socket')).toString(), resolve));
    if (isRoot) execFileSync('mknod', [add(Buffer.from('zero')).toString(), 'c', '1', '5']);
    if (isRoot) execFileSync('mknod', [add(Buffer.from('loop')).toString(), 'b', '7', '200']);
    execFileSync('ln', [join(dir, 'f1'), join(dir, 'hard')]);
    names.push(Buffer.from('hard'));
    try {
      const fd = openSync(dir, 'r');
      const listing = await walk.listFolder(fd);
      closeSync(fd);
      names.sort((a, b) => Buffer.compare(a, b));
      assert.equal(listing.count, names.length);
      for (let i = 0; i < listing.count; i++) {
        const e = entryOf(listing, i);
        assert.deepEqual(e.name, names[i]);
        const st = lstatSync(Buffer.concat([Buffer.from(`${dir}/`), e.name]), { bigint: true });
        assert.equal(e.base64, e.name.toString('base64'));
        assert.deepEqual(
          { mode: e.nums[0], uid: e.nums[1], gid: e.nums[2], size: e.nums[3], nlink: e.nums[4], rdev: e.nums[5], errno: e.nums[6], mtimeNs: e.mtimeNs, ctimeNs: e.ctimeNs, ino: e.ino, dev: e.dev },
          {
            mode: Number(st.mode),
            uid: Number(st.uid),
            gid: Number(st.gid),
            size: Number(st.size),
            nlink: Number(st.nlink),
            rdev: Number(st.rdev),
            errno: 0,
            mtimeNs: String(st.mtimeNs),
            ctimeNs: String(st.ctimeNs),
            ino: String(st.ino),
            dev: String(st.dev),
          },
          e.name.toString(),
        );
      }
    } finally {
      server.close();
    }
  });

  it('lists its own copy of the folder: the descriptor may be closed (and its number reused) at once', async () => {
    const a = join(work, 'a');
    const b = join(work, 'b');
    mkdirSync(a);
    mkdirSync(b);
    writeFileSync(join(a, 'in-a'), '');
    writeFileSync(join(b, 'in-b'), '');
    const fd = openSync(a, 'r');
    const listing = walk.listFolder(fd);
    closeSync(fd);
    const reused = openSync(b, 'r'); // most likely the same number
    try {
      const l = await listing;
      assert.equal(l.count, 1);
      assert.equal(entryOf(l, 0).name.toString(), 'in-a');
    } finally {
      closeSync(reused);
    }
  });

  it('opens a listed file or folder only if it is still the inode listed: a swapped entry is "changed", nothing is followed, a FIFO does not block', async () => {
    const dir = join(work, 'swap');
    mkdirSync(dir);
    const outside = join(work, 'outside');
    mkdirSync(outside);
    writeFileSync(join(outside, 'canary'), 'secret');
    for (const n of ['to-link', 'to-fifo', 'to-other', 'to-folder', 'to-zero', 'kept']) writeFileSync(join(dir, n), n);
    for (const n of ['dir-to-link', 'dir-to-other', 'dir-to-file']) mkdirSync(join(dir, n));
    const fd = openSync(dir, 'r');
    try {
      const l = await walk.listFolder(fd);
      const listed = new Map(Array.from({ length: l.count }, (_, i) => entryOf(l, i)).map((e) => [e.name.toString(), e]));
      const swap = (name: string, make: (path: string) => void): void => {
        rmSync(join(dir, name), { recursive: true });
        make(join(dir, name));
      };
      swap('to-link', (p) => symlinkSync(join(outside, 'canary'), p));
      swap('to-fifo', (p) => execFileSync('mkfifo', [p]));
      // Made before the old one goes, so it cannot get the freed inode number.
      writeFileSync(join(work, 'other'), 'another inode');
      renameSync(join(work, 'other'), join(dir, 'to-other'));
      swap('to-folder', (p) => mkdirSync(p));
      if (isRoot) swap('to-zero', (p) => execFileSync('mknod', [p, 'c', '1', '5']));
      swap('dir-to-link', (p) => symlinkSync(outside, p));
      mkdirSync(join(work, 'other-dir'));
      renameSync(join(work, 'other-dir'), join(dir, 'dir-to-other'));
      swap('dir-to-file', (p) => writeFileSync(p, 'a file now'));
      const open = (name: string, folder: boolean): number => {
        const e = listed.get(name)!;
        return walk.openListed(fd, e.name, e.dev, e.ino, folder);
      };
      for (const name of ['to-link', 'to-fifo', 'to-other', 'to-folder', ...(isRoot ? ['to-zero'] : [])]) {
        assert.throws(() => open(name, false), (e: unknown) => isChangedError(e), name);
      }
      for (const name of ['dir-to-link', 'dir-to-other', 'dir-to-file']) assert.throws(() => open(name, true), (e: unknown) => isChangedError(e), name);
      // A file is not opened as a folder, nor a folder as a file.
      assert.throws(() => open('kept', true), (e: unknown) => isChangedError(e));
      const kept = open('kept', false);
      try {
        assert.equal(readFileSync(kept, 'utf8'), 'kept');
        assert.ok(fstatSync(kept).isFile());
      } finally {
        closeSync(kept);
      }
      const gone = listed.get('kept')!;
      rmSync(join(dir, 'kept'));
      assert.throws(() => walk.openListed(fd, gone.name, gone.dev, gone.ino, false), (e: unknown) => isChangedError(e));
      assert.throws(() => walk.openListed(fd, Buffer.from('../outside'), gone.dev, gone.ino, true), { code: 'EINVAL' });
    } finally {
      closeSync(fd);
    }
    assert.deepEqual(readdirSync(outside), ['canary']);
  });

  it('compares a listing with its parent tree (in the listing job too): the same unless an entry differs or is racy (mtime or ctime at or after racySince)', async () => {
    const dir = join(work, 'parent');
    mkdirSync(dir);
    for (const n of ['a.jpg', 'b.jpg', 'c.jpg']) writeFileSync(join(dir, n), n);
    mkdirSync(join(dir, 'sub'));
    const fd = openSync(dir, 'r');
    try {
      const l = await walk.listFolder(fd);
      assert.equal(l.same, null); // no parent given
      const entries = Array.from({ length: l.count }, (_, i) => entryOf(l, i));
      // The tree as the archiver writes it (baseNode's key order, then content or subtree).
      const nodes = entries.map((e) => {
        const file = (e.nums[0]! & 0o170000) === 0o100000;
        const node = `{"name":"${e.base64}","type":"${file ? 'file' : 'dir'}","mode":${e.nums[0]! & 0o7777},"uid":${e.nums[1]},"gid":${e.nums[2]},"mtimeNs":"${e.mtimeNs}","ctimeNs":"${e.ctimeNs}","inode":"${e.ino}","size":${file ? e.nums[3] : 0},`;
        return node + (file ? '"content":["c0ffee"]}' : '"subtree":"5ub"}');
      });
      const parent = Buffer.from(`{"nodes":[${nodes.join(',')}]}`);
      const files = entries.filter((e) => (e.nums[0]! & 0o170000) === 0o100000);
      const newest = files.reduce((m, e) => [BigInt(e.mtimeNs), BigInt(e.ctimeNs), m].reduce((a, b) => (a > b ? a : b)), 0n);
      const offsets = [...walk.sameAsParent(l.text, l.textEnds, l.nums, parent, newest + 1n)!];
      assert.deepEqual(
        offsets.map((o, i) => (i % 2 === 0 ? parent.subarray(o, offsets[i + 1]).toString() : '')).filter((n) => n),
        nodes,
      );
      for (const racySince of [null, newest + 1n]) {
        const inJob = await walk.listFolder(fd, parent, racySince);
        assert.deepEqual(inJob.same && [...inJob.same], offsets, `racySince ${racySince}`);
      }
      // A file as new as racySince is racy: not the same (a folder's times do not count).
      assert.equal(walk.sameAsParent(l.text, l.textEnds, l.nums, parent, newest), null);
      assert.equal((await walk.listFolder(fd, parent, newest)).same, null);
      // Another size, a node too many, a node missing: not the same.
      assert.equal((await walk.listFolder(fd, Buffer.from(parent.toString().replace('"size":5,', '"size":6,')), null)).same, null);
      assert.equal((await walk.listFolder(fd, Buffer.from(`{"nodes":[${nodes.join(',')},${nodes[0]}]}`), null)).same, null);
      assert.equal((await walk.listFolder(fd, Buffer.from(`{"nodes":[${nodes.slice(1).join(',')}]}`), null)).same, null);
    } finally {
      closeSync(fd);
    }
  });

  it('fails on a folder removed after it was opened (ENOENT: a changed folder), without hanging', async () => {
    const dir = join(work, 'removed');
    mkdirSync(dir);
    const fd = openSync(dir, 'r');
    rmSync(dir, { recursive: true });
    try {
      await assert.rejects(walk.listFolder(fd), (e: unknown) => isChangedError(e));
    } finally {
      closeSync(fd);
    }
  });
});
