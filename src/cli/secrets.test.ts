/**
 * Where the source repository's password comes from (copy, init --from-repo): its own file, then
 * its own variables, else nothing (the caller then uses the target's password); a readable
 * password file is warned about, as the target's is.
 */
import { afterEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { UsageError } from '../errors.js';
import { readPassword, readSourcePassword, sourceRepositoryLocation } from './secrets.js';

const VARIABLES = ['CVAT_BACKUP_PASSWORD', 'CVAT_BACKUP_PASSWORD_FILE', 'CVAT_BACKUP_FROM_PASSWORD', 'CVAT_BACKUP_FROM_PASSWORD_FILE', 'CVAT_BACKUP_FROM_REPO'];

describe('source repository password', () => {
  const saved = Object.fromEntries(VARIABLES.map((v) => [v, process.env[v]]));
  afterEach(() => {
    for (const v of VARIABLES) {
      if (saved[v] === undefined) delete process.env[v];
      else process.env[v] = saved[v];
    }
  });

  it('comes from --from-password-file, then $CVAT_BACKUP_FROM_PASSWORD_FILE, then $CVAT_BACKUP_FROM_PASSWORD; else none', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'cvat-backup-secrets-'));
    try {
      for (const v of VARIABLES) delete process.env[v];
      process.env['CVAT_BACKUP_PASSWORD'] = 'target';
      assert.equal(await readSourcePassword(undefined), undefined, "the target's password is not taken for the source's here");
      assert.equal(await readPassword(undefined, false), 'target');

      process.env['CVAT_BACKUP_FROM_PASSWORD'] = 'from-env';
      assert.equal(await readSourcePassword(undefined), 'from-env');
      assert.equal(await readPassword(undefined, false), 'target', 'the target keeps its own');

      const envFile = join(dir, 'env-file');
      await writeFile(envFile, 'from-env-file\n', { mode: 0o600 });
      process.env['CVAT_BACKUP_FROM_PASSWORD_FILE'] = envFile;
      assert.equal(await readSourcePassword(undefined), 'from-env-file');

      const flagFile = join(dir, 'flag-file');
      await writeFile(flagFile, 'from-flag\n');
      await chmod(flagFile, 0o640);
      const warnings: string[] = [];
      assert.equal(await readSourcePassword(flagFile, (m) => warnings.push(m)), 'from-flag');
      assert.equal(warnings.length, 1);
      assert.match(warnings[0]!, /can be read by its group .* chmod 600/);
      assert.doesNotMatch(warnings[0]!, /from-flag/, 'the warning never shows the password');

      const empty = join(dir, 'empty');
      await writeFile(empty, '', { mode: 0o600 });
      await assert.rejects(readSourcePassword(empty), (e: unknown) => e instanceof UsageError && /--from-password-file .* is empty/.test(e.message));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('the source repository comes from --from-repo, else $CVAT_BACKUP_FROM_REPO', () => {
    for (const v of VARIABLES) delete process.env[v];
    assert.equal(sourceRepositoryLocation(undefined), undefined);
    process.env['CVAT_BACKUP_FROM_REPO'] = '/srv/a';
    assert.equal(sourceRepositoryLocation(undefined), '/srv/a');
    assert.equal(sourceRepositoryLocation('/srv/b'), '/srv/b');
  });
});
