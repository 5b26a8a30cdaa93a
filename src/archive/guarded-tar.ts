/**
 * The tar stream a restore sends to the engine (`PUT /containers/{id}/archive?path=/`), rebuilt
 * from checked members.
 *
 * The engine extracts into the container's root filesystem, not into the volume: a member outside
 * the mount path, or under a symbolic link the archive made, would land in the container (or in
 * another of its volumes), and a hard link could pull in any file of the container. So every member
 * passes MemberGuard, and the stream is not forwarded but written anew from what was checked: one
 * canonical ustar/PAX header per member (name = mount path + checked components, no GNU long-name or
 * global headers, no second reading of a name the engine could parse differently), then its data.
 * Devices, FIFOs and unknown types are left out (`skipped` names them). Sparse members of any GNU
 * flavour become GNU sparse 1.0 with a checked map (the engine writes them dense). Extended
 * attributes (`SCHILY.xattr.*` records) are carried over; everything else a header held is
 * dropped.
 *
 * Input: TarItem objects (TarProcessor with `output: 'entries'`). Output: bytes.
 */
import { Transform, type TransformCallback } from 'node:stream';
import { CorruptArchiveError } from '../errors.js';
import { encodeHeader, encodeSparseMember, pad, paxRecord } from './host-tar.js';
import { MemberGuard } from './member-guard.js';
import { SparseReader } from './sparse.js';
import type { TarEntry, TarItem } from './tar.js';

const SLASH = Buffer.from('/');

interface Current {
  entry: TarEntry;
  /** Data of the member still to come from the input. */
  remaining: number;
  /** Left out: its data is dropped. */
  dropped: boolean;
  sparse: SparseReader | undefined;
  /** Sparse 1.0: the header waits for the map. */
  headerPending: boolean;
  /** Bytes of data this member takes in the output (for the padding). */
  outputSize: number;
  name: Buffer;
}

function xattrRecords(entry: TarEntry): Buffer[] {
  const records: Buffer[] = [];
  for (const [key, value] of entry.pax) if (key.startsWith('SCHILY.xattr.')) records.push(paxRecord(key, value));
  return records;
}

export class GuardedTarStream extends Transform {
  readonly skipped: string[] = [];
  private readonly guard: MemberGuard;
  private readonly prefix: Buffer;
  private current: Current | undefined;

  constructor(memberPrefix: string) {
    super({ writableObjectMode: true, readableHighWaterMark: 1 << 20, writableHighWaterMark: 64 });
    this.guard = new MemberGuard(memberPrefix);
    this.prefix = Buffer.from(memberPrefix, 'utf8');
  }

  override _transform(item: TarItem, _encoding: BufferEncoding, callback: TransformCallback): void {
    try {
      if (item.kind === 'entry') this.onEntry(item.entry);
      else this.onData(item.chunk);
      callback();
    } catch (error) {
      callback(error as Error);
    }
  }

  override _flush(callback: TransformCallback): void {
    try {
      this.endMember();
      this.push(Buffer.alloc(1024));
      callback();
    } catch (error) {
      callback(error as Error);
    }
  }

  private memberName(path: Buffer[], folder: boolean): Buffer {
    const parts: Buffer[] = [this.prefix];
    for (const p of path) parts.push(SLASH, p);
    if (folder) parts.push(SLASH);
    const name = Buffer.concat(parts);
    // A prefix of '' (an archive of a root folder) would start with '/': drop it.
    return name[0] === 0x2f ? name.subarray(1) : name;
  }

  private endMember(): void {
    const current = this.current;
    if (!current) return;
    if (current.remaining !== 0) throw new CorruptArchiveError('tar member ended early');
    this.current = undefined;
    if (current.dropped) return;
    current.sparse?.end();
    this.push(pad(current.outputSize));
  }

  private onEntry(entry: TarEntry): void {
    this.endMember();
    const member = this.guard.check(entry);
    const meta = { mode: entry.mode & 0o7777, uid: entry.uid, gid: entry.gid, mtime: entry.mtime };
    const current: Current = { entry, remaining: entry.size, dropped: false, sparse: undefined, headerPending: false, outputSize: 0, name: Buffer.alloc(0) };
    this.current = current;
    switch (member.action) {
      case 'skip':
        current.dropped = true;
        this.skipped.push(`${member.display} (${member.reason})`);
        return;
      case 'root':
      case 'dir': {
        const name = this.memberName(member.action === 'root' ? [] : member.path, true);
        this.push(encodeHeader({ ...meta, name, type: '5', size: 0, pax: xattrRecords(entry) }));
        // A GNU dump folder ('D') carries a list of names as data: not part of the folder.
        current.dropped = true;
        return;
      }
      case 'symlink':
        this.push(encodeHeader({ ...meta, name: this.memberName(member.path, false), type: '2', size: 0, linkName: member.target, pax: xattrRecords(entry) }));
        return;
      case 'hardlink':
        this.push(encodeHeader({ ...meta, name: this.memberName(member.path, false), type: '1', size: 0, linkName: this.memberName(member.target, false) }));
        return;
      case 'file': {
        current.name = this.memberName(member.path, false);
        if (entry.sparse) {
          current.sparse = new SparseReader(entry.sparse, entry.size);
          current.headerPending = true;
          this.sparseHeaderWhenMapKnown(current);
          return;
        }
        current.outputSize = entry.size;
        this.push(encodeHeader({ ...meta, name: current.name, type: '0', size: entry.size, pax: xattrRecords(entry) }));
        return;
      }
    }
  }

  private sparseHeaderWhenMapKnown(current: Current): void {
    const segments = current.sparse?.segments;
    if (!current.headerPending || segments === undefined) return;
    const { entry } = current;
    const sparse = encodeSparseMember(
      { name: current.name, mode: entry.mode & 0o7777, uid: entry.uid, gid: entry.gid, mtime: entry.mtime, realSize: current.sparse!.realSize },
      segments,
    );
    current.headerPending = false;
    // The member's size counts the map, which encodeSparseMember put after the header.
    current.outputSize = sparse.size;
    this.push(sparse.header);
  }

  private onData(chunk: Buffer): void {
    const current = this.current;
    if (!current) throw new CorruptArchiveError('tar data without a member');
    current.remaining -= chunk.length;
    if (current.remaining < 0) throw new CorruptArchiveError('tar member longer than its size');
    if (current.dropped) return;
    if (!current.sparse) {
      this.push(chunk);
      return;
    }
    const pieces = current.sparse.push(chunk);
    this.sparseHeaderWhenMapKnown(current);
    for (const piece of pieces) this.push(piece.data);
  }
}
