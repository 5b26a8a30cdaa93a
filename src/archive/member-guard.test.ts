/**
 * The member rules (MemberGuard), the tar stream rebuilt for the engine (GuardedTarStream), and
 * what must keep working: archives GNU tar writes in every format, with long and non-UTF-8 names,
 * links and sparse files, extract exactly as GNU tar extracts them, on the host path and through
 * the rebuilt stream.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { linkSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, symlinkSync, truncateSync, writeFileSync, chmodSync, utimesSync, openSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CorruptArchiveError } from '../errors.js';
import { HostExtractor } from './host-extract.js';
import { GuardedTarStream } from './guarded-tar.js';
import { MemberGuard } from './member-guard.js';
import { TarProcessor, type TarEntry } from './tar.js';
import { checkArchive } from './archive-set.js';
import { HOSTILE_CASES, buildTar, type RawMember } from '../../test/fixture/hostile.js';

const PREFIX = 'home/django/data';

function entry(name: string, type: string, linkName = ''): TarEntry {
  return { name: Buffer.from(name, 'latin1'), linkName: Buffer.from(linkName, 'latin1'), type, size: 0, mode: 0o644, uid: 0, gid: 0, mtime: 0, pax: new Map() };
}

/** The tar stream GuardedTarStream makes of `tar`, and what it left out. */
async function guarded(tar: Buffer): Promise<{ output: Buffer; skipped: string[] }> {
  const stream = new GuardedTarStream(PREFIX);
  const parts: Buffer[] = [];
  await pipeline(Readable.from([tar]), new TarProcessor({ output: 'entries' }), stream, new Writable({ write: (c: Buffer, _e, cb) => (parts.push(c), cb()) }));
  return { output: Buffer.concat(parts), skipped: stream.skipped };
}

async function extractOnHost(tar: Buffer, root: string): Promise<string[]> {
  const extractor = new HostExtractor(root, PREFIX);
  await pipeline(Readable.from([tar]), new TarProcessor({ output: 'entries' }), extractor);
  return extractor.result.skipped;
}

/** Everything a user would compare: type, content, mode, owner, mtime, link target, hard-link groups, allocated size of holes. */
function describeTree(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const inodes = new Map<number, string>();
  const walk = (dir: Buffer, rel: string): void => {
    for (const name of readdirSync(dir, { encoding: 'buffer' }).sort((a, b) => Buffer.compare(a, b))) {
      const path = Buffer.concat([dir, Buffer.from('/'), name]);
      const r = `${rel}/${name.toString('latin1')}`;
      const st = lstatSync(path);
      const meta = `${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid}`;
      if (st.isSymbolicLink()) out[r] = `link ${readlinkSync(path, { encoding: 'buffer' }).toString('latin1')} ${st.uid}:${st.gid}`;
      else if (st.isDirectory()) {
        out[r] = `dir ${meta} ${Math.floor(st.mtimeMs / 1000)}`;
        walk(path, r);
      } else if (st.isFile()) {
        const first = inodes.get(st.ino);
        if (st.nlink > 1 && first === undefined) inodes.set(st.ino, r);
        out[r] = `file ${meta} ${Math.floor(st.mtimeMs / 1000)} ${readFileSync(path).toString('base64').slice(0, 64)} ${st.size} ${st.blocks * 512 < st.size ? 'sparse' : 'dense'}${first ? ` =${first}` : ''}`;
      } else out[r] = 'other';
    }
  };
  walk(Buffer.from(root), '');
  return out;
}

