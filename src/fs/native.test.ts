import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { limitMallocArenas, nativeHelper, nativeUnavailableReason } from './native.js';

test('the native helper loads where npm ci built it (CI builds it; CVAT_BACKUP_NATIVE=off turns it off)', () => {
  if (process.env['CVAT_BACKUP_NATIVE'] === 'off') {
    assert.equal(nativeHelper(), undefined);
    assert.match(nativeUnavailableReason(), /turned off/);
    return;
  }
  assert.ok(nativeHelper(), `native helper missing: ${nativeUnavailableReason()}`);
  assert.equal(nativeUnavailableReason(), '');
});

test('limitMallocArenas sets glibc\'s arena limit, unless MALLOC_ARENA_MAX was given (the user\'s setting wins)', () => {
  if (!nativeHelper()) return;
  const script = `import('${new URL('./native.js', import.meta.url).href}').then((m) => process.stdout.write(String(m.limitMallocArenas(2))))`;
  const run = (env: NodeJS.ProcessEnv): string => execFileSync(process.execPath, ['-e', script], { env, encoding: 'utf8' });
  const env = { ...process.env };
  delete env['MALLOC_ARENA_MAX'];
  assert.equal(run(env), 'true');
  assert.equal(run({ ...env, MALLOC_ARENA_MAX: '4' }), 'false');
  assert.throws(() => limitMallocArenas(0), /positive integer/);
});
