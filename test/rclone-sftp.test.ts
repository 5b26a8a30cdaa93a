/**
 * `rclone:` over an SFTP remote: rclone (started by us, speaking HTTP/2 on its stdio) logs in to a
 * real OpenSSH sshd on loopback (test/support/sshd.ts) with a key and a known_hosts file given
 * through RCLONE_CONFIG_* variables, and the Backend contract holds end to end. rclone writes
 * SFTP files in place, so a file being saved can be seen half-written (atomicSaves: false).
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { conformance } from '../src/backend/conformance.js';
import { openBackend } from '../src/backend/open.js';
import { startSshd, type SshServer } from './support/sshd.js';

const isRoot = process.getuid?.() === 0;
let server: Promise<SshServer> | undefined;
let counter = 0;
after(async () => (await server)?.stop());

/** An rclone remote `sshtest:` made of environment variables only (no config file of the user's). */
function rcloneEnv(s: SshServer): NodeJS.ProcessEnv {
  return {
    ...process.env,
    RCLONE_CONFIG: join(s.dir, 'rclone.conf-none'),
    RCLONE_CONFIG_SSHTEST_TYPE: 'sftp',
    RCLONE_CONFIG_SSHTEST_HOST: s.host,
    RCLONE_CONFIG_SSHTEST_PORT: String(s.port),
    RCLONE_CONFIG_SSHTEST_USER: s.user,
    RCLONE_CONFIG_SSHTEST_KEY_FILE: s.identityFile,
    RCLONE_CONFIG_SSHTEST_KNOWN_HOSTS_FILE: s.knownHostsFile,
  };
}

if (isRoot) {
  conformance(
    'rclone over SFTP (a real sshd)',
    async () => {
      const s = await (server ??= startSshd());
      const backend = await openBackend(`rclone:sshtest:${s.home}/repo-${++counter}`, { env: rcloneEnv(s) });
      return { backend, dispose: () => undefined };
    },
    { atomicSaves: false, largeSize: 12 << 20 },
  );
}

describe('rclone: over SFTP', { skip: !isRoot && 'sshd needs root' }, () => {
  let s: SshServer;
  before(async () => {
    s = await (server ??= startSshd());
  });

  it('stores files on the SSH server in restic’s layout, and refuses an unknown host key with rclone’s reason in one line', async () => {
    const backend = await openBackend(`rclone:sshtest:${s.home}/layout`, { env: rcloneEnv(s) });
    try {
      await backend.create();
      await backend.save('data', 'ab'.repeat(32), Buffer.from('pack'));
      assert.deepEqual(await readdir(join(s.home, 'layout', 'data', 'ab')), ['ab'.repeat(32)]);
    } finally {
      await backend.close?.();
    }
    const stranger = await openBackend(`rclone:sshtest:${s.home}/x`, { env: { ...rcloneEnv(s), RCLONE_CONFIG_SSHTEST_KNOWN_HOSTS_FILE: '/dev/null', RCLONE_LOW_LEVEL_RETRIES: '1' }, retry: { attempts: 1 } });
    try {
      await assert.rejects(stranger.exists(), (e: unknown) => /rclone stopped: .*(knownhosts|host key|unknown)/i.test((e as Error).message) && !(e as Error).message.includes('\n'));
    } finally {
      await stranger.close?.();
    }
  });
});
