/**
 * A repository in an S3 bucket (Amazon S3, Ceph RADOS Gateway, MinIO, …), laid out as restic does
 * under the location's prefix: `config`, `keys/`, `data/<2 hex>/`, `index/`, `snapshots/`,
 * `locks/`, `state/`. An object becomes visible whole when its PUT (or multipart completion)
 * returns, so there are no temporary files — only multipart uploads a killed process left, which
 * `listTemporary` shows and prune aborts once they are old.
 *
 * Credentials come from the AWS SDK's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
 * AWS_PROFILE and ~/.aws, web identity, …), never from the location; no message we make names one.
 * Servers that reject the SDK's newer checksum headers (Ceph 16, older MinIO) work with the SDK's
 * own settings AWS_REQUEST_CHECKSUM_CALCULATION=when_required and
 * AWS_RESPONSE_CHECKSUM_VALIDATION=when_required (or CVAT_BACKUP_S3_CHECKSUMS=when_required).
 * Uploads are checked by the server end to end: SigV4 signs the body's SHA-256 (for a pack, the
 * hash its name is, computed as it was built, so the body is not hashed a second time here), and
 * in a repository with Object Lock every upload also carries the Content-MD5 that Object Lock
 * requires.
 *
 * Object Lock (ransomware-proof storage): a repository made with `objectLock` lives in a bucket
 * with Object Lock enabled (versioned). Every object but lock files and `state/` is written with a
 * retention (GOVERNANCE or COMPLIANCE) of the repository's period, recorded in the config object's
 * metadata so later runs know it. `remove` refuses an object still under retention
 * (ObjectLockedError) and, after it, deletes every version of the key, so the space is freed.
 * A plain DELETE by anyone else only adds a delete marker: `listHidden` finds such objects and
 * `undelete` brings them back (run with the bucket owner's credentials).
 */
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CopyObjectCommand,
  CreateBucketCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  GetObjectLockConfigurationCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectVersionsCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  PutObjectRetentionCommand,
  S3Client,
  UploadPartCommand,
  type ObjectLockMode,
} from '@aws-sdk/client-s3';
import { ObjectLockedError, RepositoryError, TargetNotEmptyError, UsageError } from '../errors.js';
import type { Backend, FileHints, FileInfo, FileKind, SignedRequest, TemporaryFile } from './backend.js';

const KINDS: FileKind[] = ['config', 'keys', 'data', 'index', 'snapshots', 'locks', 'state'];
/** Kinds written without retention: locks come and go, `state/` is rewritten (prune's memory). */
const UNLOCKED_KINDS: FileKind[] = ['locks', 'state'];
const LOCK_METADATA = 'cvat-backup-object-lock';
/** S3's smallest part (but the last). */
const MIN_PART = 5 * 1024 * 1024;

export interface ObjectLockSettings {
  mode: 'governance' | 'compliance';
  /** Retention of every object written, from its write (and from every backup that still uses it). */
  seconds: number;
}

export interface S3Location {
  /** `http(s)://host:port` of a custom server (path-style addressing); undefined for Amazon S3. */
  endpoint: string | undefined;
  bucket: string;
  prefix: string;
}

export interface S3BackendOptions {
  /** Environment of the SDK settings we read (default process.env); the credential chain reads its own. */
  env?: NodeJS.ProcessEnv;
  /** Explicit credentials (tests); default: the SDK's standard chain. */
  credentials?: { accessKeyId: string; secretAccessKey: string };
  /** Parts of a multipart upload are this size (at least 5 MiB; default 16 MiB). */
  partSize?: number;
  /**
   * Files larger than this go up as a multipart upload (default 64 MiB, at least `partSize`):
   * packs (16 MiB and a chunk) go up in one PUT, one request and not four.
   */
  multipartAbove?: number;
  /** Object Lock for a repository `create` makes (init --object-lock). */
  objectLock?: ObjectLockSettings;
  /** The SDK's attempts per request (its own retries with backoff): few, our retry layer is above. */
  maxAttempts?: number;
  /** Milliseconds since the epoch (retention dates); default the system clock. */
  now?: () => number;
}

/** An object whose newest version is a delete marker: someone deleted it, its data is still there. */
export interface HiddenObject {
  key: string;
  /** The newest version that holds data. */
  versionId: string;
  size: number;
  deletedMs: number | undefined;
}

