import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { isServerImage, versionFromImageTag, versionFromInitPy } from './cvat.js';

void describe('CVAT version', () => {
  void it('reads release tags and refuses dev/latest', () => {
    assert.equal(versionFromImageTag('cvat/server:v2.73.0'), '2.73.0');
    assert.equal(versionFromImageTag('registry.example/cvat/server:2.4.1'), '2.4.1');
    assert.equal(versionFromImageTag('cvat/server:dev'), undefined);
    assert.equal(versionFromImageTag('cvat/server:latest'), undefined);
    assert.equal(versionFromImageTag('cvat/server'), undefined);
  });

  void it('reads cvat/__init__.py', () => {
    assert.equal(versionFromInitPy('x\nVERSION = (2, 73, 0, "final", 0)\n'), '2.73.0');
    assert.equal(versionFromInitPy("VERSION = (2, 74, 0, 'alpha', 0)"), '2.74.0-alpha');
    assert.equal(versionFromInitPy('nothing here'), undefined);
  });

  void it('recognises the server image under any registry', () => {
    assert.ok(isServerImage('cvat/server:v2.73.0'));
    assert.ok(isServerImage('docker.io/cvat/server@sha256:abc'));
    assert.ok(!isServerImage('cvat/ui:v2.73.0'));
    assert.ok(!isServerImage('mycvat/server-tools:1'));
  });
});
