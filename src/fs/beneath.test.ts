import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, readFileSync, readSync, writeSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readFile, readlink, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirHandle, closeFd, isChangedError, isComponent } from './beneath.js';

describe('DirHandle: folder-relative access that never follows a link', () => {
  let work: string;
  let volume: string;
  let outside: string;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'beneath-'));
    volume = join(work, 'volume');
    outside = join(work, 'outside');
    await mkdir(volume);
    await mkdir(outside);
    await writeFile(join(outside, 'canary'), 'secret');
  });
  after(async () => {
    await rm(work, { recursive: true, force: true });
  });

  it('accepts only single path components', () => {
    for (const bad of ['', '.', '..', 'a/b', '/etc', 'a\0b']) assert.equal(isComponent(Buffer.from(bad)), false, bad);
    for (const good of ['a', '...', '.a', '..a', 'ä', 'a b']) assert.equal(isComponent(Buffer.from(good)), true, good);
  });

  it('refuses to enter a link as a folder, to write through one, or to open one as a file', async () => {
    await symlink(outside, join(volume, 'link'));
    const root = await DirHandle.openRoot(volume);
    try {
      await assert.rejects(root.openDir('link'), (e: NodeJS.ErrnoException) => e.code === 'ENOTDIR' || e.code === 'ELOOP');
      await assert.rejects(root.createFile('link'), { code: 'EEXIST' });
      await assert.rejects(root.mkdir('link'), { code: 'EEXIST' });
      await assert.rejects(root.openFile('link'), { code: 'ECHANGED' });
      await assert.rejects(root.openFile('../outside/canary'), { code: 'EINVAL' });
      // A symbolic link is data: made exactly as given, never followed.
      await root.symlink(Buffer.from('/etc/passwd'), 'abs');
      assert.equal(await readlink(join(volume, 'abs')), '/etc/passwd');
      await root.lchown('abs', 1234, 1234);
      assert.equal((await lstat(join(volume, 'abs'))).uid, 1234);
      assert.notEqual((await stat('/etc/passwd')).uid, 1234);
    } finally {
      await root.close();
    }
    assert.equal(await readFile(join(outside, 'canary'), 'utf8'), 'secret');
  });

  it('opens a FIFO or a device swapped in for a file without blocking or opening it', async () => {
    execFileSync('mkfifo', [join(volume, 'fifo')]);
    const root = await DirHandle.openRoot(volume);
    try {
      await assert.rejects(root.openFile('fifo'), { code: 'ECHANGED' });
      assert.throws(() => root.openFileSync('fifo'), { code: 'ECHANGED' });
      await assert.rejects(root.openFile('missing'), { code: 'ECHANGED' });
    } finally {
      await root.close();
    }
  });

  it('opens the inode that was listed, and says when another one is there now', async () => {
    await writeFile(join(volume, 'file'), 'one');
    const root = await DirHandle.openRoot(volume);
    try {
      const listed = await root.lstat('file');
      const opened = await root.openFile('file', { dev: listed.dev, ino: listed.ino });
      const buffer = Buffer.alloc(10);
      assert.equal(buffer.subarray(0, readSync(opened.fd, buffer)).toString(), 'one');
      await closeFd(opened.fd);
      // Replaced by another inode (a rename over it) between listing and opening.
      await writeFile(join(volume, 'file.new'), 'two');
      execFileSync('mv', [join(volume, 'file.new'), join(volume, 'file')]);
      await assert.rejects(root.openFile('file', { dev: listed.dev, ino: listed.ino }), { code: 'ECHANGED' });
      assert.throws(() => root.openFileSync('file', { dev: listed.dev, ino: listed.ino }), { code: 'ECHANGED' });
    } finally {
      await root.close();
    }
  });

  it('creates files, folders and hard links relative to open folders; a folder swapped for a link keeps writes inside', async () => {
    const root = await DirHandle.openRoot(volume);
    try {
      await root.mkdir('d');
      const d = await root.openDir('d');
      const fd = await d.createFile('f', 0o640);
      writeSync(fd, 'data');
      closeSync(fd);
      await root.link(d, 'f', 'hard');
      assert.equal((await lstat(join(volume, 'hard'))).nlink, 2);
      // Someone swaps the folder for a link to the outside: the handle still means the folder.
      execFileSync('mv', [join(volume, 'd'), join(volume, 'd.moved')]);
      await symlink(outside, join(volume, 'd'));
      const fd2 = await d.createFile('g');
      closeSync(fd2);
      assert.equal((await lstat(join(volume, 'd.moved', 'g'))).isFile(), true);
      await assert.rejects(lstat(join(outside, 'g')), { code: 'ENOENT' });
      await d.close();
      await assert.rejects(root.openDir('d'), (e: NodeJS.ErrnoException) => e.code === 'ENOTDIR' || e.code === 'ELOOP');
    } finally {
      await root.close();
    }
    assert.equal(readFileSync(join(outside, 'canary'), 'utf8'), 'secret');
  });

  it('removeTree deletes a folder and never follows a link inside it', async () => {
    await mkdir(join(volume, 'old', 'deep'), { recursive: true });
    await writeFile(join(volume, 'old', 'deep', 'x'), 'x');
    await symlink(outside, join(volume, 'old', 'escape'));
    await symlink(outside, join(volume, 'old', 'deep', 'escape2'));
    const root = await DirHandle.openRoot(volume);
    try {
      await root.removeTree('old');
      await root.removeTree('not-there');
    } finally {
      await root.close();
    }
    await assert.rejects(lstat(join(volume, 'old')), { code: 'ENOENT' });
    assert.equal(await readFile(join(outside, 'canary'), 'utf8'), 'secret');
  });

  it('lookup: an O_PATH handle on what is there now, never followed, never opened; opening through it reaches that inode', async () => {
    await mkdir(join(volume, 'look'));
    await writeFile(join(volume, 'look', 'file'), 'inside');
    await mkdir(join(volume, 'look', 'dir'));
    await writeFile(join(volume, 'look', 'dir', 'x'), 'x');
    await symlink(outside, join(volume, 'look', 'link'));
    execFileSync('mkfifo', [join(volume, 'look', 'fifo')]);
    if (process.getuid?.() === 0) execFileSync('mknod', [join(volume, 'look', 'zero'), 'c', '1', '5']);
    const root = await DirHandle.openRoot(join(volume, 'look'));
    try {
      const file = root.lookupSync('file');
      const dir = await root.lookup('dir');
      // Both names now swapped for links to the outside: the handles still mean what was listed.
      execFileSync('mv', [join(volume, 'look', 'file'), join(volume, 'look', 'file.moved')]);
      execFileSync('mv', [join(volume, 'look', 'dir'), join(volume, 'look', 'dir.moved')]);
      await symlink(join(outside, 'canary'), join(volume, 'look', 'file'));
      await symlink(outside, join(volume, 'look', 'dir'));
      const fd = file.openFileSync();
      const buffer = Buffer.alloc(20);
      assert.equal(buffer.subarray(0, readSync(fd, buffer, 0, 20, 0)).toString(), 'inside');
      closeSync(fd);
      const sub = await dir.openDir();
      assert.deepEqual((await sub.readdir()).map(String), ['x']);
      await sub.close();
      assert.throws(() => file.openDirSync(), { code: 'ECHANGED' });
      await assert.rejects(dir.openFile(), { code: 'ECHANGED' });
      file.closeSync();
      await dir.close();
      await dir.close(); // closing twice is harmless

      const link = root.lookupSync('link');
      assert.equal(link.stat.isSymbolicLink(), true, 'a link is looked up, not followed');
      assert.throws(() => link.openFileSync(), { code: 'ECHANGED' });
      assert.throws(() => link.openDirSync(), { code: 'ECHANGED' });
      link.closeSync();
      assert.equal((await root.readListedLink('link')).toString(), outside);
      await assert.rejects(root.readListedLink('file.moved'), { code: 'ECHANGED' });
      await assert.rejects(root.readListedLink('gone'), { code: 'ECHANGED' });

      // A FIFO or a device is looked up without being opened (no block, no side effect) and is never opened.
      for (const name of process.getuid?.() === 0 ? ['fifo', 'zero'] : ['fifo']) {
        const special = root.lookupSync(name);
        assert.equal(special.stat.isFile() || special.stat.isDirectory(), false, name);
        assert.throws(() => special.openFileSync(), { code: 'ECHANGED' });
        await assert.rejects(special.openFile(), { code: 'ECHANGED' });
        special.closeSync();
      }
      assert.throws(() => root.lookupSync('gone'), { code: 'ECHANGED' });
      await assert.rejects(root.lookup('gone'), { code: 'ECHANGED' });
      assert.throws(() => root.lookupSync('../outside'), { code: 'EINVAL' });
      assert.equal(isChangedError(Object.assign(new Error(), { code: 'ELOOP' })), true);
      assert.equal(isChangedError(Object.assign(new Error(), { code: 'EIO' })), false);
    } finally {
      await root.close();
    }
    assert.equal(await readFile(join(outside, 'canary'), 'utf8'), 'secret');
  });

  it('the root itself must not be a link', async () => {
    await symlink(outside, join(work, 'root-link'));
    await assert.rejects(DirHandle.openRoot(join(work, 'root-link')), (e: NodeJS.ErrnoException) => e.code === 'ENOTDIR' || e.code === 'ELOOP');
  });
});
