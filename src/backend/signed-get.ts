/**
 * Makes a `SignedRequest` (backend.ts) on the thread that holds the bytes: a restore's blob
 * workers download pack ranges themselves (repository/pack-reads.ts), so the main thread never
 * touches them. The body is copied, as it arrives, into one buffer the caller gives (its length is
 * the range's), never a list of pieces joined at the end.
 *
 * Only the exact answer succeeds: HTTP 206 (or 200) with exactly the buffer's length. Anything
 * else — another status, a shorter or longer body, a reset, a stall — rejects, and the caller
 * loads the range through the backend instead (which reports and retries it): nothing here
 * retries. Messages name the status or the socket error, never the URL or a header (they carry
 * a signature).
 */
import { Agent as HttpAgent, request as httpRequest, type IncomingMessage } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import type { SignedRequest } from './backend.js';

/** A socket silent this long fails the request (the SDK's own timeout is minutes: a fallback is cheap). */
const IDLE_TIMEOUT_MS = 60_000;

export class SignedGetter {
  // Kept-alive connections of this thread (each worker has its own getter).
  private readonly http = new HttpAgent({ keepAlive: true, maxSockets: 8 });
  private readonly https = new HttpsAgent({ keepAlive: true, maxSockets: 8 });

  /** Fills `into` with the body of `signed`; rejects unless the server sent exactly that many bytes. */
  get(signed: SignedRequest, into: Buffer, timeoutMs = IDLE_TIMEOUT_MS): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let url: URL;
      try {
        url = new URL(signed.url);
      } catch {
        reject(new Error('signed GET: not a URL'));
        return;
      }
      const secure = url.protocol === 'https:';
      if (!secure && url.protocol !== 'http:') {
        reject(new Error(`signed GET: unsupported protocol ${url.protocol}`));
        return;
      }
      const options = { method: 'GET', headers: signed.headers, agent: secure ? this.https : this.http, timeout: timeoutMs };
      const request = (secure ? httpsRequest : httpRequest)(url, options, (response: IncomingMessage) => {
        const status = response.statusCode ?? 0;
        const announced = response.headers['content-length'];
        if ((status !== 206 && status !== 200) || (announced !== undefined && Number(announced) !== into.length)) {
          response.resume(); // drain: the connection stays usable
          reject(Object.assign(new Error(`signed GET: HTTP ${status}${announced !== undefined ? `, ${announced} bytes` : ''} (expected ${into.length} bytes)`), { statusCode: status }));
          return;
        }
        let at = 0;
        let failed = false;
        response.on('data', (chunk: Buffer) => {
          if (failed) return;
          if (at + chunk.length > into.length) {
            failed = true;
            response.destroy();
            reject(Object.assign(new Error(`signed GET: more than the ${into.length} bytes asked for`), { code: 'EIO' }));
            return;
          }
          chunk.copy(into, at);
          at += chunk.length;
        });
        response.on('end', () => {
          if (failed) return;
          if (at === into.length) resolve();
          else reject(Object.assign(new Error(`signed GET: ${at} of ${into.length} bytes`), { code: 'ESHORTREAD' }));
        });
        response.on('error', (error: Error) => {
          failed = true;
          reject(quiet(error));
        });
        // A connection that closes mid-body: 'aborted' or 'error' on some Node versions, only 'close' on others.
        const cut = (): void => {
          if (failed || at === into.length) return;
          failed = true;
          reject(Object.assign(new Error(`signed GET: connection closed after ${at} of ${into.length} bytes`), { code: 'ECONNRESET' }));
        };
        response.on('aborted', cut);
        response.on('close', cut);
      });
      request.on('timeout', () => request.destroy(Object.assign(new Error('signed GET: timed out'), { code: 'ETIMEDOUT' })));
      request.on('error', (error: Error) => reject(quiet(error)));
      request.end();
    });
  }

  close(): void {
    this.http.destroy();
    this.https.destroy();
  }
}

/** The socket error's code and a message that cannot carry the URL (Node's name host and port only, but be sure). */
function quiet(error: Error): Error {
  const code = (error as NodeJS.ErrnoException).code;
  return Object.assign(new Error(`signed GET: ${code ?? 'failed'}`), { code });
}
