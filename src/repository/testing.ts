/**
 * For unit tests of the repository layer (locks, prune, check, repair) without Docker or a file
 * system: small snapshots written straight through the repository API, and read back byte for
 * byte. Not used by the tool itself.
 */
import type { Backend } from '../backend/backend.js';
import type { Clock } from '../clock.js';
import { loadTree } from './restorer.js';
import { Repository, type RepositoryOptions } from './repository.js';
import type { Snapshot, SnapshotVolume, TreeNode } from './tree.js';

/** Cheap scrypt parameters: a test repository needs no protection. */
export const TEST_KDF = { algorithm: 'scrypt' as const, N: 1024, r: 8, p: 1 };

/** Deterministic pseudo-random bytes (xorshift), so a failing case can be replayed. */
export function prngBytes(seed: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out[i] = s & 0xff;
  }
  return out;
}

/** A media volume of a snapshot whose tree is `tree` (as an archiver made it), for restores in tests. */
export function testMediaVolume(tree: string, root: TreeNode): SnapshotVolume {
  return {
    composeName: 'cvat_data',
    name: 'p_cvat_data',
    role: 'media',
    mountPath: '/home/django/data',
    tree,
    root,
    entries: 1000, // at least what the trees hold: a restore walks no more entries than recorded
    files: 0,
    bytes: 0,
  };
}

export function initTestRepository(backend: Backend, options: RepositoryOptions = {}): Promise<Repository> {
  return Repository.init(backend, 'pw', { kdf: TEST_KDF, ...options });
}

export function openTestRepository(backend: Backend, options: RepositoryOptions = {}): Promise<Repository> {
  return Repository.open(backend, 'pw', options);
}

function fileNode(name: string, size: number, content: string[]): TreeNode {
  return { name: Buffer.from(name).toString('base64'), type: 'file', mode: 0o644, uid: 0, gid: 0, mtimeNs: '0', ctimeNs: '0', inode: '0', size, content };
}

/**
 * Stores `files` (name → bytes, one folder) as a snapshot: each file cut into `chunk`-byte data
 * blobs, one tree, index, snapshot. `flushEvery` closes a pack after that many files (to shape
 * packs for prune tests). Returns the snapshot id.
 */
export async function writeSnapshot(
  repo: Repository,
  files: Record<string, Buffer>,
  options: { chunk?: number; flushEvery?: number; time?: string; project?: string; parent?: string } = {},
): Promise<string> {
  await repo.loadIndex();
  const chunk = options.chunk ?? 64 * 1024;
  const nodes: TreeNode[] = [];
  let count = 0;
  for (const name of Object.keys(files).sort()) {
    const data = files[name]!;
    const content: string[] = [];
    for (let at = 0; at < data.length; at += chunk) content.push((await repo.saveBlob('data', data.subarray(at, at + chunk))).id);
    nodes.push(fileNode(name, data.length, content));
    if (options.flushEvery !== undefined && ++count % options.flushEvery === 0) await repo.flushPacksOnly();
  }
  const tree = (await repo.saveBlob('tree', Buffer.from(JSON.stringify({ nodes })))).id;
  await repo.flush();
  const snapshot: Snapshot = {
    version: 1,
    time: options.time ?? new Date().toISOString(),
    hostname: 'test',
    tool: 'test',
    project: options.project ?? 'p',
    ...(options.parent !== undefined ? { parent: options.parent } : {}),
    cvat: { version: '2.73.0', versionSource: 'given', serverImage: null, serverImageDigest: null },
    downtimeMs: 0,
    durationMs: 0,
    volumes: [
      {
        composeName: 'cvat_data',
        name: 'p_cvat_data',
        role: 'media',
        mountPath: '/home/django/data',
        tree,
        root: { name: '', type: 'dir', mode: 0o755, uid: 0, gid: 0, mtimeNs: '0', ctimeNs: '0', inode: '0', size: 0 },
        entries: nodes.length,
        files: nodes.length,
        bytes: Object.values(files).reduce((n, b) => n + b.length, 0),
      },
    ],
    skipped: [],
  };
  return repo.saveObject('snapshots', snapshot);
}

/** A snapshot written by `writeSnapshot`, read back: name → bytes. */
export async function readSnapshotFiles(repo: Repository, id: string): Promise<Record<string, Buffer>> {
  await repo.loadIndex();
  const snapshot = await repo.loadObject<Snapshot>('snapshots', id);
  const out: Record<string, Buffer> = {};
  for (const node of (await loadTree(repo, snapshot.volumes[0]!.tree)).nodes) {
    const parts: Buffer[] = [];
    for (const ref of node.content ?? []) parts.push(await repo.loadBlob(ref, undefined, { hash: true }));
    out[Buffer.from(node.name, 'base64').toString('utf8')] = Buffer.concat(parts);
  }
  return out;
}

/** Retries without waiting: each pause moves this clock on and returns. */
export const instantClock = (): Clock => {
  let time = Date.now();
  return {
    now: () => time,
    sleep: (ms) => {
      time += ms;
      return Promise.resolve();
    },
    schedule: () => () => undefined,
  };
};
