import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { createDockerEngine } from './engine.js';

const require = createRequire(import.meta.url);
const loaded = (pattern: RegExp): string[] => Object.keys(require.cache).filter((path) => pattern.test(path));

test('an engine loads dockerode without gRPC, protobuf or ssh2; ssh2 loads on the first ssh connection', () => {
  assert.deepEqual(loaded(/node_modules\/dockerode\//), [], 'nothing loads dockerode before an engine is made');
  createDockerEngine({ socketPath: '/nonexistent/docker.sock' });
  assert.ok(loaded(/node_modules\/dockerode\//).length > 0);
  assert.deepEqual(loaded(/node_modules\/(@grpc|protobufjs|ssh2)\//), []);

  const ssh = createRequire(require.resolve('dockerode'))('docker-modem/lib/ssh.js') as (options: object) => { createConnection?: unknown };
  const agent = ssh({ host: '127.0.0.1', port: 1 });
  assert.equal(typeof agent.createConnection, 'function');
  assert.ok(loaded(/node_modules\/ssh2\//).length > 0);
});
