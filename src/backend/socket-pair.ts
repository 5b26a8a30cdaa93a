/**
 * Two connected unix sockets, for a child process that speaks over its stdin and stdout (`rclone
 * serve restic --stdio`, `ssh -s sftp`): one end becomes the child's stdin and stdout, the other is
 * ours. A real socket, so HTTP/2 needs no stream adapter, and so our end can read in place
 * (`onread`: the kernel copies each read straight into the memory the reader names, instead of
 * into a new buffer per read). The rendezvous path lives a moment in a private folder and is gone
 * before the child starts.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export async function socketPair(onread?: net.OnReadOpts): Promise<[ours: net.Socket, theirs: net.Socket]> {
  const dir = await mkdtemp(join(tmpdir(), 'cvat-backup-pair-'));
  try {
    const path = join(dir, 'socket');
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, resolve);
    });
    const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
    const ours = net.connect(onread ? { path, onread } : { path });
    await new Promise<void>((resolve, reject) => {
      ours.once('connect', resolve);
      ours.once('error', reject);
    });
    const theirs = await accepted;
    server.close();
    return [ours, theirs];
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