interface SdkError {
  name?: string;
  Code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
}

function statusOf(error: unknown): number | undefined {
  return (error as SdkError | null)?.$metadata?.httpStatusCode;
}

function isNotFound(error: unknown): boolean {
  const name = (error as SdkError | null)?.name;
  return name === 'NoSuchKey' || name === 'NotFound' || name === 'NoSuchVersion' || statusOf(error) === 404;
}

function checksumSetting(env: NodeJS.ProcessEnv): 'WHEN_REQUIRED' | 'WHEN_SUPPORTED' | undefined {
  const value = env['CVAT_BACKUP_S3_CHECKSUMS'];
  if (value === undefined || value === '') return undefined;
  if (/^when_required$/i.test(value)) return 'WHEN_REQUIRED';
  if (/^when_supported$/i.test(value)) return 'WHEN_SUPPORTED';
  throw new UsageError(`CVAT_BACKUP_S3_CHECKSUMS=${value}: expected when_required or when_supported`);
}

export class S3Backend implements Backend {
  readonly location: string;
  private readonly client: S3Client;
  private readonly clientConfig: ConstructorParameters<typeof S3Client>[0];
  /** The client `signedLoad` builds requests with (made on first use: only restores need it). */
  private signer: S3Client | undefined;
  private readonly base: string;
  private readonly partSize: number;
  private readonly multipartAbove: number;
  private readonly now: () => number;
  private lockSettings: Promise<ObjectLockSettings | undefined> | undefined;

  constructor(
    private readonly where: S3Location,
    location: string,
    private readonly options: S3BackendOptions = {},
  ) {
    const env = options.env ?? process.env;
    this.location = location;
    this.base = where.prefix === '' ? '' : `${where.prefix}/`;
    this.partSize = Math.max(MIN_PART, options.partSize ?? 16 * 1024 * 1024);
    this.multipartAbove = Math.max(this.partSize, options.multipartAbove ?? 64 * 1024 * 1024);
    this.now = options.now ?? Date.now;
    if (options.objectLock) this.lockSettings = Promise.resolve(options.objectLock);
    // The SDK warns on every run under Node 20 that its 2027 releases will need Node 22: a user
    // of ours can do nothing about it (we support Node 20), so it is not shown.
    process.env['AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED'] ??= 'true';
    const checksums = checksumSetting(env);
    const region = env['AWS_REGION'] || env['AWS_DEFAULT_REGION'] || (where.endpoint !== undefined ? 'us-east-1' : undefined);
    this.clientConfig = {
      ...(region !== undefined ? { region } : {}),
      ...(where.endpoint !== undefined ? { endpoint: where.endpoint, forcePathStyle: true } : { followRegionRedirects: true }),
      ...(options.credentials ? { credentials: options.credentials } : {}),
      ...(checksums ? { requestChecksumCalculation: checksums, responseChecksumValidation: checksums } : {}),
      maxAttempts: options.maxAttempts ?? 3,
      requestHandler: { connectionTimeout: 10_000, requestTimeout: 300_000 },
    };
    this.client = new S3Client(this.clientConfig);
  }

  private key(kind: FileKind, name: string): string {
    if (kind === 'config') return `${this.base}config`;
    if (kind === 'data') return `${this.base}data/${name.slice(0, 2)}/${name}`;
    return `${this.base}${kind}/${name}`;
  }

  /** Runs one request; errors keep their SDK name and status but say what was asked, in one line. */
  private async call<T>(what: string, run: () => Promise<T>): Promise<T> {
    try {
      return await run();
    } catch (error) {
      throw this.explain(what, error);
    }
  }

