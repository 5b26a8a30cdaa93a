import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LocalBackend } from '../backend/local.js';
import { CorruptArchiveError, WrongPasswordError } from '../errors.js';
import { Repository } from './repository.js';
import { MAX_KDF_MEMORY, calibrateKdf, checkKdfParams, parseKeyFile } from './keys.js';

const fastKdf = { algorithm: 'scrypt' as const, N: 1024, r: 8, p: 1 };

async function withRepo(fn: (dir: string, keysDir: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'keys-test-'));
  try {
    await Repository.init(new LocalBackend(join(dir, 'repo')), 'pw', { kdf: fastKdf });
    await fn(join(dir, 'repo'), join(dir, 'repo', 'keys'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('key files are hostile input', () => {
  it('refuses scrypt parameters that would exhaust memory or time, before running scrypt', () => {
    assert.throws(() => checkKdfParams({ algorithm: 'scrypt', N: 2 ** 30, r: 8, p: 1 }), CorruptArchiveError);
    assert.throws(() => checkKdfParams({ algorithm: 'scrypt', N: 2 ** 16, r: 64, p: 1 }), /memory/);
    assert.throws(() => checkKdfParams({ algorithm: 'scrypt', N: 2 ** 15, r: 8, p: 1000 }), /work/);
    assert.throws(() => checkKdfParams({ algorithm: 'scrypt', N: 3000, r: 8, p: 1 }), /power of two/);
    // What existing repositories use, and what calibration makes, stays accepted.
    checkKdfParams({ algorithm: 'scrypt', N: 2 ** 15, r: 8, p: 1 });
    checkKdfParams({ algorithm: 'scrypt', N: 2 ** 16, r: 8, p: 64 });
    assert.ok(128 * 2 ** 16 * 8 <= MAX_KDF_MEMORY);
  });

  it('a hostile key file is refused with one line, before any scrypt runs, and the good key beside it still opens the repository', async () => {
    await withRepo(async (repo, keysDir) => {
      const good = readdirSync(keysDir)[0]!;
      const goodFile = JSON.parse(readFileSync(join(keysDir, good), 'utf8')) as { kdf: { N: number } };
      writeFileSync(join(keysDir, '00-hostile'), JSON.stringify({ ...goodFile, kdf: { ...goodFile.kdf, N: 2 ** 31 } }));
      writeFileSync(join(keysDir, '01-truncated'), readFileSync(join(keysDir, good)).subarray(0, 40));
      writeFileSync(join(keysDir, '02-empty'), '');
      const warnings: string[] = [];
      // Refused by its parameters before any scrypt runs (N = 2^31 would ask for 2 TiB).
      const opened = await Repository.open(new LocalBackend(repo), 'pw', { onWarning: (m) => warnings.push(m) });
      assert.equal(opened.config.version, 1);
      assert.equal(warnings.length, 3, warnings.join('\n'));
      assert.ok(warnings.some((w) => /00-hostile.*memory/.test(w)), warnings.join('\n'));
      assert.ok(warnings.some((w) => /01-truncat.*damaged/.test(w)), warnings.join('\n'));
      await assert.rejects(Repository.open(new LocalBackend(repo), 'wrong'), WrongPasswordError);
    });
  });

  it('with only damaged key files, opening fails with one line naming them (not as a wrong password)', async () => {
    await withRepo(async (repo, keysDir) => {
      const good = readdirSync(keysDir)[0]!;
      writeFileSync(join(keysDir, good), readFileSync(join(keysDir, good)).subarray(0, 100));
      await assert.rejects(Repository.open(new LocalBackend(repo), 'pw'), (error: Error) => {
        assert.ok(error instanceof CorruptArchiveError);
        assert.match(error.message, /no usable key.*damaged/);
        assert.doesNotMatch(error.message, /\n/);
        return true;
      });
    });
  });

  it('parseKeyFile refuses shapes that are not a key file', () => {
    assert.throws(() => parseKeyFile(Buffer.from('[]'), 'k'), CorruptArchiveError);
    assert.throws(() => parseKeyFile(Buffer.alloc(100_000, 0x20), 'k'), CorruptArchiveError);
    assert.throws(() => parseKeyFile(Buffer.from('{"kdf":{"algorithm":"argon2"}}'), 'k'), CorruptArchiveError);
  });

  it('calibration fixes memory at 64 MiB and picks p for about the target time', async () => {
    // A clock that says a derivation took 50 ms: a 500 ms target gives p = 10.
    let t = 0;
    const clock = (): number => (t += 50);
    const kdf = await calibrateKdf(500, clock);
    assert.deepEqual(kdf, { algorithm: 'scrypt', N: 2 ** 16, r: 8, p: 10 });
    checkKdfParams(kdf);
    const slow = await calibrateKdf(500, () => (t += 10_000));
    assert.equal(slow.p, 1);
  });
});
