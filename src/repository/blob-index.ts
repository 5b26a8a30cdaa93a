/**
 * The in-memory index of blob locations: blob id (SHA-256) → pack, offset, lengths, type.
 *
 * A backup of a million small files holds a million entries, so the layout is what bounds memory.
 * Entries live in flat typed arrays, appended in pages of 65536 (32 id bytes and 17 bytes of
 * location each, no JavaScript object per blob: a Map of hex strings to objects costs about 3× the
 * bytes and gives the garbage collector a million objects to walk). The hash table is only a
 * Uint32Array of entry numbers, open addressing at most half full: ids are SHA-256 digests, so
 * their first four bytes are already a uniform hash; collisions probe linearly. Growing rebuilds
 * only that table (4 bytes a slot), never copies the entries: a million blobs take about 60 MB,
 * where slots holding whole entries took 105 MB, and 157 MB while they grew. Pack ids are interned
 * once each. Deletion (prune only) leaves a tombstone in the table and a dead entry, dropped when
 * the table is rebuilt with more dead entries than live ones.
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
const ID_WORDS = ID_BYTES / 4;
const PAGE_BITS = 16;
const PAGE = 1 << PAGE_BITS;
const PAGE_MASK = PAGE - 1;
/** Table slots: 0 empty, DELETED a tombstone, else entry number + 1. */
const EMPTY = 0;
const DELETED = 0xffffffff;
const TYPES: BlobType[] = ['data', 'tree'];
/** `types` of an entry that was deleted. */
const DEAD = 0xff;

/** PAGE entries, field by field. */
class Page {
  readonly ids = new Uint8Array(PAGE * ID_BYTES);
  readonly ids32 = new Uint32Array(this.ids.buffer);
  readonly packNo = new Uint32Array(PAGE);
  readonly offsets = new Uint32Array(PAGE);
  readonly lengths = new Uint32Array(PAGE);
  readonly rawLengths = new Uint32Array(PAGE);
  readonly types = new Uint8Array(PAGE);
}

export class BlobIndex {
  private slots: Uint32Array;
  private pages: Page[] = [];
  /** Entries appended so far (live and dead). */
  private entryCount = 0;
  private count = 0;
  private tombstones = 0;
  private readonly packs: string[] = [];
  private readonly packNumbers = new Map<string, number>();
  /** Scratch space for the id being looked up (4-byte aligned for 32-bit compares). */
  private readonly key = Buffer.alloc(ID_BYTES);
  private readonly key32 = new Uint32Array(this.key.buffer, this.key.byteOffset, ID_WORDS);

  constructor(initialCapacity = 1 << 12) {
    this.slots = new Uint32Array(1 << Math.max(4, Math.ceil(Math.log2(initialCapacity * 2))));
  }

  get size(): number {
    return this.count;
  }

  /** Loads `id` into the scratch key; false when it is not a SHA-256 hex id. */
  private load(id: string): boolean {
    return id.length === ID_BYTES * 2 && this.key.write(id, 'hex') === ID_BYTES;
  }

  /** Table slot holding the scratch key, or -1; `free` receives the first reusable slot on the way. */
  private find(): { slot: number; free: number } {
    const mask = this.slots.length - 1;
    let slot = this.key32[0]! & mask;
    let free = -1;
    for (;;) {
      const value = this.slots[slot]!;
      if (value === EMPTY) return { slot: -1, free: free === -1 ? slot : free };
      if (value === DELETED) {
        if (free === -1) free = slot;
      } else if (this.matches(value - 1)) {
        return { slot, free };
      }
      slot = (slot + 1) & mask;
    }
  }

  private matches(entry: number): boolean {
    const ids32 = this.pages[entry >>> PAGE_BITS]!.ids32;
    const base = (entry & PAGE_MASK) * ID_WORDS;
    for (let i = 0; i < ID_WORDS; i++) if (ids32[base + i] !== this.key32[i]) return false;
    return true;
  }

  has(id: string): boolean {
    return this.load(id) && this.find().slot !== -1;
  }

  get(id: string): BlobLocation | undefined {
    if (!this.load(id)) return undefined;
    const { slot } = this.find();
    return slot === -1 ? undefined : this.locationOf(this.slots[slot]! - 1);
  }

  private locationOf(entry: number): BlobLocation {
    const page = this.pages[entry >>> PAGE_BITS]!;
    const at = entry & PAGE_MASK;
    return {
      pack: this.packs[page.packNo[at]!]!,
      type: TYPES[page.types[at]!]!,
      offset: page.offsets[at]!,
      length: page.lengths[at]!,
      rawLength: page.rawLengths[at]!,
    };
  }

