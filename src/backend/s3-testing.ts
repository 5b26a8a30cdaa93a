/**
 * The tests' S3 server: Ceph's RADOS Gateway that scripts/ceph-rgw.sh starts on 127.0.0.1 and
 * describes in a root-only file. CI names that file in CVAT_BACKUP_S3_TEST_ENV: then a missing or
 * silent server fails the tests. Without it, the default file is used when present, else the S3
 * tests are skipped with a reason (a developer machine without Ceph).
 */
import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { DeleteObjectCommand, DeleteBucketCommand, ListObjectVersionsCommand, S3Client } from '@aws-sdk/client-s3';

export interface TestS3 {
  endpoint: string;
  owner: { accessKeyId: string; secretAccessKey: string };
  host: { accessKeyId: string; secretAccessKey: string };
}

const DEFAULT_FILE = '/tmp/cvat-backup-rgw/s3.env';

/** The server, or a reason to skip (only when CI did not ask for it). Throws when CI asked and it is missing. */
export function testS3(): TestS3 | { skip: string } {
  process.env['AWS_EC2_METADATA_DISABLED'] = 'true';
  const named = process.env['CVAT_BACKUP_S3_TEST_ENV'];
  let text: string;
  try {
    text = readFileSync(named || DEFAULT_FILE, 'utf8');
  } catch (error) {
    if (named) throw new Error(`CVAT_BACKUP_S3_TEST_ENV=${named}: cannot read it (${(error as Error).message}): run scripts/ceph-rgw.sh`, { cause: error });
    return { skip: `no S3 server (${DEFAULT_FILE} missing): run scripts/ceph-rgw.sh` };
  }
  const values = Object.fromEntries(text.split('\n').map((l) => /^([A-Z0-9_]+)=(.*)$/.exec(l)).filter((m) => m !== null).map((m) => [m[1]!, m[2]!]));
  const need = (name: string): string => {
    const v = values[name];
    if (!v) throw new Error(`${named || DEFAULT_FILE} has no ${name}`);
    return v;
  };
  const endpoint = need('S3_ENDPOINT');
  if (!/^http:\/\/127\.0\.0\.1:\d+$/.test(endpoint)) throw new Error(`test S3 endpoint ${endpoint} is not on 127.0.0.1`);
  return {
    endpoint,
    owner: { accessKeyId: need('S3_OWNER_ACCESS_KEY'), secretAccessKey: need('S3_OWNER_SECRET_KEY') },
    host: { accessKeyId: need('S3_HOST_ACCESS_KEY'), secretAccessKey: need('S3_HOST_SECRET_KEY') },
  };
}

/** A bucket name no other test uses. */
export function uniqueBucket(what: string): string {
  return `${what}-${randomBytes(6).toString('hex')}`;
}

export function rawClient(s3: TestS3, who: 'owner' | 'host' = 'owner'): S3Client {
  return new S3Client({
    endpoint: s3.endpoint,
    region: 'us-east-1',
    forcePathStyle: true,
    credentials: s3[who],
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  });
}

/** Deletes every version under `prefix` (and the bucket when `prefix` is ''); objects under retention stay. */
export async function emptyPrefix(client: S3Client, bucket: string, prefix: string): Promise<void> {
  for (;;) {
    const page = await client.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: prefix })).catch(() => undefined);
    const all = [...(page?.Versions ?? []), ...(page?.DeleteMarkers ?? [])];
    if (all.length === 0) break;
    const results = await Promise.allSettled(all.map((v) => client.send(new DeleteObjectCommand({ Bucket: bucket, Key: v.Key!, VersionId: v.VersionId! }))));
    if (results.some((r) => r.status === 'rejected')) return; // locked: the test server is thrown away after the run
  }
  if (prefix === '') await client.send(new DeleteBucketCommand({ Bucket: bucket })).catch(() => undefined);
}
