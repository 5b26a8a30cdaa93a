/**
 * The tool runs on Node 20, 22 and 24, and Node 24 compresses with its own zstd where Node 20 uses
 * a WebAssembly build: a repository written under one runtime must read under the other.
 * CVAT_BACKUP_OTHER_NODES lists other node binaries (colon-separated; .ci/run installs Node 22
 * and 24 from the npm registry); without it the test is skipped and says why.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from './fixture/engine.js';

const others = (process.env['CVAT_BACKUP_OTHER_NODES'] ?? '').split(':').filter((p) => p !== '');
const dist = fileURLToPath(new URL('../src/', import.meta.url));

const WRITE = `
import { Repository } from '${dist}repository/repository.js';
import { LocalBackend } from '${dist}backend/local.js';
const repo = await Repository.init(new LocalBackend(process.argv[2]), 'pw', { kdf: { algorithm: 'scrypt', N: 1024, r: 8, p: 1 } });
const ids = [];
for (let i = 0; i < 4; i++) ids.push((await repo.saveBlob('data', Buffer.from(('page ' + i + ' ').repeat(20000)))).id);
await repo.flush();
process.stdout.write(JSON.stringify(ids));
`;

const READ = `
import { Repository } from '${dist}repository/repository.js';
import { LocalBackend } from '${dist}backend/local.js';
const repo = await Repository.open(new LocalBackend(process.argv[2]), 'pw');
await repo.loadIndex();
const ids = JSON.parse(process.argv[3]);
for (let i = 0; i < ids.length; i++) {
  const blob = await repo.loadBlob(ids[i], undefined, { hash: true });
  if (blob.toString() !== ('page ' + i + ' ').repeat(20000)) throw new Error('blob ' + i + ' differs');
}
process.stdout.write('ok ' + process.version);
`;

describe('repositories across Node runtimes', { skip: others.length === 0 && 'CVAT_BACKUP_OTHER_NODES is not set' }, () => {
  let work: string;
  after(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  for (const other of others) {
    it(`${process.version} ⇄ ${other}`, async () => {
      work ??= await mkdtemp(join(tmpdir(), 'cvat-backup-runtimes-'));
      await writeFile(join(work, 'write.mjs'), WRITE);
      await writeFile(join(work, 'read.mjs'), READ);
      const pairs: [string, string][] = [
        [process.execPath, other],
        [other, process.execPath],
      ];
      for (const [writer, reader] of pairs) {
        const repo = join(work, `repo-${Math.random().toString(16).slice(2)}`);
        const ids = (await run(writer, [join(work, 'write.mjs'), repo])).stdout;
        const read = await run(reader, [join(work, 'read.mjs'), repo, ids]);
        assert.match(read.stdout, /^ok v\d+/);
      }
    });
  }
});
