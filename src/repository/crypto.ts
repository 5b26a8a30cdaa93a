/**
 * Repository cryptography.
 *
 * - A random 32-byte master key encrypts everything with AES-256-GCM (authenticated: a flipped bit
 *   is detected, never silently decrypted).
 * - The master key is stored wrapped: scrypt(password, random salt) gives a key-encryption key that
 *   seals the master key. A wrong password fails the GCM tag: WrongPasswordError, nothing else.
 * - Sealed object layout: version byte 0x01 ‖ 12-byte random nonce ‖ ciphertext ‖ 16-byte tag.
 *   `associated` data binds an object to its kind (a pack header cannot pass as a snapshot).
 */
import { createCipheriv, createDecipheriv, randomBytes, scrypt as scryptCallback } from 'node:crypto';
import { CorruptArchiveError, WrongPasswordError } from '../errors.js';

const VERSION = 0x01;
const NONCE = 12;
const TAG = 16;
export const SEAL_OVERHEAD = 1 + NONCE + TAG;

export interface KdfParams {
  algorithm: 'scrypt';
  N: number;
  r: number;
  p: number;
  salt: string; // base64
}

export const DEFAULT_KDF: Omit<KdfParams, 'salt'> = { algorithm: 'scrypt', N: 1 << 15, r: 8, p: 1 };

export function deriveKey(password: string, params: KdfParams): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scryptCallback(
      password.normalize('NFC'),
      Buffer.from(params.salt, 'base64'),
      32,
      { N: params.N, r: params.r, p: params.p, maxmem: 256 * params.N * params.r + (1 << 20) },
      (error, key) => (error ? reject(error) : resolve(key)),
    );
  });
}

/**
 * Random nonces drawn from the CSPRNG in blocks: one call per 1024 seals instead of one per seal
 * (a backup of a million tiny files seals a million blobs). Each nonce is still 96 random bits.
 */
let nonces = Buffer.alloc(0);
let nonceAt = 0;
function freshNonce(): Buffer {
  if (nonceAt + NONCE > nonces.length) {
    nonces = randomBytes(NONCE * 1024);
    nonceAt = 0;
  }
  const nonce = nonces.subarray(nonceAt, nonceAt + NONCE);
  nonceAt += NONCE;
  return nonce;
}

export function seal(key: Buffer, plaintext: Buffer, associated: string): Buffer {
  const nonce = freshNonce();
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(Buffer.from(associated));
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return Buffer.concat([Buffer.from([VERSION]), nonce, body, cipher.getAuthTag()]);
}

/**
 * `seal` of the concatenation of `plaintext` without joining anything: the sealed object as parts
 * (version ‖ nonce, the ciphertext of each piece, tag) whose concatenation is exactly what `seal`
 * would return. A large piece's ciphertext is its own buffer, so it can move between threads and
 * into a pack without a copy.
 */
export function sealParts(key: Buffer, plaintext: Buffer[], associated: string): Buffer[] {
  const nonce = freshNonce();
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(Buffer.from(associated));
  const out: Buffer[] = [Buffer.concat([Buffer.from([VERSION]), nonce])];
  for (const piece of plaintext) out.push(cipher.update(piece));
  const tail = cipher.final();
  if (tail.length > 0) out.push(tail);
  out.push(cipher.getAuthTag());
  return out;
}

/** Opens a sealed object; throws CorruptArchiveError (naming `what`) if it was altered. */
export function open(key: Buffer, sealed: Buffer, associated: string, what: string): Buffer {
  if (sealed.length < SEAL_OVERHEAD || sealed[0] !== VERSION) throw new CorruptArchiveError(`${what}: not a sealed object`);
  const nonce = sealed.subarray(1, 1 + NONCE);
  const tag = sealed.subarray(sealed.length - TAG);
  const decipher = createDecipheriv('aes-256-gcm', key, nonce);
  decipher.setAAD(Buffer.from(associated));
  decipher.setAuthTag(tag);
  try {
    const body = decipher.update(sealed.subarray(1 + NONCE, sealed.length - TAG));
    const tail = decipher.final();
    return tail.length === 0 ? body : Buffer.concat([body, tail]);
  } catch (error) {
    throw new CorruptArchiveError(`${what}: damaged (authentication failed)`, { cause: error });
  }
}

export interface WrappedKey {
  kdf: KdfParams;
  /** Sealed master key, base64. */
  key: string;
  created: string;
}

export async function wrapMasterKey(master: Buffer, password: string, kdf = DEFAULT_KDF, now = new Date()): Promise<WrappedKey> {
  const params: KdfParams = { ...kdf, salt: randomBytes(32).toString('base64') };
  const kek = await deriveKey(password, params);
  return { kdf: params, key: seal(kek, master, 'master-key').toString('base64'), created: now.toISOString() };
}

export async function unwrapMasterKey(wrapped: WrappedKey, password: string): Promise<Buffer> {
  const kek = await deriveKey(password, wrapped.kdf);
  try {
    return open(kek, Buffer.from(wrapped.key, 'base64'), 'master-key', 'key');
  } catch (error) {
    throw new WrongPasswordError('wrong repository password (check CVAT_BACKUP_PASSWORD or --password-file)', { cause: error });
  }
}
