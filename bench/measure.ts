/** Runs a command under GNU time: wall seconds, CPU seconds (user + system, its children included) and peak memory (max RSS). */
import { run } from '../test/fixture/engine.js';

export interface Measure {
  seconds: number;
  maxRssMiB: number;
  cpuSeconds?: number;
}

export async function measure(command: string, args: string[], env: NodeJS.ProcessEnv): Promise<Measure & { stdout: string }> {
  const start = process.hrtime.bigint();
  const r = await run('/usr/bin/time', ['-f', 'MAXRSS=%M CPU=%U+%S', command, ...args], { env: { ...process.env, ...env } });
  const rss = /MAXRSS=(\d+)/.exec(r.stderr);
  const cpu = /CPU=([\d.]+)\+([\d.]+)/.exec(r.stderr);
  return {
    seconds: Number(process.hrtime.bigint() - start) / 1e9,
    maxRssMiB: rss ? Number(rss[1]) / 1024 : NaN,
    cpuSeconds: cpu ? Number(cpu[1]) + Number(cpu[2]) : NaN,
    stdout: r.stdout,
  };
}

/** Runs a benchmark's main; a failure prints its stack and sets a non-zero exit code. */
export function runBench(main: () => Promise<void>): void {
  main().catch((error: unknown) => {
    process.stderr.write(`bench failed: ${(error as Error).stack ?? String(error)}\n`);
    process.exitCode = 1;
  });
}
