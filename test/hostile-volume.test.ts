/**
 * Backups of a volume that a container changes while it is read (issue 8, section 2), on a real
 * engine: a shell loop in a container that mounts cvat_data swaps folders of the volume for links
 * to canary folders outside it — one in the container's own file system (/tmp), one at an
 * absolute host path (which the host resolves from its own root) — and files for links to a
 * canary, FIFOs and device nodes (/dev/zero's 1,5), and back.
 *
 * - two-phase backup: the loop runs in cvat_server (docker exec), during phase 1;
 * - --mode offline and backup --to DIR --via host: CVAT is stopped for the whole copy, so the loop
 *   runs in a container outside the project that mounts the same volume (any container can).
 *
 * Nothing of either canary may be in the repository (every blob decrypted and searched) or in the
 * archive set (every archive gunzipped and searched); every file the snapshot holds under the
 * attacked folder has the bytes of the volume's file of that name; the backup exits 0 and CVAT
 * runs afterwards.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { createFixtureDeployment, FIXTURE_LABEL, type FixtureDeployment } from './fixture/deployment.js';
import { ALPINE_IMAGE, run } from './fixture/engine.js';
import { runCli, startCli, type CliResult, type CliRun } from './fixture/cli.js';
import { LocalBackend } from '../src/backend/local.js';
import { Repository } from '../src/repository/repository.js';
import { listSnapshots } from '../src/repository/snapshots.js';
import { isZeroChunk, type Tree, type TreeNode } from '../src/repository/tree.js';

const isRoot = process.getuid?.() === 0;
const VICTIMS = 8;
const BIG = 700 * 1024;

/** Files named like the canaries: what a reader that follows a link would find there. */
function canaryFiles(marker: string): Record<string, Buffer> {
  const fill = (size: number): Buffer => Buffer.alloc(size, marker);
  return { 'a.txt': fill(300), 'b.bin': fill(BIG), 'sub/c.bin': fill(100 * 1024) };
}

/**
 * The attack, POSIX sh (BusyBox or dash): in `dir` (the attacked folder as the container sees
 * it), one loop per n, all at once, turns `f<n>` into a link to a canary file, a FIFO or a
 * character device (/dev/zero's 1,5), and `swap<n>` into a link to a canary folder — at the host
 * path, or in the container's /tmp — and each back again, interleaved so that each is swapped
 * about half the time. Loop 0 prints its cycle count; all stop when /tmp/attack.stop exists.
 */
function attackScript(dir: string, hostCanary: string, containerMarker: string): string {
  return `
set -u
cd ${dir} || exit 1
rm -f /tmp/attack.stop
C=/tmp/container-canary
H=${hostCanary}
mkdir -p $C/sub
yes ${containerMarker} | head -c 300 > $C/a.txt
yes ${containerMarker} | head -c ${BIG} > $C/b.bin
yes ${containerMarker} | head -c ${100 * 1024} > $C/sub/c.bin
file_in() {
  mv f$1 .h-f$1
  case $2 in
    link) ln -s "$3" f$1 ;;
    fifo) mkfifo f$1 ;;
    device) mknod f$1 c 1 5 ;;
  esac
}
file_out() { rm f$1; mv .h-f$1 f$1; }
folder_in() { mv swap$1 .h-swap$1; ln -s "$2" swap$1; }
folder_out() { rm swap$1; mv .h-swap$1 swap$1; }
attack() {
  i=0
  while [ ! -e /tmp/attack.stop ]; do
    file_in $1 link $H/b.bin; folder_in $1 $H; file_out $1; folder_out $1
    file_in $1 fifo; folder_in $1 $C; file_out $1; folder_out $1
    file_in $1 device; folder_in $1 $H; file_out $1; folder_out $1
    file_in $1 link $C/b.bin; folder_in $1 $C; file_out $1; folder_out $1
    i=$((i+1)); if [ $1 = 0 ]; then echo $i; fi
  done
}
for n in ${Array.from({ length: VICTIMS }, (_, i) => i).join(' ')}; do attack $n & done
wait`;
}

