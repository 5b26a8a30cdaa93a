/**
 * prune and forget --prune killed with SIGKILL at random points: no snapshot that survives loses a
 * byte, `check` stays clean after every kill, and the next prune finishes the job.
 *
 * Snapshots come from `import` of archive sets made with GNU tar (a real writer, no Docker needed),
 * from a folder that changes between snapshots (new, rewritten and deleted files), so every prune
 * both deletes and repacks. After each kill every surviving snapshot is exported and compared,
 * byte for byte, with the folder it was made from.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from './fixture/engine.js';
import { runCli, startCli } from './fixture/cli.js';

const KILLS = Number(process.env['CVAT_BACKUP_TEST_PRUNE_KILLS'] ?? 20);
const PROJECT = 'killprune';

/** path → SHA-256 of every regular file below `root` (relative paths). */
async function fileHashes(root: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (dir: string, rel: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      const key = rel === '' ? entry.name : `${rel}/${entry.name}`;
      if (entry.isDirectory()) await walk(path, key);
      else if (entry.isFile()) out[key] = createHash('sha256').update(await readFile(path)).digest('hex');
    }
  };
  await walk(root, '');
  return out;
}

describe('prune killed with SIGKILL at random points', () => {
  let work: string;
  let env: NodeJS.ProcessEnv;
  let source: string;
  /** snapshot id → the file hashes it must hold. */
  const expected = new Map<string, Record<string, string>>();
  let generation = 0;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-killprune-'));
    env = { CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'kill-prune-pw' };
    source = join(work, 'src');
    await mkdir(join(source, 'home/django/data/frames'), { recursive: true });
    for (let i = 0; i < 24; i++) await writeFile(join(source, 'home/django/data/frames', `f${i}.bin`), randomBytes(1_500_000));
    const init = await runCli(['init'], env);
    assert.equal(init.code, 0, init.stderr);
  });
  after(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  /** Changes a third of the media, makes a guide-style archive set and imports it as a snapshot. */
  const newSnapshot = async (): Promise<void> => {
    generation++;
    const frames = join(source, 'home/django/data/frames');
    for (let i = 0; i < 24; i++) {
      if ((i + generation) % 3 !== 0) continue;
      if ((i + generation) % 2 === 0) await writeFile(join(frames, `f${i}.bin`), randomBytes(1_500_000));
      else await rm(join(frames, `f${i}.bin`), { force: true });
    }
    await writeFile(join(frames, `new-${generation}.bin`), randomBytes(800_000));
    const set = join(work, `set-${generation}`);
    await mkdir(set);
    await run('tar', ['-czf', join(set, 'cvat_data.tar.gz'), '-C', source, 'home/django/data']);
    const r = await runCli(['--project', PROJECT, '--json', 'import', set, '--cvat-version', '2.73.0'], env);
    assert.equal(r.code, 0, r.stderr);
    expected.set((JSON.parse(r.stdout) as { snapshot: string }).snapshot, await fileHashes(join(source, 'home/django/data')));
    await rm(set, { recursive: true, force: true });
  };

  /** Every snapshot still listed (or `sample` of them, at random) holds exactly what it was made from. */
  const verifySurvivors = async (label: string, sample = Infinity): Promise<void> => {
    const list = await runCli(['--json', 'snapshots'], env);
    assert.equal(list.code, 0, `${label}: ${list.stderr}`);
    const ids = (JSON.parse(list.stdout) as { id: string }[]).map((s) => s.id);
    assert.ok(ids.length > 0, label);
    for (const id of ids) assert.ok(expected.has(id), `${label}: unknown snapshot ${id}`);
    const chosen = [...ids].sort(() => Math.random() - 0.5).slice(0, sample);
    for (const id of chosen) {
      const want = expected.get(id);
      assert.ok(want, `${label}: unknown snapshot ${id}`);
      const out = join(work, `export-${id.slice(0, 8)}`);
      const e = await runCli(['export', id, '--to', out], env);
      assert.equal(e.code, 0, `${label}: export ${id}: ${e.stderr}`);
      const unpacked = join(work, `unpacked-${id.slice(0, 8)}`);
      await mkdir(unpacked);
      await run('tar', ['-xzf', join(out, 'cvat_data.tar.gz'), '-C', unpacked]);
      assert.deepEqual(await fileHashes(join(unpacked, 'home/django/data')), want, `${label}: snapshot ${id.slice(0, 8)}`);
      await rm(out, { recursive: true, force: true });
      await rm(unpacked, { recursive: true, force: true });
    }
  };

  it(`${KILLS} kills of prune and forget --prune: check clean, every surviving snapshot byte-exact`, async () => {
    for (let i = 0; i < 4; i++) await newSnapshot();
    let kills = 0;
    let finished = 0;
    let window = 700;
    for (let attempt = 0; kills < KILLS && attempt < KILLS * 4; attempt++) {
      await newSnapshot();
      const args = attempt % 2 === 0 ? ['forget', '--keep-last', '3', '--prune'] : ['prune'];
      if (attempt % 2 === 1) {
        // Something for prune alone to free: forget without pruning first.
        const f = await runCli(['forget', '--keep-last', '3'], env);
        assert.equal(f.code, 0, f.stderr);
      }
      const cli = startCli(args, env);
      // Past opening the repository (scrypt), then a random point of the work: the window follows
      // how long the work took when it finished before its kill.
      await cli.waitForStderr(/\S/, 60_000).catch(() => undefined);
      const working = Date.now();
      let exited = false;
      void cli.result.then(() => (exited = true));
      await new Promise((resolve) => setTimeout(resolve, Math.floor(Math.random() * window)));
      if (!exited) cli.kill('SIGKILL');
      const result = await cli.result;
      if (result.signal === 'SIGKILL') kills++;
      else {
        assert.equal(result.code, 0, result.stderr);
        finished++;
        window = Math.max(20, (Date.now() - working) * 0.8);
      }
      const label = `attempt ${attempt} (${args.join(' ')}, ${result.signal ?? `exit ${result.code}`})`;
      const check = await runCli(['check'], env);
      assert.equal(check.code, 0, `${label}: check: ${check.stderr}`);
      await verifySurvivors(label, 2);
    }
    assert.equal(kills, KILLS, `${kills} kills, ${finished} prunes finished before their kill`);
    // The next prune finishes what the killed ones left, and every byte is still readable.
    const prune = await runCli(['prune'], env);
    assert.equal(prune.code, 0, prune.stderr);
    const full = await runCli(['check', '--read-data'], env);
    assert.equal(full.code, 0, full.stderr);
    await verifySurvivors('after the last prune');
  });
});
