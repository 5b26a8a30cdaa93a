/**
 * A staged restore that links the volume's unchanged files instead of writing them
 * (reuse-files.ts), in a real repository and real files: only a file whose bytes and metadata are
 * the snapshot's is linked; anything else (other bytes of the same size, another mode, a second
 * link, a symbolic link to the same bytes outside) is written from the repository; and a linked
 * file written to before CVAT stops is written again by the recheck.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { appendFileSync, chmodSync, closeSync, linkSync, lstatSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, symlinkSync, truncateSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LocalBackend } from '../backend/local.js';
import { Archiver } from './archiver.js';
import { restoreVolumeToFolder, restoreVolumeVerifying } from './folder-restore.js';
import { MemoryBackend } from '../backend/memory.js';
import { initTestRepository, prngBytes, testMediaVolume } from './testing.js';

void describe('restore keeping unchanged files (reuse-files.ts)', () => {
  // A local repository (each blob read from its pack) and a remote one (the one-pass pack reads of
  // direct-writes.ts while staging; the downtime's rewrites read blob by blob).
  for (const where of ['local', 'remote'] as const) {
  void it(`${where} repository: links only files holding the snapshot bytes and metadata, and writes again what changed before CVAT stopped`, { timeout: 60_000 }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'reuse-files-'));
    try {
      const vol = join(dir, 'vol');
      const outside = join(dir, 'outside');
      mkdirSync(join(vol, 'sub'), { recursive: true });
      mkdirSync(outside);
      const content = new Map<string, Buffer>([
        ['same.bin', prngBytes(1, 3_000_000)],
        ['sub/same2.bin', prngBytes(2, 100_000)],
        ['other-bytes.bin', prngBytes(3, 200_000)],
        ['other-mode.bin', prngBytes(4, 200_000)],
        ['two-links.bin', prngBytes(5, 200_000)],
        ['small.txt', prngBytes(6, 1000)],
        ['now-a-link.bin', prngBytes(7, 200_000)],
      ]);
      for (const [name, bytes] of content) writeFileSync(join(vol, name), bytes);
      // A file with a hole: its `zero:` chunk is compared with zeros.
      writeFileSync(join(vol, 'sparse.bin'), '');
      truncateSync(join(vol, 'sparse.bin'), 4 << 20);
      appendFileSync(join(vol, 'sparse.bin'), prngBytes(8, 50_000));
      content.set('sparse.bin', readFileSync(join(vol, 'sparse.bin')));

      const repo = await initTestRepository(where === 'local' ? new LocalBackend(join(dir, 'repo')) : new MemoryBackend());
      const pool = repo.createChunkPool(2);
      try {
        const archived = await new Archiver(repo, { pool }).archive(vol, undefined);
        await repo.flush();

        // After the backup: the same size and time but other bytes; another mode; a second link;
        // a symbolic link to a copy of the bytes outside the volume.
        const t = lstatSync(join(vol, 'other-bytes.bin'), { bigint: true });
        writeFileSync(join(vol, 'other-bytes.bin'), prngBytes(33, 200_000));
        utimesSync(join(vol, 'other-bytes.bin'), Number(t.atimeNs) / 1e9, Number(t.mtimeNs) / 1e9);
        chmodSync(join(vol, 'other-mode.bin'), 0o600);
        linkSync(join(vol, 'two-links.bin'), join(vol, 'second-name'));
        writeFileSync(join(outside, 'copy'), content.get('now-a-link.bin')!);
        rmSync(join(vol, 'now-a-link.bin'));
        symlinkSync(join(outside, 'copy'), join(vol, 'now-a-link.bin'));
        const before = new Map([...content.keys()].map((name) => [name, lstatSync(join(vol, name)).ino]));

        const staged = join(vol, '.cvat-backup-staged');
        mkdirSync(staged);
        const result = await restoreVolumeVerifying(repo, testMediaVolume(archived.tree, archived.root), staged, { pool, leaveRoot: true, reuseFrom: vol });
        for (const [name, bytes] of content) assert.ok(readFileSync(join(staged, name)).equals(bytes), `${name}: the snapshot's bytes`);
        const linked = [...content.keys()].filter((name) => lstatSync(join(staged, name)).ino === before.get(name)).sort();
        assert.deepEqual(linked, ['same.bin', 'sparse.bin', 'sub/same2.bin']);
        assert.deepEqual(result.reused, { files: 3, bytes: content.get('same.bin')!.length + content.get('sub/same2.bin')!.length + content.get('sparse.bin')!.length });
        assert.equal(lstatSync(join(staged, 'now-a-link.bin')).isFile(), true, 'a file, not the link');
        assert.equal(lstatSync(join(staged, 'other-mode.bin')).mode & 0o777, 0o644, 'the snapshot mode');
        assert.equal(lstatSync(join(outside, 'copy')).nlink, 1, 'nothing linked to the file outside');
        assert.equal(lstatSync(join(vol, 'same.bin')).nlink, 2, 'the current name and the staged one');

        // CVAT writes into a linked file before it stops: the recheck writes it again.
        appendFileSync(join(vol, 'same.bin'), 'written by CVAT');
        assert.ok(result.recheck, 'a recheck is returned');
        assert.equal(await result.recheck(), 1);
        assert.deepEqual(result.reused, { files: 2, bytes: content.get('sub/same2.bin')!.length + content.get('sparse.bin')!.length }, 'the file written again is no longer counted as kept');
        assert.ok(readFileSync(join(staged, 'same.bin')).equals(content.get('same.bin')!), 'the snapshot bytes again');
        assert.notEqual(lstatSync(join(staged, 'same.bin')).ino, before.get('same.bin'), 'a new file');
        assert.equal(readFileSync(join(vol, 'same.bin')).subarray(-15).toString(), 'written by CVAT', 'the current data as CVAT left it');
        assert.equal(await result.recheck(), 0, 'nothing else changed');
        assert.equal(lstatSync(join(staged, 'sub/same2.bin')).ino, before.get('sub/same2.bin'));
      } finally {
        await pool.close();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  }

  void it('a file CVAT overwrites in place while it is being compared is written, not linked', { timeout: 60_000 }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'reuse-files-'));
    try {
      const vol = join(dir, 'vol');
      mkdirSync(vol);
      const bytes = prngBytes(9, 500_000);
      writeFileSync(join(vol, 'frame.jpg'), bytes);
      writeFileSync(join(vol, 'other.jpg'), prngBytes(10, 500_000));
      const repo = await initTestRepository(new LocalBackend(join(dir, 'repo')));
      const pool = repo.createChunkPool(2);
      try {
        const archived = await new Archiver(repo, { pool }).archive(vol, undefined);
        await repo.flush();
        const ino = lstatSync(join(vol, 'frame.jpg')).ino;
        // The comparison finds the snapshot's bytes; right after it, before the ctime is looked at
        // again, "CVAT" overwrites the start of the file in place (same size).
        const racing = new Proxy(pool, {
          get(target, property, receiver): unknown {
            if (property === 'compareRanges') {
              return async (fd: number, ranges: { offset: number; length: number; id: string }[]): Promise<boolean> => {
                const same = await target.compareRanges(fd, ranges);
                const out = openSync(join(vol, 'frame.jpg'), 'r+');
                try {
                  writeSync(out, Buffer.from('written by CVAT'), 0, 15, 0);
                } finally {
                  closeSync(out);
                }
                return same;
              };
            }
            const value = Reflect.get(target, property, receiver) as unknown;
            return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
          },
        });
        const staged = join(vol, '.cvat-backup-staged');
        mkdirSync(staged);
        const result = await restoreVolumeToFolder(repo, testMediaVolume(archived.tree, archived.root), staged, { pool: racing, leaveRoot: true, reuseFrom: vol });
        assert.equal(result.reused.files, 1, 'the file nobody wrote to is kept');
        assert.notEqual(lstatSync(join(staged, 'frame.jpg')).ino, ino, 'written, not linked');
        assert.ok(readFileSync(join(staged, 'frame.jpg')).equals(bytes), "the snapshot's bytes");
        assert.equal(readFileSync(join(vol, 'frame.jpg')).subarray(0, 15).toString(), 'written by CVAT');
        assert.equal(lstatSync(join(vol, 'frame.jpg')).nlink, 1, 'the link made for the comparison is gone');
      } finally {
        await pool.close();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
