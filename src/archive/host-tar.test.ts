/**
 * What the host tar writer (`backup --to DIR --via host`) reads from a volume that another process
 * changes under it: folders swapped for links to a folder of canaries outside, files for links to
 * canaries, FIFOs and (as root) device nodes. The archives are written in a child process that is
 * killed if it hangs; no archive may hold a canary byte, every file member must hold the bytes of
 * the volume's file of that name, and every stable file must be there.
 */
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { hostTarStream } from './host-tar.js';
import { TarProcessor } from './tar.js';
import { makeHostileVolume } from '../../test/fixture/hostile-volume.js';
import { startSwapper } from '../../test/fixture/swapper.js';

const SELF = fileURLToPath(import.meta.url);
const isRoot = process.getuid?.() === 0;
const ROUNDS = 24;

interface ChildConfig {
  volume: string;
  out: string;
}

/** In the child: ROUNDS archives of the volume, `<out>/<n>.tar`, warnings in `<out>/warnings.json`. */
async function writeArchives(config: ChildConfig): Promise<void> {
  const warnings: string[][] = [];
  for (let round = 0; round < ROUNDS; round++) {
    const mine: string[] = [];
    warnings.push(mine);
    await pipeline(hostTarStream(config.volume, { memberPrefix: 'data', onWarning: (m) => mine.push(m) }).stream, createWriteStream(join(config.out, `${round}.tar`)));
    writeFileSync(join(config.out, 'warnings.json'), JSON.stringify(warnings));
  }
}

function inChild(config: ChildConfig, timeoutMs: number): Promise<string | undefined> {
  const child = spawn(process.execPath, [SELF], { env: { ...process.env, HOST_TAR_TEST: JSON.stringify(config) }, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve) => {
    let problem: string | undefined;
    const timer = setTimeout(() => {
      problem = `the tar writer hung: not done after ${timeoutMs / 1000} s`;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve(code === 0 ? problem : (problem ?? `the tar writer failed (exit ${code}): ${err}`));
    });
  });
}

/** Type and content of every member, by name relative to the volume. */
async function members(archive: Buffer): Promise<Map<string, { type: string; data: Buffer }>> {
  const found = new Map<string, { type: string; parts: Buffer[] }>();
  let current: { type: string; parts: Buffer[] } | undefined;
  const processor = new TarProcessor({
    onEntry: (entry) => {
      current = { type: entry.type, parts: [] };
      found.set(entry.name.toString('utf8').replace(/^data\/?/, '').replace(/\/$/, ''), current);
    },
    onData: (_entry, chunk) => current?.parts.push(Buffer.from(chunk)),
  });
  await pipeline(Readable.from([archive]), processor, new Writable({ write: (_chunk, _encoding, done) => done() }));
  return new Map([...found].map(([name, m]) => [name, { type: m.type, data: Buffer.concat(m.parts) }]));
}

if (process.env['HOST_TAR_TEST']) {
  await writeArchives(JSON.parse(process.env['HOST_TAR_TEST']) as ChildConfig);
} else {
  const againstSwapper = async (t: TestContext, specials: boolean): Promise<void> => {
    const work = mkdtempSync(join(tmpdir(), 'host-tar-hostile-'));
    try {
      const hostile = makeHostileVolume(work, { specials });
      const swapper = await startSwapper(hostile.plan);
      let problem;
      try {
        problem = await inChild({ volume: hostile.volume, out: work }, 120_000);
      } finally {
        assert.ok((await swapper.stop()) > 0, 'the swapper ran');
      }
      const seen = new Map<string, number>();
      const note = (what: string): void => void seen.set(what, (seen.get(what) ?? 0) + 1);
      const archives: Buffer[] = [];
      for (let round = 0; round < ROUNDS; round++) {
        try {
          archives.push(readFileSync(join(work, `${round}.tar`)));
        } catch {
          break;
        }
      }
      // First what matters most, whatever else went wrong: no canary byte in any archive.
      for (const [round, archive] of archives.entries()) assert.equal(archive.includes(hostile.marker), false, `archive ${round} holds canary bytes`);
      assert.equal(problem, undefined);
      assert.equal(archives.length, ROUNDS);
      for (const [round, archive] of archives.entries()) {
        const found = await members(archive);
        for (const [rel, m] of found) {
          if (hostile.swapped.includes(rel)) note(`${rel} as type ${m.type}`);
          if (m.type !== '0') continue;
          const expected = hostile.files.get(rel);
          assert.ok(expected, `archive ${round}: a file '${rel}' that the volume does not have`);
          assert.ok(m.data.equals(expected), `archive ${round}: '${rel}' holds other bytes than the volume's file`);
        }
        for (const rel of hostile.stable) assert.ok(found.has(rel), `archive ${round}: stable '${rel}' is missing`);
        for (const rel of hostile.swapped) if (!found.has(rel)) note(`${rel} left out`);
      }
      const warnings = JSON.parse(readFileSync(join(work, 'warnings.json'), 'utf8')) as string[][];
      for (const w of warnings.flat()) note(`warning: ${w.replace(/ (changed|shrank).*/, '')}`);
      const raced = [...seen].filter(([what]) => !/as type [05]$/.test(what));
      assert.ok(raced.length > 0, `no archive saw a swap: ${JSON.stringify([...seen])}`);
      t.diagnostic(`observed over ${archives.length} archives: ${JSON.stringify(Object.fromEntries(seen))}`);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  };

  void describe('host tar writer on a volume that another process changes under it', () => {
    void it('folders and files swapped for links to canaries outside: no canary byte is archived, every file member is right', { timeout: 300_000 }, (t) =>
      againstSwapper(t, false),
    );
    void it(`files swapped for FIFOs${isRoot ? ' and device nodes' : ''} too: nothing blocks, nothing is read from them`, { timeout: 300_000 }, (t) =>
      againstSwapper(t, true),
    );
  });

  void describe("host tar writer and cvat-backup's own folders", () => {
    void it('leaves .cvat-backup-* out at the volume root, with a warning, and keeps it below', async () => {
      const work = mkdtempSync(join(tmpdir(), 'host-tar-own-'));
      try {
        const volume = join(work, 'volume');
        mkdirSync(join(volume, '.cvat-backup-rollback'), { recursive: true });
        writeFileSync(join(volume, '.cvat-backup-rollback', 'old.jpg'), 'old data');
        mkdirSync(join(volume, 'data'));
        writeFileSync(join(volume, 'data', '.cvat-backup-notes'), 'user data');
        const warnings: string[] = [];
        const { stream } = hostTarStream(volume, { memberPrefix: 'data', onWarning: (m) => warnings.push(m) });
        const archive = join(work, 'out.tar');
        await pipeline(stream, createWriteStream(archive));
        const names = [...(await members(readFileSync(archive))).keys()].sort();
        assert.deepEqual(names, ['', 'data', 'data/.cvat-backup-notes']);
        assert.equal(warnings.length, 1);
        assert.match(warnings[0]!, /\.cvat-backup-rollback.*left out/);
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
    });
  });
}
