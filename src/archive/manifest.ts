/**
 * `manifest.json` of an archive set: what was backed up, from which CVAT, and the checksum of every
 * archive. Written last, atomically, so a directory with a manifest holds a complete set.
 */
import { z } from 'zod';

export const MANIFEST_FILE = 'manifest.json';
export const MANIFEST_FORMAT = 'cvat-backup/archive-set';

const volumeRecord = z.object({
  composeName: z.string().min(1),
  name: z.string().min(1),
  role: z.string(),
  mountPath: z.string().startsWith('/'),
  archive: z.string().regex(/^[^/]+\.tar\.gz$/),
  /** Member names start with this (the mount path without its leading slash). */
  memberPrefix: z.string(),
  entries: z.number().int().nonnegative(),
  files: z.number().int().nonnegative(),
  bytes: z.number().int().nonnegative(),
  archiveBytes: z.number().int().nonnegative(),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  /** How the bytes moved: through the engine's archive API or from the volume's folder. */
  transport: z.enum(['engine', 'host']).optional(),
});

export const manifestSchema = z.object({
  format: z.literal(MANIFEST_FORMAT),
  formatVersion: z.literal(1),
  tool: z.object({ name: z.string(), version: z.string() }),
  project: z.string(),
  cvat: z.object({
    version: z.string().nullable(),
    versionSource: z.string(),
    serverImage: z.string().nullable(),
    serverImageDigest: z.string().nullable(),
  }),
  startedAt: z.string(),
  finishedAt: z.string(),
  durationMs: z.number().nonnegative(),
  downtimeMs: z.number().nonnegative(),
  volumes: z.array(volumeRecord),
  skipped: z.array(z.object({ composeName: z.string(), reason: z.string() })),
  bindMounts: z.array(z.object({ service: z.string(), source: z.string(), destination: z.string(), reason: z.string() })),
});

export type ArchiveSetManifest = z.infer<typeof manifestSchema>;
export type VolumeArchiveRecord = z.infer<typeof volumeRecord>;

export function memberPrefixOf(mountPath: string): string {
  return mountPath.replace(/^\/+/, '').replace(/\/+$/, '');
}

export function archiveFileName(composeName: string): string {
  return `${composeName}.tar.gz`;
}