  private explain(what: string, error: unknown): Error {
    if (error instanceof UsageError || error instanceof ObjectLockedError || error instanceof TargetNotEmptyError || error instanceof RepositoryError) return error;
    const e = error as SdkError & { code?: string };
    const name = e.name ?? 'Error';
    if (name === 'CredentialsProviderError' || /Could not load credentials/i.test(e.message ?? '')) {
      return new UsageError(`${this.location}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE`, { cause: error });
    }
    if (/Region is missing/i.test(e.message ?? '')) {
      return new UsageError(`${this.location}: no AWS region: set AWS_REGION (or region in the AWS_PROFILE's ~/.aws/config)`, { cause: error });
    }
    if (name === 'NoSuchBucket') {
      return new RepositoryError(`no repository at ${this.location}: the bucket does not exist (create one with 'cvat-backup init')`, { cause: error });
    }
    if (name === 'InvalidAccessKeyId' || name === 'SignatureDoesNotMatch') {
      return new UsageError(`${this.location}: the S3 server refused the credentials (${name}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY`, { cause: error });
    }
    const status = statusOf(error);
    if (name === 'AccessDenied' || status === 403) {
      return new UsageError(`${this.location}: the S3 server denied ${what} (${name === 'Unknown' || name === 'Error' ? 'HTTP 403' : name}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the profile) and the bucket's permissions`, { cause: error });
    }
    const out = new Error(`${this.location}: S3 ${what}: ${name}${status ? ` (HTTP ${status})` : ''}${e.message && e.message !== name ? `: ${e.message.split('\n')[0]}` : ''}`, { cause: error });
    const code = isNotFound(error) ? 'ENOENT' : (e.code ?? name);
    return Object.assign(out, { code, status });
  }

  async exists(): Promise<boolean> {
    return (await this.stat('config', 'config')) !== undefined;
  }