/** The command line, killed if it has not ended after `timeoutMs` (a backup that blocks on a FIFO or reads /dev/zero never would). */
async function cliWithin(args: string[], env: NodeJS.ProcessEnv, timeoutMs: number, started?: (run: CliRun) => Promise<void>): Promise<CliResult> {
  const cli = startCli(args, env);
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      cli.kill('SIGKILL');
      reject(new Error(`cvat-backup ${args.join(' ')} hung: killed after ${timeoutMs / 1000} s`));
    }, timeoutMs);
  });
  try {
    return await Promise.race([started ? started(cli).then(() => cli.result) : cli.result, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Lines (cycle counts) a running attack has printed. */
function follow(child: ChildProcess): { cycles: () => number } {
  let last = 0;
  child.stdout?.on('data', (d: Buffer) => {
    const lines = d.toString().trim().split('\n');
    last = Number(lines[lines.length - 1]) || last;
  });
  return { cycles: () => last };
}

async function* walk(repo: Repository, tree: string, prefix = ''): AsyncGenerator<{ rel: string; node: TreeNode }> {
  const { nodes } = JSON.parse((await repo.loadBlob(tree)).toString('utf8')) as Tree;
  for (const node of nodes) {
    const rel = `${prefix}${Buffer.from(node.name, 'base64').toString('utf8')}`;
    yield { rel, node };
    if (node.type === 'dir' && node.subtree) yield* walk(repo, node.subtree, `${rel}/`);
  }
}

describe('backups of a volume that a container changes under them', { skip: !isRoot && 'reads volume folders: needs root' }, () => {
  let f: FixtureDeployment;
  let work: string;
  let hostCanary: string;
  let hostMarker: string;
  let containerMarker: string;
  let attacked: string;
  /** Content of every file of the attacked folder, by path relative to it. */
  const files = new Map<string, Buffer>();
  const env = (): NodeJS.ProcessEnv => ({ CVAT_BACKUP_REPO: join(work, 'repo'), CVAT_BACKUP_PASSWORD: 'pw' });

  before(async () => {
    f = await createFixtureDeployment({ prefix: 'hv' });
    work = await mkdtemp(join(tmpdir(), 'cvat-backup-hostile-'));
    hostMarker = `HOST-CANARY-${randomBytes(12).toString('hex')}`;
    containerMarker = `CONTAINER-CANARY-${randomBytes(12).toString('hex')}`;
    hostCanary = join(work, 'host-canary');
    for (const [name, data] of Object.entries(canaryFiles(hostMarker))) {
      await mkdir(join(hostCanary, 'sub'), { recursive: true });
      await writeFile(join(hostCanary, name), data);
    }
    const data = join(await f.volumePath('cvat_data'), 'data');
    attacked = join(data, 'hostile');
    const put = async (rel: string, bytes: Buffer): Promise<void> => {
      await writeFile(join(attacked, rel), bytes);
      files.set(rel, bytes);
    };
    for (let i = 0; i < VICTIMS; i++) {
      await mkdir(join(attacked, `swap${i}`, 'sub'), { recursive: true });
      await put(`swap${i}/a.txt`, randomBytes(300));
      await put(`swap${i}/b.bin`, randomBytes(BIG));
      await put(`swap${i}/sub/c.bin`, randomBytes(100 * 1024));
      await put(`f${i}`, randomBytes(BIG));
    }
    await put('stable.bin', randomBytes(BIG));
    // Media that takes a while to read, in the attacked folder: its name sorts between the files
    // and the folders attacked, so a reader that lists a folder's entries before it reads them
    // (as the archiver did) opens them a second or so after it listed them, long enough for the
    // loop to have swapped them.
    await run('sh', ['-c', `mkdir -p ${attacked}/m-bulk && for i in $(seq 1 120); do head -c 1048576 /dev/urandom > ${attacked}/m-bulk/$i.jpg; done; chown -R 1000:1000 ${data}`]);
    assert.equal((await runCli(['init'], env())).code, 0);
  });
  after(async () => {
    await f?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  /** Puts every swapped entry back (a stopped loop may leave some swapped). */
  const heal = async (): Promise<void> => {
    const n = Array.from({ length: VICTIMS }, (_, i) => i).join(' ');
    await run('sh', ['-c', `cd ${attacked} && for n in ${n}; do for e in swap$n f$n; do if [ -e .h-$e ] || [ -L .h-$e ]; then rm -f $e; mv .h-$e $e; fi; done; done`]);
  };

  /** The attack from a container outside the project, mounting cvat_data: CVAT's stop does not stop it. */
  const outsider = async (): Promise<{ stop: () => Promise<number> }> => {
    const name = `cvat-backup-attacker-${f.project}`;
    await run('docker', [
      'run', '-d', '--name', name, '--label', FIXTURE_LABEL, '--network', 'none',
      '-v', `${f.project}_cvat_data:/vol`, '--entrypoint', '/bin/sh', ALPINE_IMAGE,
      '-c', attackScript('/vol/data/hostile', hostCanary, containerMarker),
    ]);
    return {
      stop: async () => {
        const logs = await run('docker', ['logs', name], { allowFailure: true });
        await run('docker', ['rm', '-f', name], { allowFailure: true });
        await heal();
        return Number(logs.stdout.trim().split('\n').pop()) || 0;
      },
    };
  };

  /** No blob of the repository holds a byte of either canary; every attacked file the latest snapshot holds is right. */
  const checkRepository = async (t: TestContext): Promise<void> => {
    const repo = await Repository.open(new LocalBackend(join(work, 'repo')), 'pw');
    await repo.loadIndex();
    let blobs = 0;
    for (const [id] of repo.blobIds()) {
      const plain = await repo.loadBlob(id);
      assert.equal(plain.includes(hostMarker), false, `blob ${id.slice(0, 12)} holds the host canary`);
      assert.equal(plain.includes(containerMarker), false, `blob ${id.slice(0, 12)} holds the container canary`);
      blobs++;
    }
    const latest = (await listSnapshots(repo)).pop()!;
    const volume = latest.volumes.find((v) => v.composeName === 'cvat_data')!;
    const seen: string[] = [];
    let checked = 0;
    let stableChecked = false;
    for await (const { rel, node } of walk(repo, volume.tree)) {
      if (!rel.startsWith('data/hostile/')) continue;
      const name = rel.slice('data/hostile/'.length);
      if (/^(swap|f)\d+$/.test(name) && node.type !== 'dir' && node.type !== 'file') seen.push(`${name}: ${node.type}`);
      if (node.type !== 'file' || name.startsWith('m-bulk/')) continue;
      const expected = files.get(name.replace(/^\.h-/, ''));
      assert.ok(expected, `the snapshot holds a file '${name}' that the volume does not have`);
      const parts: Buffer[] = [];
      for (const ref of node.content ?? []) parts.push(isZeroChunk(ref) ? Buffer.alloc(Number(ref.split(':')[1])) : await repo.loadBlob(ref));
      assert.ok(Buffer.concat(parts).equals(expected), `'${name}' in the snapshot holds other bytes than the volume's file`);
      checked++;
      if (name === 'stable.bin') stableChecked = true;
    }
    assert.ok(stableChecked, 'the attacked folder\'s stable file is in the snapshot');
    t.diagnostic(`${blobs} blobs searched; ${checked} files checked; swapped entries as the final pass saw them: ${seen.join(', ') || 'none'}`);
  };

  const allRunning = async (): Promise<void> => {
    const states = await f.states();
    assert.ok(Object.values(states).every((s) => s === 'running'), JSON.stringify(states));
  };

  it('two-phase backup, the loop in cvat_server during phase 1: nothing of a canary is stored', { timeout: 600_000 }, async (t) => {
    const server = await f.container('cvat_server');
    const loop = spawn('docker', ['exec', server, '/bin/sh', '-c', attackScript('/home/django/data/data/hostile', hostCanary, containerMarker)], {
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    const attack = follow(loop);
    try {
      while (attack.cycles() < 2) await new Promise((resolve) => setTimeout(resolve, 100));
      let duringPhase1 = 0;
      const r = await cliWithin(['--project', f.project, '--json', 'backup'], env(), 300_000, (backup) =>
        backup.waitForStderr('phase 2', 300_000).then(() => void (duringPhase1 = attack.cycles())),
      );
      assert.equal(r.code, 0, r.stderr);
      assert.equal((JSON.parse(r.stdout) as { mode: string }).mode, 'two-phase');
      assert.ok(duringPhase1 > 2, `the loop ran during phase 1 (${duringPhase1} cycles by its end)`);
      t.diagnostic(`loop cycles by the end of phase 1: ${duringPhase1}; warnings: ${r.stderr.split('\n').filter((l) => l.startsWith('warning')).length}`);
    } finally {
      // The loop died with the container's stop; if the backup failed before that, stop it now.
      await f.exec('cvat_server', 'touch /tmp/attack.stop').catch(() => undefined);
      await new Promise<void>((resolve) => (loop.exitCode === null ? loop.on('close', () => resolve()) : resolve()));
      await heal();
    }
    await checkRepository(t);
    await allRunning();
  });

  it('--mode offline, the loop in another container while CVAT is stopped: nothing of a canary is stored', { timeout: 600_000 }, async (t) => {
    const attack = await outsider();
    let r;
    try {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      r = await cliWithin(['--project', f.project, '--json', 'backup', '--mode', 'offline'], env(), 300_000);
    } finally {
      const cycles = await attack.stop();
      t.diagnostic(`loop cycles: ${cycles}`);
      assert.ok(cycles > 0, 'the loop ran');
    }
    assert.equal(r.code, 0, r.stderr);
    t.diagnostic(`warnings: ${r.stderr.split('\n').filter((l) => l.startsWith('warning')).join(' | ') || 'none'}`);
    await checkRepository(t);
    await allRunning();
  });

  it('backup --to DIR --via host, the loop in another container: nothing of a canary is archived', { timeout: 600_000 }, async (t) => {
    const dir = join(work, 'set');
    const attack = await outsider();
    let r;
    try {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      r = await cliWithin(['--project', f.project, 'backup', '--to', dir, '--via', 'host'], env(), 300_000);
    } finally {
      const cycles = await attack.stop();
      t.diagnostic(`loop cycles: ${cycles}`);
      assert.ok(cycles > 0, 'the loop ran');
    }
    assert.equal(r.code, 0, r.stderr);
    t.diagnostic(`warnings: ${r.stderr.split('\n').filter((l) => l.startsWith('warning')).join(' | ') || 'none'}`);
    for (const name of (await readdir(dir)).filter((n) => n.endsWith('.tar.gz'))) {
      const tar = gunzipSync(await readFile(join(dir, name)));
      assert.equal(tar.includes(hostMarker), false, `${name} holds the host canary`);
      assert.equal(tar.includes(containerMarker), false, `${name} holds the container canary`);
    }
    const verify = await runCli(['verify', dir], env());
    assert.equal(verify.code, 0, verify.stderr);
    await allRunning();
  });
});
