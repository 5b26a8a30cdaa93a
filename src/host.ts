/** Facts about this host that several layers need. */
import { execFile } from 'node:child_process';

/** Whether a process with this pid exists here (EPERM: it exists but belongs to another user). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Flushes the file system that holds `path` to disk (syncfs, through coreutils' `sync -f`; a
 * full `sync` where that fails). `path` is a trusted path (a volume's folder from the engine, or
 * `/proc/self/fd/N` of an open folder).
 */
export async function syncFilesystem(path: string): Promise<void> {
  const run = (args: string[]): Promise<void> =>
    new Promise((resolve, reject) => {
      execFile('sync', args, { timeout: 30 * 60 * 1000 }, (error: Error | null) => (error ? reject(error) : resolve()));
    });
  await run(['-f', path]).catch(() => run([]));
}
