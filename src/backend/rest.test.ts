/**
 * The REST backend against a real `rclone serve restic` on loopback (rest:) and a real rclone
 * child over stdio (rclone:): the Backend contract, credentials, append-only servers, rclone's
 * lifecycle and errors, and where secrets never appear.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StorageAccessError, TargetNotEmptyError, UsageError } from '../errors.js';
import type { Backend } from './backend.js';
import { conformance } from './conformance.js';
import { openBackend } from './open.js';
import { startRcloneServer, type RcloneServer } from './rclone-server.js';
import { splitWords, type RestBackend } from './rest.js';

const SECRET = 'pw-Zq81-never-shown';
let shared: Promise<RcloneServer> | undefined;
let counter = 0;
const server = (): Promise<RcloneServer> => (shared ??= startRcloneServer({ user: { name: 'backup', password: SECRET } }));
const restEnv = { CVAT_BACKUP_REST_USERNAME: 'backup', CVAT_BACKUP_REST_PASSWORD: SECRET };
after(async () => (await shared)?.stop());

/** An rclone remote made of environment variables only: a local folder. */
const rcloneEnv = (dir: string): NodeJS.ProcessEnv => ({ ...process.env, RCLONE_CONFIG: join(dir, 'rclone.conf'), RCLONE_CONFIG_TESTLOCAL_TYPE: 'local' });

// rclone writes a folder remote's files in place: a file being saved is seen half-written.
conformance(
  'rest (rclone serve restic over a folder)',
  async () => {
    const s = await server();
    const backend = await openBackend(`rest:${s.url}/repo-${++counter}`, { env: restEnv });
    return { backend, dispose: () => undefined };
  },
  { atomicSaves: false, largeSize: 12 << 20 },
);
// An object store's uploads appear whole: so do ours through it.
let memory: Promise<RcloneServer> | undefined;
after(async () => (await memory)?.stop());
conformance(
  'rest (rclone serve restic over an object store)',
  async () => {
    const s = await (memory ??= startRcloneServer({ remote: ':memory:' }));
    const backend = await openBackend(`rest:${s.url}/repo-${++counter}`, { env: {} });
    return { backend, dispose: () => undefined };
  },
  { largeSize: 12 << 20 },
);

conformance('rclone', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'rclone-backend-'));
  writeFileSync(join(dir, 'rclone.conf'), '');
  const backend = await openBackend(`rclone:testlocal:${dir}/repo`, { env: rcloneEnv(dir) });
  return { backend, dispose: () => rmSync(dir, { recursive: true, force: true }) };
}, { atomicSaves: false, largeSize: 12 << 20 });

async function withBackend(location: string, env: NodeJS.ProcessEnv, fn: (backend: Backend) => Promise<void>): Promise<void> {
  const backend = await openBackend(location, { env });
  try {
    await fn(backend);
  } finally {
    await backend.close?.();
  }
}

