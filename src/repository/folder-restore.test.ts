/**
 * Hostile snapshot trees in a real repository (local backend), restored through both paths of a
 * snapshot restore: verification (before CVAT stops) refuses them, and neither the folder restore
 * (host path) nor the tar stream for the engine writes anything outside the volume, or runs for
 * ever, when handed one anyway.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CorruptArchiveError } from '../errors.js';
import { LocalBackend } from '../backend/local.js';
import { Repository } from './repository.js';
import { restoreVolumeToFolder } from './folder-restore.js';
import { snapshotVolumeTar, verifySnapshotVolume } from './restorer.js';
import { TarProcessor } from '../archive/tar.js';
import { GuardedTarStream } from '../archive/guarded-tar.js';
import { memberPrefixOf } from '../archive/manifest.js';
import { HOSTILE_TREES, hostileVolume } from '../../test/fixture/hostile-snapshot.js';

void describe('hostile snapshot trees (verification, folder restore, tar stream for the engine)', () => {
  let work: string;
  let outside: string;
  let repo: Repository;
  let canary: { ino: number; nlink: number };

  before(async () => {
    work = mkdtempSync(join(tmpdir(), 'hostile-trees-'));
    outside = join(work, 'outside');
    mkdirSync(outside);
    writeFileSync(join(outside, 'canary'), 'canary\n');
    const st = lstatSync(join(outside, 'canary'));
    canary = { ino: st.ino, nlink: st.nlink };
    repo = await Repository.init(new LocalBackend(join(work, 'repo')), 'pw', { kdf: { algorithm: 'scrypt', N: 1024, r: 8, p: 1 } });
  });
  after(() => rmSync(work, { recursive: true, force: true }));

  const untouched = (): void => {
    assert.deepEqual(readdirSync(outside), ['canary'], 'nothing new outside the volume');
    assert.equal(readFileSync(join(outside, 'canary'), 'utf8'), 'canary\n');
    const st = lstatSync(join(outside, 'canary'));
    assert.equal(st.ino, canary.ino, 'canary inode');
    assert.equal(st.nlink, canary.nlink, 'canary link count');
    assert.ok(readdirSync(work).every((n) => ['outside', 'repo'].includes(n) || n.startsWith('vol-')), `nothing new beside the volume: ${readdirSync(work).join(', ')}`);
  };

  for (const c of HOSTILE_TREES) {
    it(`${c.id}: ${c.what} → ${c.outcome}`, { timeout: 60_000 }, async () => {
      const { tree, entries } = await c.build(repo, outside);
      await repo.flush();
      const volume = hostileVolume(tree, entries);
      const folder = mkdtempSync(join(work, 'vol-'));
      const warnings: string[] = [];
      const verify = verifySnapshotVolume(repo, volume, { onWarning: (m) => warnings.push(m) });
      const toFolder = (): ReturnType<typeof restoreVolumeToFolder> => restoreVolumeToFolder(repo, volume, folder);
      const guarded = new GuardedTarStream(memberPrefixOf(volume.mountPath));
      const toEngine = (): Promise<void> =>
        pipeline(snapshotVolumeTar(repo, volume), new TarProcessor({ output: 'entries' }), guarded, new Writable({ write: (_c, _e, cb) => cb() }));
      if (c.outcome === 'refused') {
        await assert.rejects(verify, CorruptArchiveError, 'verification refuses the snapshot');
        await assert.rejects(toFolder(), 'the folder restore refuses it too');
        await assert.rejects(toEngine(), 'so does the stream for the engine');
      } else {
        await verify;
        const written = await toFolder();
        await toEngine();
        if (c.id === 'reserved-root') {
          assert.equal(warnings.length, 1, warnings.join('\n'));
          assert.match(warnings[0]!, /\.cvat-backup-rollback/);
        } else {
          assert.deepEqual(written.skipped.map((s) => s.replace(/ \(.*/, '')).sort(), ['fifo', 'null', 'sda']);
          assert.equal(guarded.skipped.length, 3);
        }
        assert.deepEqual(readdirSync(folder), ['ok.txt']);
        assert.equal(readFileSync(join(folder, 'ok.txt'), 'utf8'), 'ok\n');
      }
      untouched();
    });
  }
});
