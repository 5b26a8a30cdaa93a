/**
 * The repository over a real REST server (`rclone serve restic` on loopback), where listings carry
 * no modification times: locks judged on the server's clock (its Date replies; other hosts' clocks
 * set by faketime), and prune on an
 * append-only server refused before it writes anything.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { Backend } from '../backend/backend.js';
import { openBackend } from '../backend/open.js';
import { startRcloneServer, type RcloneServer } from '../backend/rclone-server.js';
import { StorageAccessError } from '../errors.js';
import { pruneRepository } from './prune.js';
import { initTestRepository, openTestRepository, prngBytes, writeSnapshot } from './testing.js';

const HOUR = 3_600_000;
const BIN = fileURLToPath(new URL('../../../bin/cvat-backup.js', import.meta.url));

/** The real command line on "another host": its clock moved by faketime. */
function cli(args: string[], skew: string): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('faketime', ['-f', skew, process.execPath, BIN, ...args], { env: { ...process.env, CVAT_BACKUP_PASSWORD: 'pw' }, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stderr }));
  });
}

const servers: RcloneServer[] = [];
const backends: Backend[] = [];
after(async () => {
  await Promise.allSettled(backends.map(async (b) => b.close?.()));
  await Promise.allSettled(servers.map((s) => s.stop()));
});
async function rest(options: { appendOnly?: boolean } = {}): Promise<() => Promise<Backend>> {
  const server = await startRcloneServer(options);
  servers.push(server);
  return async () => {
    const backend = await openBackend(`rest:${server.url}/repo`);
    backends.push(backend);
    return backend;
  };
}

void describe('repository on a REST server', () => {
  void it('a host whose clock runs 3 hours ahead cannot take a live lock for stale; one 2 hours behind takes a really stale one over (faketime)', async () => {
    const open = await rest();
    const writer = await initTestRepository(await open(), { locks: { hostname: 'host-a', pid: 1 } });
    assert.deepEqual((await writer.backend.list('keys')).map((f) => f.modifiedMs), [undefined], 'this server lists no times');
    const held = await writer.lock('backup');
    const location = writer.backend.location;
    // Another host: the real command line under a clock 3 hours ahead.
    const ahead = await cli(['-r', location, 'prune'], '+3h');
    assert.equal(ahead.code, 10, ahead.stderr);
    assert.match(ahead.stderr, /locked by .*host-a/);
    await writer.assertLockHeld();
    await held.release();

    // A lock whose holder stopped refreshing an hour ago, by the server's clock.
    const backend = await open();
    await backend.exists();
    const then = new Date(Date.now() + backend.clockOffsetMs!()! - HOUR).toISOString();
    const stale = { version: 1, exclusive: false, operation: 'backup', hostname: 'host-gone', pid: 9, created: then, time: then };
    await backend.save('locks', 'ab'.repeat(32), Buffer.from(JSON.stringify(stale)));
    const behind = await cli(['-r', location, 'prune'], '-2h');
    assert.equal(behind.code, 0, behind.stderr);
    assert.deepEqual(await backend.list('locks'), [], 'the stale lock was taken over and removed');
  });

  void it('append-only: backups and their locks work; prune refuses with one line before writing anything', async () => {
    const open = await rest({ appendOnly: true });
    const repo = await initTestRepository(await open());
    const lock = await repo.lock('backup');
    await repo.loadIndex();
    // A blob no snapshot uses, in the pack and index file of used ones: prune would repack.
    await repo.saveBlob('data', prngBytes(2, 100_000));
    await writeSnapshot(repo, { 'a.bin': prngBytes(1, 200_000) });
    await lock.release();
    assert.deepEqual(await repo.backend.list('locks'), [], 'the lock file was removed');

    const before = async (): Promise<string[]> => (await Promise.all((['data', 'index', 'snapshots', 'state'] as const).map(async (k) => (await repo.backend.list(k)).map((f) => `${k}/${f.name}`)))).flat().sort();
    const stored = await before();
    const pruner = await openTestRepository(await open());
    const exclusive = await pruner.lock('prune');
    await assert.rejects(pruneRepository(pruner, { graceMs: 0 }), (e: unknown) => e instanceof StorageAccessError && e.exitCode === 17 && /append-only/.test(e.message) && !e.message.includes('\n'));
    await exclusive.release();
    assert.deepEqual(await before(), stored, 'prune wrote nothing');
  });
});