void describe('rest: backend', () => {
  void it('stores files where rest-server and restic put them, and create refuses a path that holds repository files', async () => {
    const s = await server();
    await withBackend(`rest:${s.url}/layout`, restEnv, async (backend) => {
      await backend.create();
      await backend.save('config', 'config', Buffer.from('c'));
      await backend.save('data', 'ab'.repeat(32), Buffer.from('pack'));
      await backend.save('locks', 'cd'.repeat(32), Buffer.from('lock'));
      assert.equal(readFileSync(join(s.dir, 'layout', 'config'), 'utf8'), 'c');
      assert.equal(readFileSync(join(s.dir, 'layout', 'data', 'ab', 'ab'.repeat(32)), 'utf8'), 'pack');
      assert.ok(existsSync(join(s.dir, 'layout', 'locks', 'cd'.repeat(32))));
      await assert.rejects(backend.create(), TargetNotEmptyError);
      // The server's clock, from its Date replies (loopback: the same clock, within a second or two).
      assert.ok(Math.abs((backend as RestBackend).clockOffsetMs()!) < 2000);
    });
    await withBackend(`rest:${s.url}/other`, restEnv, async (backend) => {
      await backend.save('snapshots', 'ef'.repeat(32), Buffer.from('s'));
      await assert.rejects(backend.create(), (e: unknown) => e instanceof TargetNotEmptyError && /not empty/.test(e.message));
    });
  });

  void it('credentials: a wrong or missing password is one line without the secret; a password file works', async () => {
    const s = await server();
    for (const env of [{}, { CVAT_BACKUP_REST_USERNAME: 'backup', CVAT_BACKUP_REST_PASSWORD: `${SECRET}-wrong` }]) {
      await withBackend(`rest:${s.url}/creds`, env, async (backend) => {
        await assert.rejects(backend.exists(), (e: unknown) => e instanceof StorageAccessError && e.exitCode === 17 && /401/.test(e.message) && !e.message.includes(SECRET) && !e.message.includes('\n'));
      });
    }
    const dir = mkdtempSync(join(tmpdir(), 'rest-pw-'));
    try {
      writeFileSync(join(dir, 'pw'), `${SECRET}\n`, { mode: 0o600 });
      await withBackend(`rest:${s.url}/creds`, { CVAT_BACKUP_REST_USERNAME: 'backup', CVAT_BACKUP_REST_PASSWORD_FILE: join(dir, 'pw') }, async (backend) => {
        assert.equal(await backend.exists(), false);
      });
      await assert.rejects(openBackend(`rest:${s.url}/x`, { env: { CVAT_BACKUP_REST_PASSWORD: SECRET } }), UsageError);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    await assert.rejects(openBackend(`rest:http://backup:${SECRET}@127.0.0.1:1/x`), (e: unknown) => e instanceof UsageError && !e.message.includes(SECRET));
  });

  void it('an unreachable server is an error naming the location, with the code kept for retries', async () => {
    const backend = await openBackend('rest:http://127.0.0.1:1/x', { env: {}, retry: { attempts: 1 } });
    await assert.rejects(backend.exists(), (e: unknown) => (e as NodeJS.ErrnoException).code === 'ECONNREFUSED' && /rest:http:\/\/127\.0\.0\.1:1\/x/.test((e as Error).message));
    await backend.close?.();
  });

  void it('append-only (rclone serve restic --append-only): files and lock removals go through; other deletes and overwrites are refused with one line', async () => {
    const s = await startRcloneServer({ appendOnly: true });
    try {
      await withBackend(`rest:${s.url}/repo`, {}, async (backend) => {
        await backend.create();
        await backend.save('data', 'ab'.repeat(32), Buffer.from('pack'));
        await backend.save('data', 'ab'.repeat(32), Buffer.from('pack')); // the same bytes again: done
        await assert.rejects(backend.save('data', 'ab'.repeat(32), Buffer.from('other')), (e: unknown) => e instanceof StorageAccessError && /append-only/.test(e.message));
        await backend.save('locks', 'cd'.repeat(32), Buffer.from('lock'));
        await backend.remove('locks', 'cd'.repeat(32));
        assert.deepEqual(await backend.list('locks'), []);
        const refused = (e: unknown): boolean => e instanceof StorageAccessError && e.exitCode === 17 && /append-only/.test(e.message) && /forget and prune/.test(e.message) && !e.message.includes('\n');
        await assert.rejects(backend.remove('data', 'ab'.repeat(32)), refused);
        await assert.rejects(backend.assertDeletes!(), refused);
        assert.equal((await backend.load('data', 'ab'.repeat(32))).toString(), 'pack', 'still there');
      });
      // A server that deletes passes the check.
      const plain = await server();
      await withBackend(`rest:${plain.url}/deletes`, restEnv, (backend) => backend.assertDeletes!());
    } finally {
      await s.stop();
    }
  });
});

void describe('rclone: backend', () => {
  void it('runs the configured program with its arguments, gives it no CVAT_BACKUP_* variable, and close() ends it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'rclone-child-'));
    try {
      writeFileSync(join(dir, 'rclone.conf'), '');
      // A wrapper program, as `ssh host rclone` would be: it records its arguments and environment.
      writeFileSync(join(dir, 'wrapper.sh'), `#!/bin/sh\necho "$@" > "${dir}/args"\nenv > "${dir}/env"\nexec rclone "$@"\n`, { mode: 0o755 });
      const env = {
        ...rcloneEnv(dir),
        CVAT_BACKUP_PASSWORD: SECRET,
        CVAT_BACKUP_REST_PASSWORD: SECRET,
        CVAT_BACKUP_RCLONE_PROGRAM: `sh ${join(dir, 'wrapper.sh')}`,
        CVAT_BACKUP_RCLONE_ARGS: 'serve restic --stdio --append-only',
      };
      await withBackend(`rclone:testlocal:${dir}/repo`, env, async (backend) => {
        await backend.create();
        await backend.save('keys', 'k1', Buffer.from('key'));
        assert.equal(readFileSync(join(dir, 'args'), 'utf8').trim(), `serve restic --stdio --append-only testlocal:${dir}/repo`);
        assert.ok(!readFileSync(join(dir, 'env'), 'utf8').includes(SECRET), 'no secret in rclone’s environment');
        assert.match(readFileSync(join(dir, 'env'), 'utf8'), /RCLONE_CONFIG_TESTLOCAL_TYPE=local/);
        await assert.rejects(backend.remove('keys', 'k1'), /append-only/);
      });
      const pids = execFileSync('ps', ['-eo', 'pid,args'], { encoding: 'utf8' });
      assert.ok(!pids.includes(`${dir}/repo`), 'rclone is gone after close()');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void it("rclone's own failures are one line with rclone's reason; a missing program says what to install", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'rclone-fail-'));
    try {
      writeFileSync(join(dir, 'rclone.conf'), '');
      await withBackend('rclone:nosuchremote:repo', rcloneEnv(dir), async (backend) => {
        await assert.rejects(backend.exists(), (e: unknown) => e instanceof StorageAccessError && /rclone stopped: .*nosuchremote/.test(e.message) && !e.message.includes('\n'));
      });
      await withBackend('rclone:testlocal:/x', { ...rcloneEnv(dir), CVAT_BACKUP_RCLONE_PROGRAM: '/nonexistent/rclone' }, async (backend) => {
        await assert.rejects(backend.exists(), (e: unknown) => e instanceof UsageError && /install rclone, or set CVAT_BACKUP_RCLONE_PROGRAM/.test(e.message));
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void it('splits program and argument settings as a shell would', () => {
    assert.deepEqual(splitWords(`ssh -p 2222 'backup host' "a b"c rclone`), ['ssh', '-p', '2222', 'backup host', 'a bc', 'rclone']);
    assert.deepEqual(splitWords('  '), []);
    assert.throws(() => splitWords("ssh 'x"), UsageError);
  });
});
