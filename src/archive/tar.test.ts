import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, linkSync, writeFileSync, readdirSync, lstatSync, readlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { randomBytes } from 'node:crypto';
import { TarProcessor, normaliseMemberName } from './tar.js';
import { encodeHeader } from './host-tar.js';

async function process(input: Buffer, renamePrefix?: Buffer): Promise<{ output: Buffer; names: string[]; processor: TarProcessor }> {
  const names: string[] = [];
  const processor = new TarProcessor({
    ...(renamePrefix ? { renamePrefix } : {}),
    onEntry: (e) => names.push(normaliseMemberName(e.name)),
  });
  const parts: Buffer[] = [];
  await pipeline(
    Readable.from([input.subarray(0, 700), input.subarray(700, 5000), input.subarray(5000)]),
    processor,
    new Writable({ write: (c: Buffer, _e, cb) => (parts.push(c), cb()) }),
  );
  return { output: Buffer.concat(parts), names, processor };
}

/** A random tree with the names real media folders have: long, deep, non-UTF-8, links. */
function makeTree(root: string, seed: number): void {
  const dir = join(root, 'data');
  mkdirSync(dir);
  const rnd = randomBytes(64);
  mkdirSync(join(dir, 'L'.repeat(120) + seed), { recursive: true });
  writeFileSync(join(dir, 'L'.repeat(120) + seed, 'M'.repeat(150)), rnd);
  let deep = dir;
  for (let i = 0; i < 8; i++) deep = join(deep, `level-${i}-${'x'.repeat(20)}`);
  mkdirSync(deep, { recursive: true });
  writeFileSync(join(deep, 'leaf'), 'deep');
  writeFileSync(Buffer.from(`${dir}/caf\xe9-${seed}`, 'latin1'), 'latin1 name');
  writeFileSync(join(dir, 'with\nnewline'), 'nl');
  writeFileSync(join(dir, 'big'), randomBytes(100000 + seed * 1000));
  linkSync(join(dir, 'big'), join(dir, 'big-hardlink'));
  linkSync(join(dir, 'big'), join(deep, 'H'.repeat(90)));
  symlinkSync('big', join(dir, 'sym'));
  symlinkSync('T'.repeat(150), join(dir, 'long-symlink'));
  mkdirSync(join(dir, 'empty'));
}

function snapshot(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: Buffer, rel: string): void => {
    for (const name of readdirSync(d, { encoding: 'buffer' })) {
      const p = Buffer.concat([d, Buffer.from('/'), name]);
      const r = `${rel}/${name.toString('latin1')}`;
      const st = lstatSync(p);
      out[r] = st.isSymbolicLink()
        ? `link:${readlinkSync(p, { encoding: 'buffer' }).toString('latin1')}`
        : st.isDirectory()
          ? 'dir'
          : `file:${readFileSync(p).toString('base64')}:${st.nlink}`;
      if (st.isDirectory()) walk(p, r);
    }
  };
  walk(Buffer.from(root), '');
  return out;
}

void describe('TarProcessor', () => {
  for (const format of ['gnu', 'pax', 'ustar-compatible-posix'] as const) {
    void it(`renames every member of a ${format} archive byte-exactly; GNU tar extracts it with --strip`, async () => {
      const work = mkdtempSync(join(tmpdir(), 'tar-test-'));
      try {
        const src = join(work, 'src');
        mkdirSync(src);
        makeTree(src, format.length);
        const tarFormat = format === 'ustar-compatible-posix' ? 'posix' : format;
        const original = execFileSync('tar', [`--format=${tarFormat}`, '-C', src, '-cf', '-', 'data'], { maxBuffer: 1 << 28 });
        const { output, names, processor } = await process(original, Buffer.from('var/lib/postgresql/'));
        assert.ok(names.every((n) => n.startsWith('var/lib/postgresql/data')), names.join('\n'));
        assert.equal(processor.stats.entries, names.length);
        writeFileSync(join(work, 'out.tar'), output);
        const dst = join(work, 'dst');
        mkdirSync(dst);
        execFileSync('tar', ['-C', dst, '-xf', join(work, 'out.tar'), '--strip', '3']);
        assert.deepEqual(snapshot(join(dst, 'data')), snapshot(join(src, 'data')));
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
    });
  }

  void it('passes an archive through unchanged when not renaming, and counts files and bytes', async () => {
    const work = mkdtempSync(join(tmpdir(), 'tar-test-'));
    try {
      makeTree(work, 1);
      const original = execFileSync('tar', ['--format=pax', '-C', work, '-cf', '-', 'data'], { maxBuffer: 1 << 28 });
      const { output, processor } = await process(original);
      assert.ok(output.equals(original));
      assert.equal(processor.stats.bytes, 64 + 4 + 11 + 2 + 101000);
      assert.equal(processor.stats.files, 7);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  });

  void it('carries a member over 8 GiB (PAX size record, as the engine writes it) and renames it', async () => {
    const size = 8 * 1024 ** 3 + 4097;
    const header = encodeHeader({ name: Buffer.from('data/huge.bin'), type: '0', mode: 0o644, uid: 1000, gid: 1000, size, mtime: 1700000000 });
    const zeros = Buffer.alloc(4 << 20);
    function* archive(): Generator<Buffer> {
      yield header;
      for (let left = size; left > 0; left -= zeros.length) yield zeros.subarray(0, Math.min(zeros.length, left));
      yield Buffer.alloc(512 - (size % 512));
      yield Buffer.alloc(1024);
    }
    const names: string[] = [];
    let out = 0;
    const processor = new TarProcessor({ renamePrefix: Buffer.from('home/django/'), onEntry: (e) => names.push(normaliseMemberName(e.name)) });
    await pipeline(Readable.from(archive()), processor, new Writable({ write: (c: Buffer, _e, cb) => ((out += c.length), cb()) }));
    assert.deepEqual(names, ['home/django/data/huge.bin']);
    assert.equal(processor.stats.bytes, size);
    assert.equal(out % 512, 0);
  });

  void it('refuses a truncated archive and a damaged header', async () => {
    const work = mkdtempSync(join(tmpdir(), 'tar-test-'));
    try {
      makeTree(work, 2);
      const original = execFileSync('tar', ['-C', work, '-cf', '-', 'data'], { maxBuffer: 1 << 28 });
      await assert.rejects(process(original.subarray(0, original.length - 20000)), /truncated/);
      const damaged = Buffer.from(original);
      damaged[0] = damaged[0]! ^ 1;
      await assert.rejects(process(damaged), /checksum/);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  });
});
