/**
 * The core never prints: long operations report progress as these events, and the CLI renders
 * them (bars on a TTY, plain lines otherwise, nothing on stdout with --json).
 */
/** What is being done to a volume's data. */
export type VolumeAction = 'archiving' | 'dumping' | 'loading' | 'copying while CVAT runs' | 'copying what changed' | 'verifying' | 'restoring' | 'restoring while CVAT runs' | 'copying';

export type ProgressEvent =
  | { type: 'phase'; message: string }
  | { type: 'container-stopped'; service: string; name: string }
  | { type: 'container-started'; service: string; name: string }
  | { type: 'containers-frozen'; count: number }
  | { type: 'containers-thawed'; count: number }
  | { type: 'container-start-failed'; service: string; name: string; error: string }
  | { type: 'volume-start'; volume: string; action: VolumeAction; totalBytes: number | undefined }
  | { type: 'volume-progress'; volume: string; bytes: number; files: number }
  | { type: 'volume-done'; volume: string; bytes: number; files: number }
  | { type: 'warning'; message: string }
  /** Once per two-phase or freeze backup: which volumes the final pass took from the change journal, and why not the others. */
  | { type: 'change-journal'; used: string[]; walked: { volume: string; reason: string }[] };

export type ProgressListener = (event: ProgressEvent) => void;

export const ignoreProgress: ProgressListener = () => undefined;
