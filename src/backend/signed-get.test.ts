/**
 * SignedGetter (a worker's download of a signed request) against an HTTP server on loopback: the
 * exact bytes land in the caller's buffer; any other answer (a status, a shorter, longer or cut
 * body, a stall) is an error whose message carries neither the URL nor a header.
 */
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { SignedGetter } from './signed-get.js';

const BODY = Buffer.from(Array.from({ length: 200_000 }, (_, i) => (i * 7) & 0xff));
const SECRET = 'Signature=0123456789abcdef';

type Handler = (request: IncomingMessage, response: ServerResponse) => void;
let handler: Handler = () => undefined;
const server = createServer((request, response) => handler(request, response));
const ready = new Promise<string>((resolve) => server.listen(0, '127.0.0.1', () => resolve(`http://127.0.0.1:${(server.address() as AddressInfo).port}`)));

function signed(base: string): { url: string; headers: Record<string, string> } {
  return { url: `${base}/bucket/data/ab/abcdef?X-Amz-Credential=${SECRET}`, headers: { authorization: SECRET, range: 'bytes=100-100099' } };
}

void describe('SignedGetter', () => {
  const getter = new SignedGetter();
  after(() => {
    getter.close();
    server.close();
  });

  void it('fills the buffer with the body of a 206, sending the signed headers; the connection is reused', async () => {
    const base = await ready;
    const seen: { authorization: string | undefined; range: string | undefined; socket: unknown }[] = [];
    handler = (request, response) => {
      seen.push({ authorization: request.headers['authorization'], range: request.headers['range'], socket: request.socket });
      response.writeHead(206, { 'content-length': 100_000 });
      // In pieces, as a network delivers it.
      response.write(BODY.subarray(100, 30_100));
      setTimeout(() => response.end(BODY.subarray(30_100, 100_100)), 5);
    };
    for (let i = 0; i < 2; i++) {
      const into = Buffer.alloc(100_000);
      await getter.get(signed(base), into);
      assert.ok(into.equals(BODY.subarray(100, 100_100)));
    }
    assert.equal(seen[0]!.authorization, SECRET);
    assert.equal(seen[0]!.range, 'bytes=100-100099');
    assert.equal(seen[0]!.socket, seen[1]!.socket, 'kept alive');
  });

  void it('refuses another status, a body of another length, a body cut short, and a stall; no message names the URL or a header', async () => {
    const base = await ready;
    const cases: [string, Handler, RegExp][] = [
      ['403', (_q, r) => r.writeHead(403, { 'content-length': 5 }).end('nope!'), /HTTP 403/],
      ['longer', (_q, r) => r.writeHead(206, { 'content-length': 100_001 }).end(BODY.subarray(0, 100_001)), /100001 bytes/],
      ['shorter', (_q, r) => r.writeHead(206, { 'content-length': 99_999 }).end(BODY.subarray(0, 99_999)), /99999 bytes/],
      [
        'cut',
        (_q, r) => {
          r.writeHead(206, { 'content-length': 100_000 });
          r.write(BODY.subarray(0, 50_000), () => r.socket?.destroy());
        },
        /50000 of 100000|ECONNRESET/,
      ],
      ['unannounced and longer', (_q, r) => r.writeHead(206).end(BODY.subarray(0, 100_010)), /more than the 100000 bytes/],
      ['stall', (_q, r) => r.writeHead(206, { 'content-length': 100_000 }).write(BODY.subarray(0, 10)), /timed out|ETIMEDOUT/],
    ];
    for (const [what, h, message] of cases) {
      handler = h;
      await assert.rejects(getter.get(signed(base), Buffer.alloc(100_000), 300), (error: Error) => {
        assert.match(error.message, message, what);
        assert.ok(!error.message.includes(SECRET) && !error.message.includes('/bucket/data') && !error.message.includes('127.0.0.1'), `${what}: ${error.message}`);
        return true;
      });
    }
    // A refused connection names its code only.
    await assert.rejects(getter.get({ url: 'http://127.0.0.1:1/x', headers: {} }, Buffer.alloc(10)), (error: Error & { code?: string }) => {
      assert.equal(error.code, 'ECONNREFUSED');
      assert.ok(!error.message.includes('127.0.0.1'), error.message);
      return true;
    });
  });
});
