/**
 * The in-memory index of blob locations: blob id (SHA-256) → pack, offset, lengths, type.
 *
 * A backup of a million small files holds a million entries, so the layout is what bounds memory:
 * an open-addressing hash table over flat typed arrays — 32 id bytes and 17 bytes of location per
 * slot, no JavaScript object per blob — instead of a Map of hex strings to objects (about 3× the
 * bytes, and a million objects for the garbage collector to walk). Ids are SHA-256 digests, so
 * their first four bytes are already a uniform hash; collisions probe linearly. Pack ids are
 * interned once each. Deletion (prune only) leaves tombstones, cleared when the table grows.
 */
export type BlobType = 'data' | 'tree';

export interface BlobLocation {
  pack: string;
  type: BlobType;
  offset: number;
  length: number;
  rawLength: number;
}

const ID_BYTES = 32;
const EMPTY = 0;
const USED = 1;
const DELETED = 2;
const TYPES: BlobType[] = ['data', 'tree'];

export class BlobIndex {
  private capacity: number;
  private state!: Uint8Array;
  private ids!: Uint8Array;
  private ids32!: Uint32Array;
  private packNo!: Uint32Array;
  private offsets!: Uint32Array;
  private lengths!: Uint32Array;
  private rawLengths!: Uint32Array;
  private types!: Uint8Array;
  private count = 0;
  private tombstones = 0;
  private readonly packs: string[] = [];
  private readonly packNumbers = new Map<string, number>();
  /** Scratch space for the id being looked up (4-byte aligned for 32-bit compares). */
  private readonly key = Buffer.alloc(ID_BYTES);
  private readonly key32 = new Uint32Array(this.key.buffer, this.key.byteOffset, ID_BYTES / 4);

  constructor(initialCapacity = 1 << 12) {
    this.capacity = 1 << Math.max(4, Math.ceil(Math.log2(initialCapacity)));
    this.allocate(this.capacity);
  }

  get size(): number {
    return this.count;
  }

  private allocate(capacity: number): void {
    this.capacity = capacity;
    this.state = new Uint8Array(capacity);
    this.ids = new Uint8Array(capacity * ID_BYTES);
    this.ids32 = new Uint32Array(this.ids.buffer);
    this.packNo = new Uint32Array(capacity);
    this.offsets = new Uint32Array(capacity);
    this.lengths = new Uint32Array(capacity);
    this.rawLengths = new Uint32Array(capacity);
    this.types = new Uint8Array(capacity);
  }

  /** Loads `id` into the scratch key; false when it is not a SHA-256 hex id. */
  private load(id: string): boolean {
    return id.length === ID_BYTES * 2 && this.key.write(id, 'hex') === ID_BYTES;
  }

  /** Slot holding the scratch key, or -1; `free` receives the first reusable slot on the way. */
  private find(): { slot: number; free: number } {
    const mask = this.capacity - 1;
    let slot = this.key32[0]! & mask;
    let free = -1;
    for (;;) {
      const state = this.state[slot]!;
      if (state === EMPTY) return { slot: -1, free: free === -1 ? slot : free };
      if (state === DELETED) {
        if (free === -1) free = slot;
      } else if (this.matches(slot)) {
        return { slot, free };
      }
      slot = (slot + 1) & mask;
    }
  }

  private matches(slot: number): boolean {
    const base = slot * (ID_BYTES / 4);
    for (let i = 0; i < ID_BYTES / 4; i++) if (this.ids32[base + i] !== this.key32[i]) return false;
    return true;
  }

  has(id: string): boolean {
    return this.load(id) && this.find().slot !== -1;
  }

  get(id: string): BlobLocation | undefined {
    if (!this.load(id)) return undefined;
    const { slot } = this.find();
    return slot === -1 ? undefined : this.locationAt(slot);
  }

  private locationAt(slot: number): BlobLocation {
    return {
      pack: this.packs[this.packNo[slot]!]!,
      type: TYPES[this.types[slot]!]!,
      offset: this.offsets[slot]!,
      length: this.lengths[slot]!,
      rawLength: this.rawLengths[slot]!,
    };
  }

  set(id: string, where: BlobLocation): void {
    if (!this.load(id)) throw new Error(`not a blob id: ${id.slice(0, 16)}`);
    if ((this.count + this.tombstones + 1) * 10 > this.capacity * 7) {
      this.grow();
      this.load(id);
    }
    const found = this.find();
    let slot = found.slot;
    if (slot === -1) {
      slot = found.free;
      if (this.state[slot] === DELETED) this.tombstones--;
      this.state[slot] = USED;
      this.ids.set(this.key, slot * ID_BYTES);
      this.count++;
    }
    let pack = this.packNumbers.get(where.pack);
    if (pack === undefined) {
      pack = this.packs.length;
      this.packs.push(where.pack);
      this.packNumbers.set(where.pack, pack);
    }
    this.packNo[slot] = pack;
    this.types[slot] = TYPES.indexOf(where.type);
    this.offsets[slot] = where.offset;
    this.lengths[slot] = where.length;
    this.rawLengths[slot] = where.rawLength;
  }

  delete(id: string): boolean {
    if (!this.load(id)) return false;
    const { slot } = this.find();
    if (slot === -1) return false;
    this.state[slot] = DELETED;
    this.count--;
    this.tombstones++;
    return true;
  }

  private grow(): void {
    const old = { state: this.state, ids: this.ids, packNo: this.packNo, offsets: this.offsets, lengths: this.lengths, rawLengths: this.rawLengths, types: this.types };
    const oldCapacity = this.capacity;
    // Grow when full of live entries; only rehash (clearing tombstones) when they are the cause.
    this.allocate(this.count * 2 > oldCapacity * 0.5 ? oldCapacity * 2 : oldCapacity);
    this.count = 0;
    this.tombstones = 0;
    for (let from = 0; from < oldCapacity; from++) {
      if (old.state[from] !== USED) continue;
      this.key.set(old.ids.subarray(from * ID_BYTES, (from + 1) * ID_BYTES));
      const { free } = this.find();
      this.state[free] = USED;
      this.ids.set(this.key, free * ID_BYTES);
      this.packNo[free] = old.packNo[from]!;
      this.offsets[free] = old.offsets[from]!;
      this.lengths[free] = old.lengths[from]!;
      this.rawLengths[free] = old.rawLengths[from]!;
      this.types[free] = old.types[from]!;
      this.count++;
    }
  }

  *entries(): IterableIterator<[string, BlobLocation]> {
    for (let slot = 0; slot < this.capacity; slot++) {
      if (this.state[slot] !== USED) continue;
      yield [Buffer.from(this.ids.buffer, slot * ID_BYTES, ID_BYTES).toString('hex'), this.locationAt(slot)];
    }
  }

  *keys(): IterableIterator<string> {
    for (const [id] of this.entries()) yield id;
  }
}
