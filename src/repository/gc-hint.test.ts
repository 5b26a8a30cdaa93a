/**
 * The main thread's young generation stays small while a pool's worker threads start and run
 * (starting one resets V8's flags set at run time). Memory is the observable: the size V8 gives
 * the new space, never a time.
 */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { getHeapSpaceStatistics } from 'node:v8';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { ChunkPool } from './chunk-pool.js';
import { DEFAULT_CHUNKER } from './chunker.js';
import { holdHeapSmall } from './gc-hint.js';

function newSpaceMiB(): number {
  return (getHeapSpaceStatistics().find((s) => s.space_name === 'new_space')?.space_size ?? 0) / 2 ** 20;
}

/** Allocates like the archiver does: a folder's nodes live while it is listed, then die. */
async function listFolders(count: number): Promise<number> {
  let largest = newSpaceMiB();
  for (let folder = 0; folder < count; folder++) {
    const nodes = [];
    for (let i = 0; i < 1000; i++) nodes.push({ name: Buffer.from(`f${i}.json`).toString('base64'), mtimeNs: String(BigInt(folder) * 1_000_000n + BigInt(i)), inode: String(folder * 1000 + i), size: i });
    JSON.stringify({ nodes });
    largest = Math.max(largest, newSpaceMiB());
    if (folder % 50 === 0) await yieldToLoop();
  }
  return largest;
}

it("keeps the main thread's young generation small while a pool's threads start and work", async () => {
  holdHeapSmall();
  const pool = new ChunkPool(randomBytes(32), { ...DEFAULT_CHUNKER, seed: randomBytes(32).toString('hex') }, 2);
  try {
    await pool.ready();
    const blob = Buffer.allocUnsafeSlow(4096);
    randomBytes(4096).copy(blob);
    const sealed = await pool.sealSmall(blob, [4096]);
    assert.equal(sealed.ids.length, 1);
    const largest = await listFolders(600);
    // V8's default grows it to 32 MiB (Node 20, 22) or 64 MiB (Node 24); held, it stays at its
    // first 2 MiB (Node 24 still grows it by pages, to about half its default).
    const limit = Number(process.versions.node.split('.')[0]) >= 24 ? 32 : 2;
    assert.ok(largest <= limit, `new space grew to ${largest} MiB`);
  } finally {
    await pool.close();
  }
});
