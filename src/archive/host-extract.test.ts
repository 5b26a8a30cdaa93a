/**
 * Hostile archives restored on the host path: the set's verification (checkArchive, before CVAT
 * stops) refuses them, and the extractor refuses them too when handed one anyway (a set swapped
 * after verification). Nothing outside the volume folder may change: a canary file keeps its
 * content, inode and link count, and the folders around the volume get no new entry.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createReadStream } from 'node:fs';
import { createGunzip } from 'node:zlib';
import { pipeline } from 'node:stream/promises';
import { CorruptArchiveError } from '../errors.js';
import { checkArchive } from './archive-set.js';
import { HostExtractor } from './host-extract.js';
import { TarProcessor } from './tar.js';
import { HOSTILE_CASES, SKIPPED_CASE_FILES, gzipTar } from '../../test/fixture/hostile.js';

const PREFIX = 'home/django/data';

/** Every entry below `root` (relative paths), without following links. */
function listTree(root: string): string[] {
  const out: string[] = [];
  const walk = (dir: string, rel: string): void => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      const r = rel === '' ? name : `${rel}/${name}`;
      out.push(r);
      if (lstatSync(path).isDirectory()) walk(path, r);
    }
  };
  walk(root, '');
  return out.sort();
}

void describe('hostile archives on the host path (verification and extraction)', () => {
  let work: string;
  let outside: string;
  let canary: { ino: number; nlink: number };

  before(() => {
    work = mkdtempSync(join(tmpdir(), 'hostile-host-'));
    outside = join(work, 'outside');
    mkdirSync(outside);
    writeFileSync(join(outside, 'canary'), 'canary\n');
    const st = lstatSync(join(outside, 'canary'));
    canary = { ino: st.ino, nlink: st.nlink };
  });
  after(() => rmSync(work, { recursive: true, force: true }));

  const untouched = (): void => {
    assert.deepEqual(readdirSync(outside), ['canary'], 'nothing new outside the volume');
    assert.equal(readFileSync(join(outside, 'canary'), 'utf8'), 'canary\n', 'canary content');
    const st = lstatSync(join(outside, 'canary'));
    assert.equal(st.ino, canary.ino, 'canary inode');
    assert.equal(st.nlink, canary.nlink, 'canary link count');
    assert.ok(readdirSync(work).every((n) => n === 'outside' || n.startsWith('vol-') || n.startsWith('set-')), `nothing new beside the volume: ${readdirSync(work).join(', ')}`);
  };

  for (const c of HOSTILE_CASES) {
    it(`${c.id}: ${c.what} → ${c.outcome}`, { timeout: 30_000 }, async () => {
      const volume = mkdtempSync(join(work, 'vol-'));
      const archive = join(mkdtempSync(join(work, 'set-')), 'cvat_data.tar.gz');
      writeFileSync(archive, gzipTar(c.members(PREFIX, outside)));
      const extract = async (): Promise<HostExtractor> => {
        const extractor = new HostExtractor(volume, PREFIX);
        await pipeline(createReadStream(archive), createGunzip(), new TarProcessor({ output: 'entries' }), extractor);
        return extractor;
      };
      if (c.outcome === 'refused') {
        await assert.rejects(checkArchive(archive, PREFIX), (e: unknown) => e instanceof CorruptArchiveError && e.message.startsWith(archive), 'verification refuses the set');
        await assert.rejects(extract(), 'extraction refuses it too');
      } else {
        await checkArchive(archive, PREFIX);
        const extractor = await extract();
        assert.deepEqual(extractor.result.skipped.map((s) => s.replace(/ \(.*/, '')).sort(), [`${PREFIX}/fifo`, `${PREFIX}/null`, `${PREFIX}/sda`]);
        assert.deepEqual(listTree(volume), ['after.txt', 'ok', 'ok/first.txt']);
        for (const [path, content] of Object.entries(SKIPPED_CASE_FILES)) assert.equal(readFileSync(join(volume, path), 'utf8'), content);
      }
      untouched();
    });
  }
});
