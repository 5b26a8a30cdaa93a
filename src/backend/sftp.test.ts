/**
 * The SFTP backend without ssh: the Backend contract (conformance.ts) and the backend's own rules
 * over OpenSSH's real `sftp-server` on pipes (`--sftp-command` points at it), and the protocol
 * client against a scripted server that reorders replies, answers short, lies about lengths or
 * hangs up. The same backend through a real sshd is test/sftp.test.ts.
 */
import { describe, it } from 'node:test';
import { spawn } from 'node:child_process';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough, type Readable, type Writable } from 'node:stream';
import { classifyError, StorageAccessError, TargetNotEmptyError, UsageError } from '../errors.js';
import { conformance } from './conformance.js';
import { openBackend } from './open.js';
import { loginFailure, SftpBackend, sshCommand, splitCommand, type SftpOptions } from './sftp.js';
import { MAX_PACKET, OPEN_FLAGS, SftpError, SftpSession } from './sftp-protocol.js';
import { transientReason } from './retry.js';
import { socketPair } from './socket-pair.js';

const SFTP_SERVER = '/usr/lib/openssh/sftp-server';
const noServer = !existsSync(SFTP_SERVER) && `needs OpenSSH's ${SFTP_SERVER} (apt-get install openssh-server)`;

const withDir = async (fn: (dir: string) => Promise<void>): Promise<void> => {
  const dir = mkdtempSync(join(tmpdir(), 'sftp-backend-'));
  try {
    await fn(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
};

const backendAt = (path: string, options: SftpOptions = { command: [SFTP_SERVER] }): SftpBackend =>
  new SftpBackend({ user: undefined, host: 'storage', port: undefined, path, text: `sftp:storage:${path}` }, options);

if (noServer) void describe('SFTP backend over sftp-server', { skip: noServer }, () => undefined);
else
  conformance('sftp (OpenSSH sftp-server on pipes)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'sftp-conformance-'));
    return { backend: backendAt(join(dir, 'repo')), dispose: () => rmSync(dir, { recursive: true, force: true }) };
  });

void describe('SFTP backend over sftp-server', { skip: noServer }, () => {
  void it('lays out the repository like the local backend, refuses a folder that holds something else', async () => {
    await withDir(async (dir) => {
      mkdirSync(join(dir, 'photos'));
      writeFileSync(join(dir, 'photos', 'holiday.jpg'), 'jpeg');
      const photos = backendAt(join(dir, 'photos'));
      await assert.rejects(photos.create(), (e: unknown) => e instanceof TargetNotEmptyError && /not empty/.test(e.message));
      await photos.close();
      assert.deepEqual(readdirSync(join(dir, 'photos')), ['holiday.jpg']);

      const backend = backendAt(join(dir, 'deep', 'er', 'repo'));
      await backend.create();
      await backend.create(); // the empty layout an interrupted create left is fine
      const root = join(dir, 'deep', 'er', 'repo');
      assert.deepEqual(readdirSync(root).sort(), ['data', 'index', 'keys', 'locks', 'snapshots', 'state']);
      assert.equal(readdirSync(join(root, 'data')).length, 256);
      assert.equal(statSync(join(root, 'data', 'ff')).mode & 0o777, 0o700);
      await backend.save('data', 'ff'.repeat(32), Buffer.from('pack'));
      await backend.save('config', 'config', Buffer.from('c'));
      assert.equal(readFileSync(join(root, 'data', 'ff', 'ff'.repeat(32)), 'utf8'), 'pack');
      assert.equal(statSync(join(root, 'data', 'ff', 'ff'.repeat(32))).mode & 0o777, 0o600);
      assert.ok(await backend.exists());
      await backend.close();
      await backend.close();
    });
  });

  void it('moves large files in pipelined chunks, ranges included, and gathers thousands of tiny parts', async () => {
    await withDir(async (dir) => {
      const backend = backendAt(join(dir, 'repo'));
      await backend.create();
      const big = Buffer.alloc(5 * 1024 * 1024 + 123);
      for (let i = 0; i < big.length; i++) big[i] = (i * 31 + (i >> 11)) & 0xff;
      await backend.save('data', '01'.repeat(32), big);
      assert.ok((await backend.load('data', '01'.repeat(32))).equals(big));
      assert.ok((await backend.load('data', '01'.repeat(32), { offset: 1_000_003, length: 700_001 })).equals(big.subarray(1_000_003, 1_700_004)));
      assert.ok((await backend.load('data', '01'.repeat(32), { offset: big.length - 10, length: 100 })).equals(big.subarray(big.length - 10)));
      assert.equal((await backend.load('data', '01'.repeat(32), { offset: big.length + 5, length: 10 })).length, 0);
      const tiny = Array.from({ length: 5000 }, (_, i) => Buffer.from(`blob ${i};`));
      await backend.save('data', '02'.repeat(32), tiny);
      assert.equal((await backend.load('data', '02'.repeat(32))).toString(), Buffer.concat(tiny).toString());
      // Saves of many files at once share the one connection.
      await Promise.all(Array.from({ length: 40 }, (_, i) => backend.save('index', `i${i}`, Buffer.alloc(70_000, i))));
      const listed = await backend.list('index');
      assert.equal(listed.length, 40);
      assert.ok(listed.every((f) => f.size === 70_000));
      await backend.close();
    });
  });

  void it('shows the leftovers of interrupted saves only as temporary files, for prune', async () => {
    await withDir(async (dir) => {
      const root = join(dir, 'repo');
      // A save cut off mid-upload: this server hangs up after 300 kB, as a dropped connection would.
      const cutter = join(dir, 'cut.mjs');
      writeFileSync(
        cutter,
        `import { spawn } from 'node:child_process';
const server = spawn(${JSON.stringify(SFTP_SERVER)}, [], { stdio: ['pipe', 'inherit', 'inherit'] });
let left = 300000;
process.stdin.on('data', (chunk) => {
  if (left <= 0) return;
  server.stdin.write(chunk.subarray(0, left));
  left -= chunk.length;
  if (left <= 0) server.stdin.end();
});
server.on('exit', () => process.exit(0));
`,
      );
      const backend = backendAt(root);
      await backend.create();
      const cut = backendAt(root, { command: [process.execPath, cutter] });
      await assert.rejects(cut.save('data', 'ab'.repeat(32), Buffer.alloc(2_000_000, 1)), (e: unknown) => (e as SftpError).code === 'ECONNRESET');
      await cut.close();
      assert.deepEqual(await backend.list('data'), [], 'nothing half-written is visible');
      const temporaries = await backend.listTemporary();
      assert.equal(temporaries.length, 1);
      assert.equal(temporaries[0]!.kind, 'data');
      assert.match(temporaries[0]!.name, /^ab\/\.tmp-[0-9a-f]{16}$/);
      assert.ok(temporaries[0]!.modifiedMs !== undefined && Math.abs(temporaries[0]!.modifiedMs - Date.now()) < 60_000);
      await backend.removeTemporary(temporaries[0]!);
      await backend.removeTemporary(temporaries[0]!);
      assert.deepEqual(readdirSync(join(root, 'data', 'ab')), []);
      await assert.rejects(backend.removeTemporary({ kind: 'index', name: '../config', size: 0, modifiedMs: 0 }), /not a temporary file/);
      await backend.close();
    });
  });

  void it('connects again after the connection dropped; the calls in flight fail with ECONNRESET', async () => {
    await withDir(async (dir) => {
      const pidFile = join(dir, 'server.pid');
      const backend = backendAt(join(dir, 'repo'), { command: ['sh', '-c', `echo $$ > ${pidFile}; exec ${SFTP_SERVER}`] });
      await backend.create();
      await backend.save('keys', 'k1', Buffer.from('key'));
      const first = Number(readFileSync(pidFile, 'utf8'));
      const inFlight = backend.load('keys', 'k1').then(
        () => 'loaded',
        (e: unknown) => (e as SftpError).code,
      );
      process.kill(first, 'SIGKILL');
      assert.ok(['loaded', 'ECONNRESET'].includes(await inFlight));
      while (existsSync(`/proc/${first}`) && !/^State:\s+Z/m.test(readFileSync(`/proc/${first}/status`, 'utf8'))) await new Promise((r) => setTimeout(r, 10));
      await new Promise((r) => setTimeout(r, 50));
      assert.equal((await backend.load('keys', 'k1')).toString(), 'key');
      assert.notEqual(Number(readFileSync(pidFile, 'utf8')), first, 'a new server process');
      // Marked passing for the retry wrapper; if it outlasts the retries, the CLI says so in one line (exit 17).
      const dropped = new SftpError('sftp:storage:/repo: the SFTP connection ended (ssh exited with code 255)', 'ECONNRESET', undefined);
      assert.equal(transientReason(dropped), 'connection reset');
      const final = classifyError(dropped);
      assert.ok(final instanceof StorageAccessError && final.exitCode === 17 && /retries used up: sftp:storage/.test(final.message));
      await backend.close();
    });
  });

  void it('a Ctrl-C (SIGINT to the whole process group) leaves the connection up for the cleanup', async () => {
    await withDir(async (dir) => {
      // A command in its own process group, as in a terminal: on SIGINT it still saves (its lock removal, say).
      const script = join(dir, 'interrupted.mjs');
      writeFileSync(
        script,
        `import { SftpBackend } from ${JSON.stringify(new URL('./sftp.js', import.meta.url).href)};
const backend = new SftpBackend({ user: undefined, host: 'storage', port: undefined, path: ${JSON.stringify(join(dir, 'repo'))}, text: 'sftp:storage:repo' }, { command: [${JSON.stringify(SFTP_SERVER)}] });
await backend.create();
process.on('SIGINT', async () => {
  await backend.save('locks', 'cleanup', Buffer.from('after Ctrl-C')).then(() => console.log('saved'), (e) => console.log('failed: ' + e.message));
  await backend.close();
  process.exit(0);
});
console.log('ready');
setInterval(() => undefined, 1000);
`,
      );
      const child = spawn(process.execPath, [script], { detached: true, stdio: ['ignore', 'pipe', 'inherit'] });
      let output = '';
      child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
      const exited = new Promise((resolve) => child.once('exit', resolve));
      while (!output.includes('ready')) await new Promise((r) => setTimeout(r, 20));
      process.kill(-child.pid!, 'SIGINT');
      await exited;
      assert.equal(output.trim(), 'ready\nsaved');
      assert.equal(readFileSync(join(dir, 'repo', 'locks', 'cleanup'), 'utf8'), 'after Ctrl-C');
    });
  });

  void it('works with a server that offers no extensions (version 3 rename, no fsync)', async () => {
    await withDir(async (dir) => {
      // A filter between us and sftp-server that deletes the extensions from its VERSION packet.
      const filter = join(dir, 'plain-v3.mjs');
      writeFileSync(
        filter,
        `import { spawn } from 'node:child_process';
const server = spawn(${JSON.stringify(SFTP_SERVER)}, [], { stdio: ['inherit', 'pipe', 'inherit'] });
let first = true; let held = Buffer.alloc(0);
server.stdout.on('data', (chunk) => {
  if (!first) return process.stdout.write(chunk);
  held = Buffer.concat([held, chunk]);
  if (held.length < 4 || held.length < 4 + held.readUInt32BE(0)) return;
  const rest = held.subarray(4 + held.readUInt32BE(0));
  first = false;
  process.stdout.write(Buffer.from([0, 0, 0, 5, 2, 0, 0, 0, 3]));
  process.stdout.write(rest);
});
server.on('exit', () => process.exit(0));
`,
      );
      const backend = backendAt(join(dir, 'repo'), { command: [process.execPath, filter] });
      await backend.create();
      await backend.save('index', 'same', Buffer.from('one'));
      await backend.save('index', 'same', Buffer.from('one')); // idempotent without posix-rename
      assert.equal((await backend.load('index', 'same')).toString(), 'one');
      assert.deepEqual((await backend.list('index')).map((f) => f.name), ['same']);
      await backend.close();
    });
  });
});

void describe('ssh command line', () => {
  void it('is ssh with BatchMode, the port, the user, then -- and the host: no credentials, nothing ssh could take for an option', () => {
    const location = { user: 'backup', host: 'nas', port: 2222, path: '/srv/repo' };
    assert.deepEqual(sshCommand(location), ['ssh', '-o', 'BatchMode=yes', '-p', '2222', '-l', 'backup', '-s', '--', 'nas', 'sftp']);
    assert.deepEqual(sshCommand({ user: undefined, host: 'alias', port: undefined, path: 'repo' }, { args: ['-i', '/k ey'] }), ['ssh', '-i', '/k ey', '-o', 'BatchMode=yes', '-s', '--', 'alias', 'sftp']);
    assert.deepEqual(sshCommand(location, { command: ['my-ssh', 'nas'] }), ['my-ssh', 'nas']);
    assert.throws(() => sshCommand({ ...location, host: '-oProxyCommand=touch /tmp/x' }), UsageError);
    assert.throws(() => sshCommand({ ...location, user: '-oProxyCommand=x' }), UsageError);
  });

  void it('a location that ssh would misread is refused when the backend is opened', async () => {
    await assert.rejects(openBackend('sftp:-oProxyCommand=touch:/repo'), UsageError);
    const backend = await openBackend('sftp://backup@nas:2222//srv/repo', { env: {} });
    assert.equal(backend.location, 'sftp:backup@nas:2222:/srv/repo');
  });

  void it('--sftp-command and --sftp-args are split like a shell splits words, with quotes', () => {
    assert.deepEqual(splitCommand(`ssh -i '/keys/my key' -o "ProxyJump=a b" host\\ name -s sftp`), ['ssh', '-i', '/keys/my key', '-o', 'ProxyJump=a b', 'host name', '-s', 'sftp']);
    assert.deepEqual(splitCommand(`  a  ""  'b'`), ['a', '', 'b']);
    assert.throws(() => splitCommand(`ssh 'open`), UsageError);
  });

  void it("ssh's refusals become one line that says what happened and what to do", () => {
    const changed = `@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\nIT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\r\nHost key for [127.0.0.1]:2222 has changed and you have requested strict checking.\r\nHost key verification failed.\r\n`;
    const cases: [string, RegExp][] = [
      [changed, /host key of nas has CHANGED, refused .*ssh-keygen -R nas/],
      ['No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\r\nHost key verification failed.\r\n', /host key of nas is not known, refused/],
      ['backup@127.0.0.1: Permission denied (publickey).\r\n', /login was refused \(backup@127.0.0.1: Permission denied \(publickey\).\)/],
      ['ssh: connect to host 127.0.0.1 port 1: Connection refused\r\n', /cannot reach nas \(ssh: connect to host 127.0.0.1 port 1: Connection refused\)/],
      ['ssh: Could not resolve hostname nas: Name or service not known\r\n', /cannot reach nas/],
      ['subsystem request failed on channel 0\r\n', /no SFTP subsystem/],
      ['', /ssh could not start an SFTP session \(ssh exited with code 255\)/],
    ];
    for (const [stderr, expected] of cases) {
      const error = loginFailure('sftp:nas:/repo', 'nas', stderr, 'ssh exited with code 255');
      assert.ok(error instanceof StorageAccessError);
      assert.equal(error.exitCode, 17);
      assert.match(error.message, expected);
      assert.doesNotMatch(error.message, /\n/);
    }
  });
});

/**
 * A scripted SFTP server on in-memory streams: answers INIT with VERSION 3, then hands every
 * request to `reply`, which writes what it likes.
 */
function scriptedServer(
  reply: (type: number, id: number, body: Buffer, send: (packet: Buffer, claimedLength?: number) => void, raw: (bytes: Buffer) => void) => void,
  options: { inPlace?: boolean } = {},
): { session: Promise<SftpSession>; requests: () => number; readsInPlace: () => number; close: () => void } {
  let requests = 0;
  let inPlace = 0;
  let close = (): void => undefined;
  const serve = (toServer: Readable, toClient: Writable): void => {
    let held = Buffer.alloc(0);
    const send = (packet: Buffer, claimedLength = packet.length): void => {
      const length = Buffer.alloc(4);
      length.writeUInt32BE(claimedLength);
      toClient.write(Buffer.concat([length, packet]));
    };
    toServer.on('data', (chunk: Buffer) => {
      held = Buffer.concat([held, chunk]);
      while (held.length >= 4 && held.length >= 4 + held.readUInt32BE(0)) {
        const packet = held.subarray(4, 4 + held.readUInt32BE(0));
        held = held.subarray(4 + packet.length);
        if (packet[0] === 1) send(Buffer.from([2, 0, 0, 0, 3]));
        else {
          requests++;
          reply(packet[0]!, packet.readUInt32BE(1), packet.subarray(5), send, (bytes) => toClient.write(bytes));
        }
      }
    });
  };
  let session: Promise<SftpSession>;
  if (options.inPlace) {
    // As sftp.ts connects: a socket pair whose end we read in place (SftpSession.readBuffer).
    session = (async () => {
      const holder: { session?: SftpSession; scratch?: ArrayBufferLike | undefined } = {};
      const [ours, theirs] = await socketPair({
        buffer: () => {
          const next = holder.session?.readBuffer() ?? Buffer.alloc(64 << 10);
          holder.scratch ??= holder.session && next.length === 64 << 10 ? next.buffer : undefined;
          if (holder.scratch && next.buffer !== holder.scratch) inPlace++;
          return next;
        },
        callback: (n, buffer) => {
          holder.session!.received(n, buffer);
          return true;
        },
      });
      serve(theirs, theirs);
      close = () => {
        ours.destroy();
        theirs.destroy();
      };
      const started = SftpSession.begin(ours, ours, { maxInFlight: 4, readsInPlace: true });
      holder.session = started.session;
      return started.ready;
    })();
  } else {
    const toServer = new PassThrough();
    const toClient = new PassThrough();
    serve(toServer, toClient);
    session = SftpSession.start(toClient, toServer, { maxInFlight: 4 });
  }
  return { session, requests: () => requests, readsInPlace: () => inPlace, close: () => close() };
}

const idOf = (id: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(id);
  return b;
};
const stringOf = (text: Buffer): Buffer => Buffer.concat([idOf(text.length), text]);
const statusOf = (id: number, code: number): Buffer => Buffer.concat([Buffer.from([101]), idOf(id), idOf(code), stringOf(Buffer.from('msg')), stringOf(Buffer.alloc(0))]);

void describe('SFTP protocol client', () => {
  void it('pipelines requests, never more than maxInFlight at once, and matches replies in any order', async () => {
    const waiting: { id: number; send: (p: Buffer) => void }[] = [];
    let most = 0;
    let flush: NodeJS.Timeout | undefined;
    const server = scriptedServer((_type, id, _body, send) => {
      waiting.push({ id, send });
      most = Math.max(most, waiting.length);
      // Answer what came in the last moment, in reverse order.
      flush ??= setTimeout(() => {
        flush = undefined;
        for (const w of waiting.splice(0).reverse()) w.send(statusOf(w.id, w.id % 2 === 0 ? 0 : 2));
      }, 5);
    });
    const session = await server.session;
    const results = await Promise.allSettled(Array.from({ length: 10 }, (_, i) => session.remove(`/f${i}`)));
    assert.equal(most, 4);
    // Ids start at 1: odd ids were answered "no such file".
    assert.deepEqual(
      results.map((r) => (r.status === 'fulfilled' ? 'ok' : (r.reason as SftpError).code)),
      Array.from({ length: 10 }, (_, i) => ((i + 1) % 2 === 0 ? 'ok' : 'ENOENT')),
    );
  });

  void it('reads a range whole from a server that answers short, and stops at the end of the file', async () => {
    const file = Buffer.from(Array.from({ length: 100_000 }, (_, i) => i % 251));
    const server = scriptedServer((type, id, body, send) => {
      if (type !== 5) return send(statusOf(id, 8));
      const handleLength = body.readUInt32BE(0);
      const offset = Number(body.readBigUInt64BE(4 + handleLength));
      const length = body.readUInt32BE(12 + handleLength);
      if (offset >= file.length) return send(statusOf(id, 1));
      const data = file.subarray(offset, Math.min(offset + length, offset + 777, file.length));
      send(Buffer.concat([Buffer.from([103]), idOf(id), stringOf(data)]));
    });
    const session = await server.session;
    const got = await session.readRange(Buffer.from('h'), 1000, 50_000, { chunk: 4096, window: 8 });
    assert.ok(got.equals(file.subarray(1000, 51_000)));
    const tail = await session.readRange(Buffer.from('h'), 90_000, 50_000, { chunk: 4096, window: 8 });
    assert.ok(tail.equals(file.subarray(90_000)));
  });

  for (const inPlace of [false, true]) {
    void it(`reads into the caller's buffer${inPlace ? ' (read in place from a socket: the kernel writes the data into it)' : ''}: DATA replies cut anywhere (inside their header too) or run together land in it byte for byte, next to STATUS replies and short answers`, async () => {
      const file = Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 13 + (i >> 9)) % 256));
      let seed = 7;
      const random = (n: number): number => {
        seed = (seed * 1103515245 + 12345) >>> 0;
        return seed % n;
      };
      let pendingOut: Buffer[] = [];
      let flushing: NodeJS.Timeout | undefined;
      const server = scriptedServer((type, id, body, send, raw) => {
        if (type !== 5) return send(statusOf(id, 8));
        const handleLength = body.readUInt32BE(0);
        const offset = Number(body.readBigUInt64BE(4 + handleLength));
        const length = body.readUInt32BE(12 + handleLength);
        let reply: Buffer;
        if (offset >= file.length) reply = statusOf(id, 1);
        else {
          const data = file.subarray(offset, Math.min(offset + length, offset + (id % 3 === 0 ? 5_000 : length), file.length));
          reply = Buffer.concat([Buffer.from([103]), idOf(id), stringOf(data)]);
        }
        const framed = Buffer.concat([idOf(reply.length), reply]);
        // Replies run together, then go out cut at random points (1 byte up to 40 kB).
        pendingOut.push(framed);
        flushing ??= setTimeout(() => {
          flushing = undefined;
          let all = Buffer.concat(pendingOut);
          pendingOut = [];
          while (all.length > 0) {
            const n = Math.min(all.length, 1 + (random(4) === 0 ? random(13) : random(40_000)));
            raw(Buffer.from(all.subarray(0, n)));
            all = all.subarray(n);
          }
        }, 1);
      }, { inPlace });
      const session = await server.session;
      for (const [offset, length] of [
        [0, 300_000],
        [12_345, 100_000],
        [290_000, 50_000],
        [299_999, 1],
      ] as const) {
        const got = await session.readRange(Buffer.from('h'), offset, length, { chunk: 16_384, window: 4 });
        assert.ok(got.equals(file.subarray(offset, Math.min(offset + length, file.length))), `${offset}+${length}`);
      }
      const into = Buffer.alloc(20_000);
      const got = (await session.read(Buffer.from('h'), 1000, 20_000, into))!;
      assert.equal(got.buffer, into.buffer, 'the data is received into the caller\'s buffer');
      assert.ok(got.equals(file.subarray(1000, 1000 + got.length)));
      assert.equal(await session.read(Buffer.from('h'), 400_000, 10, Buffer.alloc(10)), undefined, 'end of file');
      if (inPlace) assert.ok(server.readsInPlace() > 0, 'some reads went straight into the caller\'s buffer');
      server.close();
    });
  }

  void it('a session that ends in the middle of a DATA reply being received into a buffer fails that read with ECONNRESET', async () => {
    const toServer = new PassThrough();
    const toClient = new PassThrough();
    toServer.once('data', () => {
      toClient.write(Buffer.from([0, 0, 0, 5, 2, 0, 0, 0, 3]));
      toServer.once('data', () => {
        // DATA for id 1: 1000 bytes announced, 300 sent, then the end.
        toClient.write(Buffer.concat([idOf(9 + 1000), Buffer.from([103]), idOf(1), idOf(1000), Buffer.alloc(300, 7)]));
        setTimeout(() => toClient.end(), 5);
      });
    });
    const session = await SftpSession.start(toClient, toServer);
    await assert.rejects(session.read(Buffer.from('h'), 0, 1000, Buffer.alloc(1000)), (e: unknown) => (e as SftpError).code === 'ECONNRESET');
  });

  void it('a reply longer than MAX_PACKET, or to no request, ends the session; every call then fails', { timeout: 10_000 }, async () => {
    // Only the length of a huge reply: a client that waited for its bytes would hang here.
    const huge = scriptedServer((_type, _id, _body, send) => send(Buffer.alloc(0), MAX_PACKET + 1));
    const s1 = await huge.session;
    await assert.rejects(s1.stat('/x'), (e: unknown) => (e as SftpError).code === 'EBADMSG');
    await assert.rejects(s1.stat('/y'), (e: unknown) => (e as SftpError).code === 'EBADMSG');

    const stray = scriptedServer((_type, id, _body, send) => send(statusOf(id + 1000, 0)));
    const s2 = await stray.session;
    await assert.rejects(s2.remove('/x'), /reply to no request/);

    const lying = scriptedServer((_type, id, _body, send) => send(Buffer.concat([Buffer.from([103]), idOf(id), idOf(1_000_000)])));
    const s3 = await lying.session;
    await assert.rejects(s3.read(Buffer.from('h'), 0, 10), /malformed/);
  });

  void it('a session whose stream ends fails its pending calls with ECONNRESET', async () => {
    const toServer = new PassThrough();
    const toClient = new PassThrough();
    toServer.once('data', () => {
      toClient.write(Buffer.from([0, 0, 0, 5, 2, 0, 0, 0, 3]));
      toServer.once('data', () => toClient.end());
    });
    const session = await SftpSession.start(toClient, toServer);
    await assert.rejects(session.open('/x', OPEN_FLAGS.read), (e: unknown) => (e as SftpError).code === 'ECONNRESET');
    await assert.rejects(session.open('/y', OPEN_FLAGS.read), (e: unknown) => (e as SftpError).code === 'ECONNRESET');
  });
});