void describe('MemberGuard', () => {
  it('every order of folder, file, symlink and hard link on one name and below it: allowed only when every parent is a folder and nothing is declared twice', () => {
    const kinds: { id: string; type: string; link?: string; on: 'a' | 'a/x' }[] = [];
    for (const on of ['a', 'a/x'] as const) {
      kinds.push({ id: `dir ${on}`, type: '5', on });
      kinds.push({ id: `file ${on}`, type: '0', on });
      kinds.push({ id: `symlink ${on}`, type: '2', link: '/etc', on });
      kinds.push({ id: `hardlink ${on}`, type: '1', link: `${PREFIX}/f`, on });
    }
    let allowed = 0;
    for (const first of kinds) {
      for (const second of kinds) {
        // The reference rule: a name twice only as folders; something below 'a' only if 'a' is a folder.
        let expected = true;
        if (first.on === second.on) expected = first.type === '5' && second.type === '5';
        else {
          const top = first.on === 'a' ? first : second;
          expected = top.type === '5';
        }
        const guard = new MemberGuard(PREFIX);
        guard.check(entry(`${PREFIX}/`, '5'));
        guard.check(entry(`${PREFIX}/f`, '0'));
        const run = (): void => {
          for (const k of [first, second]) guard.check(entry(`${PREFIX}/${k.on}`, k.type, k.link));
        };
        if (expected) {
          run();
          allowed++;
        } else assert.throws(run, CorruptArchiveError, `${first.id}, then ${second.id}`);
      }
    }
    // dir a + dir a; dir a + anything below; anything below + dir a; below twice as folders.
    assert.equal(allowed, 1 + 4 + 4 + 1);
  });

  it('refuses names outside the prefix, with empty, "." or ".." components, NUL, or over 255 bytes, and the rollback folder', () => {
    for (const bad of ['etc/passwd', `${PREFIX}/../x`, `${PREFIX}/a/./b`, `${PREFIX}/a//b`, `${PREFIX}/a\0b`, `${PREFIX}/${'n'.repeat(256)}`, `${PREFIX}/.cvat-backup-rollback`, `${PREFIX}x/y`]) {
      assert.throws(() => new MemberGuard(PREFIX).check(entry(bad, '0')), CorruptArchiveError, bad);
    }
    const guard = new MemberGuard(PREFIX);
    for (const good of [`./${PREFIX}/a`, `/${PREFIX}/b`, `${PREFIX}/.cvat-backupx`, `${PREFIX}/d/.cvat-backup-rollback`, `${PREFIX}/${'n'.repeat(255)}`, `${PREFIX}/caf\xe9`]) {
      assert.notEqual(guard.check(entry(good, '0')).action, 'skip', good);
    }
  });

  it("a backup through the engine leaves cvat-backup's own folders out instead of refusing them", () => {
    const guard = new MemberGuard(PREFIX, 'leave out');
    for (const name of [`${PREFIX}/.cvat-backup-retired/`, `${PREFIX}/.cvat-backup-retired/x`]) {
      assert.equal(guard.check(entry(name, name.endsWith('/') ? '5' : '0')).action, 'skip', name);
    }
    assert.equal(guard.check(entry(`${PREFIX}/kept`, '0')).action, 'file');
  });

  it('a symlink is data: any target is kept as written, and nothing may go through it', () => {
    const guard = new MemberGuard(PREFIX);
    const made = guard.check(entry(`${PREFIX}/s`, '2', '/etc/../../x'));
    assert.deepEqual(made.action === 'symlink' && made.target.toString(), '/etc/../../x');
    assert.throws(() => guard.check(entry(`${PREFIX}/s/x`, '0')), CorruptArchiveError);
    assert.throws(() => guard.check(entry(`${PREFIX}/h`, '1', `${PREFIX}/s`)), CorruptArchiveError);
  });
});

void describe('GuardedTarStream (the tar stream sent to the engine)', () => {
  it('carries extended attributes and drops every other header record', async () => {
    const tar = buildTar([
      { name: `${PREFIX}/`, type: '5' },
      { name: `${PREFIX}/f`, type: '0', data: Buffer.from('x'), pax: [['SCHILY.xattr.user.label', 'cat'], ['comment', 'hello'], ['uname', 'someone']] },
    ]);
    const seen: TarEntry[] = [];
    const { output } = await guarded(tar);
    await pipeline(Readable.from([output]), new TarProcessor({ onEntry: (e) => seen.push(e) }), new Writable({ write: (_c, _e, cb) => cb() }));
    const f = seen.find((e) => e.name.toString() === `${PREFIX}/f`)!;
    assert.equal(f.pax.get('SCHILY.xattr.user.label')?.toString(), 'cat');
    assert.equal(f.pax.has('comment'), false);
  });

  for (const c of HOSTILE_CASES) {
    it(`${c.id} → ${c.outcome}`, async () => {
      const tar = buildTar(c.members(PREFIX, '/tmp/outside'));
      if (c.outcome === 'refused') {
        await assert.rejects(guarded(tar), CorruptArchiveError);
        return;
      }
      const { output, skipped } = await guarded(tar);
      assert.equal(skipped.length, 3);
      const listing = execFileSync('tar', ['-tvf', '-'], { input: output }).toString();
      assert.doesNotMatch(listing, /^[pcb]/m, 'no FIFO or device reaches the engine');
      assert.match(listing, /after\.txt/);
    });
  }
});