  async create(): Promise<void> {
    const lock = this.options.objectLock;
    const bucket = this.where.bucket;
    const found = await this.client.send(new HeadBucketCommand({ Bucket: bucket })).then(
      () => true,
      (error: unknown) => {
        if (isNotFound(error)) return false;
        throw this.explain(`HEAD bucket ${bucket}`, error);
      },
    );
    if (!found) {
      await this.call(`create bucket ${bucket}`, () => this.client.send(new CreateBucketCommand({ Bucket: bucket, ...(lock ? { ObjectLockEnabledForBucket: true } : {}) })));
      return;
    }
    if (lock) {
      const config = await this.client.send(new GetObjectLockConfigurationCommand({ Bucket: bucket })).catch((error: unknown) => {
        if (isNotFound(error) || (error as SdkError).name === 'ObjectLockConfigurationNotFoundError') return undefined;
        throw this.explain(`object lock configuration of ${bucket}`, error);
      });
      if (config?.ObjectLockConfiguration?.ObjectLockEnabled !== 'Enabled') {
        throw new UsageError(
          `bucket ${bucket} exists without Object Lock, and S3 cannot turn it on for an existing bucket here: name a new bucket (init creates it with Object Lock) or init without --object-lock`,
        );
      }
    }
    const listed = await this.call(`list ${this.base || '/'}`, () => this.client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: this.base, MaxKeys: 1 })));
    if ((listed.KeyCount ?? listed.Contents?.length ?? 0) > 0) {
      throw new TargetNotEmptyError(`${this.location} is not empty and holds no repository: give the repository a new bucket or an unused prefix`);
    }
  }

  /** The repository's Object Lock, from `options` (init) or the config object's metadata. */
  private objectLock(): Promise<ObjectLockSettings | undefined> {
    this.lockSettings ??= this.client.send(new HeadObjectCommand({ Bucket: this.where.bucket, Key: this.key('config', 'config') })).then(
      (head) => parseLockMetadata(head.Metadata?.[LOCK_METADATA]),
      (error: unknown) => {
        this.lockSettings = undefined;
        if (isNotFound(error)) return undefined;
        throw this.explain('HEAD config', error);
      },
    );
    return this.lockSettings;
  }

  /** The Object Lock of this repository (undefined: none). */
  async retention(): Promise<ObjectLockSettings | undefined> {
    return this.objectLock();
  }

  private async retentionHeaders(kind: FileKind): Promise<{ ObjectLockMode?: ObjectLockMode; ObjectLockRetainUntilDate?: Date; Metadata?: Record<string, string> }> {
    if (UNLOCKED_KINDS.includes(kind)) return {};
    const lock = await this.objectLock();
    if (!lock) return {};
    return {
      ObjectLockMode: lock.mode === 'compliance' ? 'COMPLIANCE' : 'GOVERNANCE',
      ObjectLockRetainUntilDate: new Date(this.now() + lock.seconds * 1000),
      ...(kind === 'config' ? { Metadata: { [LOCK_METADATA]: `${lock.mode} ${lock.seconds}` } } : {}),
    };
  }

  async save(kind: FileKind, name: string, data: Buffer | Buffer[], hints?: FileHints): Promise<void> {
    const parts = Array.isArray(data) ? data : [data];
    const size = parts.reduce((n, p) => n + p.length, 0);
    const key = this.key(kind, name);
    const headers = await this.retentionHeaders(kind);
    // Object Lock requires Content-MD5 on every upload; elsewhere the signed SHA-256 suffices.
    const locked = (await this.objectLock()) !== undefined;
    if (size <= this.multipartAbove) {
      const body = parts.length === 1 ? parts[0]! : Buffer.concat(parts, size);
      await this.call(`PUT ${kind}/${name}`, () => {
        const command = new PutObjectCommand({ Bucket: this.where.bucket, Key: key, Body: body, ContentLength: size, ...(locked ? { ContentMD5: md5(body) } : {}), ...headers });
        if (hints?.sha256 !== undefined && SHA256_HEX.test(hints.sha256)) withPayloadHash(command, hints.sha256);
        return this.client.send(command);
      });
      return;
    }
    const started = await this.call(`start multipart upload of ${kind}/${name}`, () =>
      this.client.send(new CreateMultipartUploadCommand({ Bucket: this.where.bucket, Key: key, ...headers })),
    );
    const uploadId = started.UploadId!;
    try {
      const done: { ETag: string; PartNumber: number }[] = [];
      let number = 0;
      for (const body of slices(parts, this.partSize)) {
        const partNumber = ++number;
        const uploaded = await this.call(`upload part ${partNumber} of ${kind}/${name}`, () =>
          this.client.send(
            new UploadPartCommand({
              Bucket: this.where.bucket,
              Key: key,
              UploadId: uploadId,
              PartNumber: partNumber,
              Body: body,
              ContentLength: body.length,
              ...(locked ? { ContentMD5: md5(body) } : {}),
            }),
          ),
        );
        done.push({ ETag: uploaded.ETag!, PartNumber: partNumber });
      }
      await this.call(`complete multipart upload of ${kind}/${name}`, () =>
        this.client.send(new CompleteMultipartUploadCommand({ Bucket: this.where.bucket, Key: key, UploadId: uploadId, MultipartUpload: { Parts: done } })),
      );
    } catch (error) {
      await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.where.bucket, Key: key, UploadId: uploadId })).catch(() => undefined);
      throw error;
    }
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer> {
    if (range && range.length <= 0) return Buffer.alloc(0);
    const request = {
      Bucket: this.where.bucket,
      Key: this.key(kind, name),
      ...(range ? { Range: `bytes=${range.offset}-${range.offset + range.length - 1}` } : {}),
    };
    try {
      const reply = await this.client.send(new GetObjectCommand(request));
      return await collectBody(reply.Body!, reply.ContentLength);
    } catch (error) {
      // A range that starts at or past the end: the contract's "shorter at the end" is empty.
      if (range && statusOf(error) === 416 && (await this.stat(kind, name)) !== undefined) return Buffer.alloc(0);
      throw this.explain(`GET ${kind}/${name}`, error);
    }
  }

  /**
   * The GET `load` would send for the range, built and signed by the SDK (endpoint, addressing,
   * region, credentials and SigV4 headers exactly as for its own requests) but not sent: a
   * restore's workers make it (backend.ts, `signedLoad`). The signature is valid for minutes.
   * (A bucket in another region than the one configured answers it with a redirect, which the
   * worker does not follow: the caller then loads through `load`, which follows it.)
   */
  async signedLoad(kind: FileKind, name: string, range: { offset: number; length: number }): Promise<SignedRequest | undefined> {
    if (range.length <= 0) return undefined;
    this.signer ??= new S3Client({ ...this.clientConfig, maxAttempts: 1, requestHandler: new CaptureHandler() });
    const command = new GetObjectCommand({ Bucket: this.where.bucket, Key: this.key(kind, name), Range: `bytes=${range.offset}-${range.offset + range.length - 1}` });
    try {
      await this.signer.send(command);
    } catch (error) {
      if (error instanceof Captured) return error.request;
      throw this.explain(`sign GET ${kind}/${name}`, error);
    }
    return undefined;
  }

  async list(kind: FileKind): Promise<FileInfo[]> {
    if (kind === 'config') {
      const head = await this.head(this.key('config', 'config'));
      return head ? [{ name: 'config', size: head.size, modifiedMs: head.modifiedMs }] : [];
    }
    const out: FileInfo[] = [];
    const prefix = `${this.base}${kind}/`;
    for await (const o of this.objects(prefix)) {
      const name = o.key.slice(o.key.lastIndexOf('/') + 1);
      if (kind === 'data' ? o.key !== this.key('data', name) : o.key !== `${prefix}${name}`) continue;
      out.push({ name, size: o.size, modifiedMs: o.modifiedMs });
    }
    return out;
  }

  private async *objects(prefix: string): AsyncGenerator<{ key: string; size: number; modifiedMs: number | undefined }> {
    let token: string | undefined;
    do {
      const page = await this.call(`list ${prefix}`, () =>
        this.client.send(new ListObjectsV2Command({ Bucket: this.where.bucket, Prefix: prefix, ...(token ? { ContinuationToken: token } : {}) })),
      );
      for (const o of page.Contents ?? []) if (o.Key !== undefined) yield { key: o.Key, size: o.Size ?? 0, modifiedMs: o.LastModified?.getTime() };
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  private async head(key: string): Promise<{ size: number; modifiedMs: number | undefined; retainUntilMs: number | undefined } | undefined> {
    try {
      const head = await this.client.send(new HeadObjectCommand({ Bucket: this.where.bucket, Key: key }));
      return { size: head.ContentLength ?? 0, modifiedMs: head.LastModified?.getTime(), retainUntilMs: head.ObjectLockRetainUntilDate?.getTime() };
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw this.explain(`HEAD ${key.slice(this.base.length)}`, error);
    }
  }

  async stat(kind: FileKind, name: string): Promise<number | undefined> {
    return (await this.head(this.key(kind, name)))?.size;
  }

  /**
   * Deletes the file. In an Object Lock repository: refuses while any version of it is under
   * retention, and then deletes every version (a plain DELETE would only hide it, keeping the bytes).
   */
  async remove(kind: FileKind, name: string): Promise<void> {
    const key = this.key(kind, name);
    const lock = await this.objectLock();
    if (!lock) {
      await this.call(`DELETE ${kind}/${name}`, () => this.client.send(new DeleteObjectCommand({ Bucket: this.where.bucket, Key: key })));
      return;
    }
    const versions = await this.versions(key);
    if (!UNLOCKED_KINDS.includes(kind)) {
      const until = await this.retainedUntil(kind, name);
      if (until !== undefined && until > this.now()) {
        throw new ObjectLockedError(
          `${kind}/${name} is under Object Lock (${lock.mode}) until ${new Date(until).toISOString()}: it can be removed after that (the repository keeps every object ${formatSeconds(lock.seconds)} after the last backup that used it)`,
        );
      }
    }
    for (const v of versions) {
      await this.call(`DELETE ${kind}/${name} version ${v.versionId}`, () => this.client.send(new DeleteObjectCommand({ Bucket: this.where.bucket, Key: key, VersionId: v.versionId })));
    }
  }

  /** The latest retain-until date of any version of the file (undefined: none, or no such file). */
  async retainedUntil(kind: FileKind, name: string): Promise<number | undefined> {
    if (!(await this.objectLock())) return undefined;
    const key = this.key(kind, name);
    let until: number | undefined;
    for (const v of await this.versions(key)) {
      if (v.deleteMarker) continue;
      const head = await this.call(`HEAD ${kind}/${name}`, () => this.client.send(new HeadObjectCommand({ Bucket: this.where.bucket, Key: key, VersionId: v.versionId })));
      const t = head.ObjectLockRetainUntilDate?.getTime();
      if (t !== undefined && (until === undefined || t > until)) until = t;
    }
    return until;
  }

  /**
   * Extends the retention of the files' current versions to the repository's period from now
   * (never shortens it: S3 refuses that for COMPLIANCE and we never ask). No-op without Object Lock.
   */
  async extendRetention(files: { kind: FileKind; name: string }[], concurrency = 8): Promise<number> {
    const lock = await this.objectLock();
    if (!lock) return 0;
    const until = new Date(this.now() + lock.seconds * 1000);
    const mode = lock.mode === 'compliance' ? 'COMPLIANCE' : 'GOVERNANCE';
    let next = 0;
    let extended = 0;
    const worker = async (): Promise<void> => {
      while (next < files.length) {
        const f = files[next++]!;
        if (UNLOCKED_KINDS.includes(f.kind)) continue;
        await this.call(`extend retention of ${f.kind}/${f.name}`, () =>
          this.client.send(new PutObjectRetentionCommand({ Bucket: this.where.bucket, Key: this.key(f.kind, f.name), Retention: { Mode: mode, RetainUntilDate: until } })),
        );
        extended++;
      }
    };
    await Promise.all(Array.from({ length: Math.min(concurrency, files.length) }, worker));
    return extended;
  }

  private async versions(key: string): Promise<{ versionId: string; deleteMarker: boolean; isLatest: boolean; size: number; modifiedMs: number | undefined }[]> {
    const out: { versionId: string; deleteMarker: boolean; isLatest: boolean; size: number; modifiedMs: number | undefined }[] = [];
    for await (const v of this.allVersions(key)) if (v.key === key) out.push(v);
    return out;
  }

  private async *allVersions(prefix: string): AsyncGenerator<{ key: string; versionId: string; deleteMarker: boolean; isLatest: boolean; size: number; modifiedMs: number | undefined; etag: string | undefined }> {
    let keyMarker: string | undefined;
    let versionMarker: string | undefined;
    for (;;) {
      const page = await this.call(`list versions of ${prefix.slice(this.base.length) || '/'}`, () =>
        this.client.send(
          new ListObjectVersionsCommand({
            Bucket: this.where.bucket,
            Prefix: prefix,
            ...(keyMarker !== undefined ? { KeyMarker: keyMarker } : {}),
            ...(versionMarker !== undefined ? { VersionIdMarker: versionMarker } : {}),
          }),
        ),
      );
      for (const v of page.Versions ?? []) {
        if (v.Key === undefined) continue;
        yield { key: v.Key, versionId: v.VersionId ?? 'null', deleteMarker: false, isLatest: v.IsLatest ?? false, size: v.Size ?? 0, modifiedMs: v.LastModified?.getTime(), etag: v.ETag };
      }
      for (const m of page.DeleteMarkers ?? []) {
        if (m.Key === undefined) continue;
        yield { key: m.Key, versionId: m.VersionId ?? 'null', deleteMarker: true, isLatest: m.IsLatest ?? false, size: 0, modifiedMs: m.LastModified?.getTime(), etag: undefined };
      }
      if (!page.IsTruncated) return;
      keyMarker = page.NextKeyMarker;
      versionMarker = page.NextVersionIdMarker;
    }
  }

  /**
   * Repository objects (not locks or state) whose newest version is a delete marker, or whose
   * newest version is not the one first written (an overwrite): hidden or replaced, data still kept.
   */
  async listHidden(): Promise<HiddenObject[]> {
    const byKey = new Map<string, { versionId: string; deleteMarker: boolean; isLatest: boolean; size: number; modifiedMs: number | undefined; etag: string | undefined }[]>();
    for await (const v of this.allVersions(this.base)) {
      const kind = v.key.slice(this.base.length).split('/')[0] as FileKind;
      if (!KINDS.includes(kind) || UNLOCKED_KINDS.includes(kind)) continue;
      const list = byKey.get(v.key) ?? [];
      list.push(v);
      byKey.set(v.key, list);
    }
    const hidden: HiddenObject[] = [];
    for (const [key, versions] of byKey) {
      const latest = versions.find((v) => v.isLatest);
      // S3 lists a key's versions newest first: the last one is the one first written (times
      // have whole seconds, so they cannot order two writes in the same second).
      const data = versions.filter((v) => !v.deleteMarker);
      const first = data[data.length - 1];
      if (!first) continue;
      const replaced = latest !== undefined && !latest.deleteMarker && latest.etag !== first.etag;
      if (latest?.deleteMarker || replaced) {
        hidden.push({ key: key.slice(this.base.length), versionId: first.versionId, size: first.size, deletedMs: latest?.modifiedMs });
      }
    }
    return hidden.sort((a, b) => a.key.localeCompare(b.key));
  }

  /**
   * Brings back what `listHidden` shows: the delete markers above the data are deleted, and an
   * object whose newest version was replaced gets its first version copied back on top. Needs the
   * bucket owner's rights (s3:DeleteObjectVersion); returns how many objects came back.
   */
  async undelete(): Promise<number> {
    let restored = 0;
    for (const h of await this.listHidden()) {
      const key = `${this.base}${h.key}`;
      const versions = await this.versions(key);
      const latest = versions.find((v) => v.isLatest);
      if (latest?.deleteMarker) {
        for (const m of versions.filter((v) => v.deleteMarker)) {
          await this.call(`remove delete marker of ${h.key}`, () => this.client.send(new DeleteObjectCommand({ Bucket: this.where.bucket, Key: key, VersionId: m.versionId })));
        }
      }
      const now = (await this.versions(key)).find((v) => v.isLatest);
      if (now?.versionId !== h.versionId) {
        // The copy keeps the original's retention (an undelete neither shortens nor extends it).
        const original = await this.call(`HEAD ${h.key}`, () => this.client.send(new HeadObjectCommand({ Bucket: this.where.bucket, Key: key, VersionId: h.versionId })));
        const until = original.ObjectLockRetainUntilDate;
        const headers = original.ObjectLockMode && until && until.getTime() > this.now() ? { ObjectLockMode: original.ObjectLockMode, ObjectLockRetainUntilDate: until } : {};
        await this.call(`copy back ${h.key}`, () =>
          this.client.send(
            new CopyObjectCommand({
              Bucket: this.where.bucket,
              Key: key,
              CopySource: `${this.where.bucket}/${encodeURIComponent(key).replace(/%2F/g, '/')}?versionId=${encodeURIComponent(h.versionId)}`,
              ...headers,
            }),
          ),
        );
      }
      restored++;
    }
    return restored;
  }

  /** Multipart uploads a killed process left under the prefix (never visible as files). */
  async listTemporary(): Promise<TemporaryFile[]> {
    const out: TemporaryFile[] = [];
    let keyMarker: string | undefined;
    let uploadMarker: string | undefined;
    for (;;) {
      const page = await this.call('list multipart uploads', () =>
        this.client.send(
          new ListMultipartUploadsCommand({
            Bucket: this.where.bucket,
            Prefix: this.base,
            ...(keyMarker !== undefined ? { KeyMarker: keyMarker } : {}),
            ...(uploadMarker !== undefined ? { UploadIdMarker: uploadMarker } : {}),
          }),
        ),
      );
      for (const u of page.Uploads ?? []) {
        if (u.Key === undefined || u.UploadId === undefined) continue;
        const kind = u.Key.slice(this.base.length).split('/')[0] as FileKind;
        if (!KINDS.includes(kind)) continue;
        out.push({ kind, name: `${u.Key.slice(this.base.length)}?uploadId=${u.UploadId}`, size: 0, modifiedMs: u.Initiated?.getTime() });
      }
      if (!page.IsTruncated) return out;
      keyMarker = page.NextKeyMarker;
      uploadMarker = page.NextUploadIdMarker;
    }
  }

  async removeTemporary(file: TemporaryFile): Promise<void> {
    const match = /^(.*)\?uploadId=(.+)$/.exec(file.name);
    if (!match) throw new Error(`not a temporary file: ${file.name}`);
    await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.where.bucket, Key: `${this.base}${match[1]!}`, UploadId: match[2]! })).catch((error: unknown) => {
      if (!isNotFound(error)) throw this.explain(`abort upload of ${match[1]!}`, error);
    });
  }

  close(): Promise<void> {
    this.client.destroy();
    this.signer?.destroy();
    return Promise.resolve();
  }
}