  set(id: string, where: BlobLocation): void {
    if (!this.load(id)) throw new Error(`not a blob id: ${id.slice(0, 16)}`);
    if ((this.count + this.tombstones + 1) * 2 > this.slots.length) {
      this.rebuild();
      this.load(id);
    }
    const found = this.find();
    let entry: number;
    if (found.slot !== -1) {
      entry = this.slots[found.slot]! - 1;
    } else {
      entry = this.append();
      this.pages[entry >>> PAGE_BITS]!.ids.set(this.key, (entry & PAGE_MASK) * ID_BYTES);
      if (this.slots[found.free] === DELETED) this.tombstones--;
      this.slots[found.free] = entry + 1;
      this.count++;
    }
    let pack = this.packNumbers.get(where.pack);
    if (pack === undefined) {
      pack = this.packs.length;
      this.packs.push(where.pack);
      this.packNumbers.set(where.pack, pack);
    }
    const page = this.pages[entry >>> PAGE_BITS]!;
    const at = entry & PAGE_MASK;
    page.packNo[at] = pack;
    page.types[at] = TYPES.indexOf(where.type);
    page.offsets[at] = where.offset;
    page.lengths[at] = where.length;
    page.rawLengths[at] = where.rawLength;
  }

  /** A new entry number (its page allocated when it is the first of one). */
  private append(): number {
    const entry = this.entryCount++;
    if ((entry & PAGE_MASK) === 0) this.pages.push(new Page());
    return entry;
  }

  delete(id: string): boolean {
    if (!this.load(id)) return false;
    const { slot } = this.find();
    if (slot === -1) return false;
    const entry = this.slots[slot]! - 1;
    this.pages[entry >>> PAGE_BITS]!.types[entry & PAGE_MASK] = DEAD;
    this.slots[slot] = DELETED;
    this.count--;
    this.tombstones++;
    return true;
  }

  /**
   * A new table: twice as large when live entries fill half of it, else the same size without its
   * tombstones. Entries stay where they are, unless more of them are dead than alive: then they are
   * packed together first.
   */
  private rebuild(): void {
    if (this.entryCount - this.count > this.count) this.compact();
    const capacity = (this.count + 1) * 4 > this.slots.length ? this.slots.length * 2 : this.slots.length;
    this.slots = new Uint32Array(capacity);
    this.tombstones = 0;
    const mask = capacity - 1;
    for (let entry = 0; entry < this.entryCount; entry++) {
      const page = this.pages[entry >>> PAGE_BITS]!;
      const at = entry & PAGE_MASK;
      if (page.types[at] === DEAD) continue;
      let slot = page.ids32[at * ID_WORDS]! & mask;
      while (this.slots[slot] !== EMPTY) slot = (slot + 1) & mask;
      this.slots[slot] = entry + 1;
    }
  }

  /** Moves the live entries to the front, in order, and frees the pages left empty. */
  private compact(): void {
    let to = 0;
    for (let from = 0; from < this.entryCount; from++) {
      const source = this.pages[from >>> PAGE_BITS]!;
      const a = from & PAGE_MASK;
      if (source.types[a] === DEAD) continue;
      if (to !== from) {
        const target = this.pages[to >>> PAGE_BITS]!;
        const b = to & PAGE_MASK;
        target.ids.set(source.ids.subarray(a * ID_BYTES, (a + 1) * ID_BYTES), b * ID_BYTES);
        target.packNo[b] = source.packNo[a]!;
        target.offsets[b] = source.offsets[a]!;
        target.lengths[b] = source.lengths[a]!;
        target.rawLengths[b] = source.rawLengths[a]!;
        target.types[b] = source.types[a]!;
      }
      to++;
    }
    this.entryCount = to;
    this.pages.length = Math.ceil(to / PAGE);
  }

  *entries(): IterableIterator<[string, BlobLocation]> {
    for (let entry = 0; entry < this.entryCount; entry++) {
      const page = this.pages[entry >>> PAGE_BITS]!;
      const at = entry & PAGE_MASK;
      if (page.types[at] === DEAD) continue;
      yield [Buffer.from(page.ids.buffer, at * ID_BYTES, ID_BYTES).toString('hex'), this.locationOf(entry)];
    }
  }

  *keys(): IterableIterator<string> {
    for (const [id] of this.entries()) yield id;
  }
}