void describe('archives GNU tar writes restore exactly as GNU tar extracts them', () => {
  let work: string;
  let src: string;

  before(() => {
    work = mkdtempSync(join(tmpdir(), 'guard-compat-'));
    src = join(work, 'src');
    const data = join(src, PREFIX);
    mkdirSync(join(data, 'dir', 'deeper'), { recursive: true });
    mkdirSync(join(data, 'empty'));
    writeFileSync(join(data, 'dir', 'file.txt'), 'hello\n');
    chmodSync(join(data, 'dir', 'file.txt'), 0o640);
    linkSync(join(data, 'dir', 'file.txt'), join(data, 'hard.txt'));
    symlinkSync('dir/file.txt', join(data, 'rel-link'));
    symlinkSync('/nonexistent/abs', join(data, 'abs-link'));
    symlinkSync('T'.repeat(150), join(data, 'long-target'));
    const long = join(data, 'L'.repeat(200));
    mkdirSync(long);
    writeFileSync(join(long, 'M'.repeat(200)), 'long names');
    writeFileSync(Buffer.from(`${data}/caf\xe9-not-utf8`, 'latin1'), 'latin1');
    // Sparse: data, a hole, data, and a hole at the end.
    const sparse = join(data, 'sparse.bin');
    writeFileSync(sparse, 'start');
    const fd = openSync(sparse, 'r+');
    writeSync(fd, 'middle', 3 << 20);
    closeSync(fd);
    truncateSync(sparse, 8 << 20);
    for (const p of ['dir/deeper', 'dir', 'empty', '']) utimesSync(join(data, p), 1_600_000_000, 1_600_000_000);
    chmodSync(join(data, 'dir'), 0o2750);
  });
  after(() => rmSync(work, { recursive: true, force: true }));

  const variants: [string, string[]][] = [
    ['gnu', ['--format=gnu']],
    ['gnu --sparse (old GNU sparse headers)', ['--format=gnu', '--sparse']],
    ['pax', ['--format=pax']],
    ['pax --sparse 0.0', ['--format=pax', '--sparse', '--sparse-version=0.0']],
    ['pax --sparse 0.1', ['--format=pax', '--sparse', '--sparse-version=0.1']],
    ['pax --sparse 1.0', ['--format=pax', '--sparse', '--sparse-version=1.0']],
  ];
  for (const [label, flags] of variants) {
    it(label, async () => {
      const tar = execFileSync('tar', [...flags, '-C', src, '-cf', '-', PREFIX], { maxBuffer: 64 << 20 });
      const byTar = mkdtempSync(join(work, 'tar-'));
      execFileSync('tar', ['-C', byTar, '-xpf', '-'], { input: tar, maxBuffer: 64 << 20 });
      const expected = describeTree(join(byTar, PREFIX));
      if (flags.includes('--sparse')) assert.match(expected['/sparse.bin'] ?? '', /sparse$/, 'GNU tar kept the holes');

      const host = mkdtempSync(join(work, 'host-'));
      assert.deepEqual(await extractOnHost(tar, host), []);
      assert.deepEqual(describeTree(host), expected, 'host path');

      const path = join(work, `${label.replace(/\W+/g, '-')}.tar.gz`);
      writeFileSync(path, execFileSync('gzip', ['-c'], { input: tar, maxBuffer: 64 << 20 }));
      await checkArchive(path, PREFIX);

      const { output, skipped } = await guarded(tar);
      assert.deepEqual(skipped, []);
      const engine = mkdtempSync(join(work, 'engine-'));
      execFileSync('tar', ['-C', engine, '-xpf', '-'], { input: output, maxBuffer: 64 << 20 });
      assert.deepEqual(describeTree(join(engine, PREFIX)), expected, 'the stream for the engine');
    });
  }
});

void describe('header values', () => {
  const parse = async (members: RawMember[]): Promise<void> => {
    await pipeline(Readable.from([buildTar(members)]), new TarProcessor(), new Writable({ write: (_c, _e, cb) => cb() }));
  };

  it('refuses absurd numbers and accepts the ordinary ones', async () => {
    await parse([{ name: 'a', type: '0', data: Buffer.from('x'), pax: [['uid', '4294967295'], ['mtime', '-1.5'], ['size', '1']] }]);
    for (const [key, value] of [['size', '1e3'], ['size', '99999999999999999'], ['uid', '-1'], ['gid', '4294967296'], ['mtime', 'NaN'], ['mtime', '1e400']]) {
      await assert.rejects(parse([{ name: 'a', type: '0', pax: [[key!, value!]] }]), CorruptArchiveError, `${key}=${value}`);
    }
    await assert.rejects(parse([{ name: 'a', type: '0', tweak: (b) => b.fill(0xff, 136, 148) }]), CorruptArchiveError, 'negative base-256 mtime');
    await assert.rejects(parse([{ name: 'a', type: '0', tweak: (b) => ((b[124] = 0x80), b.fill(0xff, 125, 136)) }]), CorruptArchiveError, 'base-256 size beyond 2^53');
    await assert.rejects(parse([{ name: 'a', type: '0', tweak: (b) => b.write('12x', 100, 'latin1') }]), CorruptArchiveError, 'mode with a letter');
  });

  it('refuses malformed PAX records and unknown sparse versions', async () => {
    const bad = (pax: [string, string][]): Promise<void> => parse([{ name: 'a', type: '0', pax }]);
    await assert.rejects(bad([['GNU.sparse.major', '2'], ['GNU.sparse.minor', '0'], ['GNU.sparse.realsize', '1']]), CorruptArchiveError);
    await assert.rejects(bad([['GNU.sparse.major', '1'], ['GNU.sparse.minor', '0']]), CorruptArchiveError, 'no real size');
    await assert.rejects(bad([['GNU.sparse.size', '10'], ['GNU.sparse.map', '0,5,3']]), CorruptArchiveError, 'odd map');
  });
});