/** What CaptureHandler throws: the request the SDK built and signed, as a URL and headers. */
class Captured extends Error {
  constructor(readonly request: SignedRequest) {
    super('captured');
  }
}

/** The SDK's request as it would go out (the fields of its HttpRequest we need). */
interface SdkRequest {
  method: string;
  protocol: string;
  hostname: string;
  port?: number | undefined;
  path: string;
  query?: Record<string, string | string[] | null> | undefined;
  headers: Record<string, string>;
}

/**
 * A request handler that sends nothing: it hands the finished request (signing is the SDK's last
 * step before its handler) back to `signedLoad` by throwing it.
 */
class CaptureHandler {
  handle(request: SdkRequest): Promise<never> {
    if (request.method !== 'GET') return Promise.reject(new Error(`a ${request.method} request cannot be captured`));
    const port = request.port === undefined ? '' : `:${request.port}`;
    const query = buildQuery(request.query ?? {});
    const url = `${request.protocol}//${request.hostname}${port}${request.path}${query === '' ? '' : `?${query}`}`;
    return Promise.reject(new Captured({ url, headers: { ...request.headers } }));
  }

  updateHttpClientConfig(): void {}

  httpHandlerConfigs(): Record<string, never> {
    return {};
  }

  destroy(): void {}
}

