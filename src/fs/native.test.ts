import { test } from 'node:test';
import assert from 'node:assert/strict';
import { nativeHelper, nativeUnavailableReason } from './native.js';

test('the native helper loads where npm ci built it (CI builds it; CVAT_BACKUP_NATIVE=off turns it off)', () => {
  if (process.env['CVAT_BACKUP_NATIVE'] === 'off') {
    assert.equal(nativeHelper(), undefined);
    assert.match(nativeUnavailableReason(), /turned off/);
    return;
  }
  assert.ok(nativeHelper(), `native helper missing: ${nativeUnavailableReason()}`);
  assert.equal(nativeUnavailableReason(), '');
});
