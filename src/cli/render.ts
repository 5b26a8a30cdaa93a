/**
 * Rendering of progress events and results. Bars on a TTY (cli-progress), plain lines otherwise;
 * everything goes to stderr so stdout carries only the result (a table, or one JSON object).
 */
import cliProgress from 'cli-progress';
import type { ProgressEvent, ProgressListener } from '../events.js';

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatDuration(ms: number): string {
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 120) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

export interface ProgressRenderer {
  listener: ProgressListener;
  stop(): void;
}

export function createProgressRenderer(stream: NodeJS.WriteStream): ProgressRenderer {
  return stream.isTTY ? barRenderer(stream) : lineRenderer(stream);
}

/** The events that are one line the same way on a terminal and in a log; undefined for volume progress. */
function eventLine(event: ProgressEvent): string | undefined {
  switch (event.type) {
    case 'phase':
      return `${event.message}…`;
    case 'warning':
      return `warning: ${event.message}`;
    case 'container-stopped':
      return `  stopped ${event.name}`;
    case 'container-started':
      return `  started ${event.name}`;
    case 'container-start-failed':
      return `  FAILED to start ${event.name}: ${event.error}`;
    case 'containers-frozen':
      return `  froze ${event.count} containers`;
    case 'containers-thawed':
      return `  thawed ${event.count} containers`;
    case 'change-journal': {
      const used = event.used.length > 0 ? `only what changed in ${event.used.join(', ')} (change journal)` : 'no volume from the change journal';
      const walked = event.walked.map((w) => `${w.volume} (${w.reason})`).join('; ');
      return `  final pass: ${used}${walked ? `; walked in full: ${walked}` : ''}`;
    }
    default:
      return undefined;
  }
}

function lineRenderer(stream: NodeJS.WriteStream): ProgressRenderer {
  const lastReport = new Map<string, number>();
  const started = new Map<string, number>();
  const write = (line: string): void => {
    stream.write(`${line}\n`);
  };
  const listener = (event: ProgressEvent): void => {
    const line = eventLine(event);
    if (line !== undefined) return write(line);
    switch (event.type) {
      case 'volume-start':
        started.set(event.volume, Date.now());
        lastReport.set(event.volume, Date.now());
        write(`${event.action} ${event.volume}${event.totalBytes !== undefined ? ` (${formatBytes(event.totalBytes)})` : ''}`);
        break;
      case 'volume-progress': {
        const now = Date.now();
        if (now - (lastReport.get(event.volume) ?? 0) < 5000) break;
        lastReport.set(event.volume, now);
        const seconds = (now - (started.get(event.volume) ?? now)) / 1000;
        const rate = seconds > 0 ? `${formatBytes(event.bytes / seconds)}/s` : '';
        write(`  ${event.volume}: ${formatBytes(event.bytes)}, ${event.files} files ${rate}`);
        break;
      }
      case 'volume-done':
        write(`  ${event.volume}: done, ${event.files} files, ${formatBytes(event.bytes)}`);
        break;
    }
  };
  return { listener, stop: () => undefined };
}

function barRenderer(stream: NodeJS.WriteStream): ProgressRenderer {
  const multi = new cliProgress.MultiBar(
    {
      stream,
      format: ' {volume} |{bar}| {percentage}% {value_h}/{total_h} {rate} ETA {eta_formatted} {files} files',
      hideCursor: true,
      clearOnComplete: false,
      etaBuffer: 50,
      formatValue: (value, options, type) => {
        void options;
        return type === 'value' || type === 'total' ? String(value) : String(value);
      },
    },
    cliProgress.Presets.shades_classic,
  );
  const bars = new Map<string, { bar: cliProgress.SingleBar; started: number; total: number; label: string }>();
  const log = (line: string): void => {
    multi.log(`${line}\n`);
  };
  const payload = (volume: string, bytes: number, files: number, total: number, startedAt: number): Record<string, string | number> => {
    const seconds = (Date.now() - startedAt) / 1000;
    return {
      volume: volume.padEnd(26),
      value_h: formatBytes(bytes),
      total_h: total > 0 ? formatBytes(total) : '?',
      rate: seconds > 0 ? `${formatBytes(bytes / seconds)}/s` : '',
      files,
    };
  };
  const listener = (event: ProgressEvent): void => {
    const line = eventLine(event);
    if (line !== undefined) return log(line);
    switch (event.type) {
      case 'volume-start': {
        const total = event.totalBytes ?? 0;
        const label = `${event.action} ${event.volume}`;
        const bar = multi.create(Math.max(total, 1), 0, payload(label, 0, 0, total, Date.now()));
        bars.set(event.volume, { bar, started: Date.now(), total, label });
        break;
      }
      case 'volume-progress':
      case 'volume-done': {
        const entry = bars.get(event.volume);
        if (!entry) break;
        if (event.bytes > entry.total) {
          entry.total = event.bytes;
          entry.bar.setTotal(event.bytes);
        }
        if (event.type === 'volume-done') {
          // A finished volume leaves the bars and becomes one line, so the screen stays tidy.
          entry.bar.stop();
          multi.remove(entry.bar);
          bars.delete(event.volume);
          const seconds = (Date.now() - entry.started) / 1000;
          log(`  ${entry.label}: ${formatBytes(event.bytes)}, ${event.files} files in ${formatDuration(Date.now() - entry.started)}${seconds > 0.5 ? ` (${formatBytes(event.bytes / seconds)}/s)` : ''}`);
          break;
        }
        entry.bar.update(event.bytes, payload(entry.label, event.bytes, event.files, entry.total, entry.started));
        break;
      }
    }
  };
  return { listener, stop: () => multi.stop() };
}

export function table(rows: string[][]): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  return rows.map((row) => row.map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i] ?? 0))).join('  ')).join('\n');
}