/** RFC 3986 escaping, as the SDK's query strings (its signature covers the query it escaped so). */
function escapeUri(text: string): string {
  return encodeURIComponent(text).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

function buildQuery(query: Record<string, string | string[] | null>): string {
  const parts: string[] = [];
  for (const key of Object.keys(query).sort()) {
    const value = query[key];
    if (Array.isArray(value)) for (const v of value) parts.push(`${escapeUri(key)}=${escapeUri(v)}`);
    else parts.push(value === null || value === undefined ? escapeUri(key) : `${escapeUri(key)}=${escapeUri(value)}`);
  }
  return parts.join('&');
}

const SHA256_HEX = /^[0-9a-f]{64}$/;

/**
 * Makes `command` send `sha256` as its signed payload hash (x-amz-content-sha256): the signer then
 * uses it instead of hashing the body, and the server refuses a body that does not match it.
 */
function withPayloadHash(command: PutObjectCommand, sha256: string): void {
  command.middlewareStack.add(
    (next) => async (args) => {
      const request = args.request as { headers?: Record<string, string> };
      if (request.headers) request.headers['x-amz-content-sha256'] = sha256;
      return next(args);
    },
    { step: 'build', name: 'cvatBackupPayloadHash' },
  );
}

function md5(body: Buffer): string {
  return createHash('md5').update(body).digest('base64');
}

/** The parts regrouped into bodies of `size` bytes (the last shorter), copying only where parts straddle. */
function* slices(parts: Buffer[], size: number): Generator<Buffer> {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  for (let part of parts) {
    while (part.length > 0) {
      const take = Math.min(size - pendingBytes, part.length);
      pending.push(part.subarray(0, take));
      pendingBytes += take;
      part = part.subarray(take);
      if (pendingBytes === size) {
        yield pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes);
        pending = [];
        pendingBytes = 0;
      }
    }
  }
  if (pendingBytes > 0) yield pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes);
}

function parseLockMetadata(value: string | undefined): ObjectLockSettings | undefined {
  const match = /^(governance|compliance) (\d+)$/.exec(value ?? '');
  return match ? { mode: match[1] as ObjectLockSettings['mode'], seconds: Number(match[2]) } : undefined;
}

function formatSeconds(seconds: number): string {
  if (seconds % 86_400 === 0) return `${seconds / 86_400} days`;
  return `${seconds} s`;
}

/**
 * A GET's body as one Buffer: copied as it arrives into one buffer of the announced length (a pack
 * read is megabytes: no list of pieces joined at the end). A body that ends early comes back
 * shorter (retry.ts tells a short read by the file's size); one that fails mid-way throws.
 */
async function collectBody(body: { transformToByteArray(): Promise<Uint8Array> }, length: number | undefined): Promise<Buffer> {
  if (!(body instanceof Readable) || length === undefined || !Number.isSafeInteger(length) || length < 0) {
    const bytes = await body.transformToByteArray();
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  const out = Buffer.allocUnsafe(length);
  let at = 0;
  for await (const chunk of body as AsyncIterable<Buffer>) {
    if (at + chunk.length > length) throw Object.assign(new Error(`the server sent more than the ${length} bytes it announced`), { code: 'EIO' });
    chunk.copy(out, at);
    at += chunk.length;
  }
  return at === length ? out : out.subarray(0, at);
}
