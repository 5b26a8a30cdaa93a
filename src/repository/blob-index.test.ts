import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { BlobIndex, type BlobLocation } from './blob-index.js';

const id = (n: number): string => createHash('sha256').update(String(n)).digest('hex');

void describe('BlobIndex (property test against a Map)', () => {
  void it('agrees with a Map through inserts, overwrites, deletes, growth and re-inserts', () => {
    const index = new BlobIndex(16);
    const reference = new Map<string, BlobLocation>();
    let seed = 7;
    const random = (): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed;
    };
    for (let step = 0; step < 60000; step++) {
      const key = id(random() % 20000);
      const op = random() % 10;
      if (op < 6) {
        const where: BlobLocation = { pack: `pack${random() % 50}`, type: random() % 2 ? 'tree' : 'data', offset: random(), length: random() % 1e7, rawLength: random() % 1e7 };
        index.set(key, where);
        reference.set(key, where);
      } else if (op < 8) {
        assert.equal(index.delete(key), reference.delete(key));
      } else {
        assert.deepEqual(index.get(key), reference.get(key));
        assert.equal(index.has(key), reference.has(key));
      }
    }
    assert.equal(index.size, reference.size);
    const all = new Map(index.entries());
    assert.equal(all.size, reference.size);
    for (const [key, where] of reference) assert.deepEqual(all.get(key), where);
  });

  void it('keeps every entry through mass deletes (prune) and the rebuilds and compactions they cause', () => {
    const index = new BlobIndex();
    const where = (n: number): BlobLocation => ({ pack: `pack${n % 7}`, type: n % 3 ? 'data' : 'tree', offset: n, length: n * 2, rawLength: n * 3 });
    for (let n = 0; n < 150_000; n++) index.set(id(n), where(n));
    for (let n = 0; n < 150_000; n++) if (n % 4 !== 0) index.delete(id(n));
    for (let n = 150_000; n < 230_000; n++) index.set(id(n), where(n));
    assert.equal(index.size, 150_000 / 4 + 80_000);
    for (let n = 0; n < 230_000; n++) {
      const alive = n >= 150_000 || n % 4 === 0;
      assert.deepEqual(index.get(id(n)), alive ? where(n) : undefined, String(n));
    }
    assert.equal([...index.keys()].length, index.size);
  });

  void it('refuses what is not a SHA-256 id, and never finds it', () => {
    const index = new BlobIndex();
    assert.throws(() => index.set('zero:100', { pack: 'p', type: 'data', offset: 0, length: 1, rawLength: 1 }));
    assert.equal(index.get('not-an-id'), undefined);
    assert.equal(index.has(id(1).slice(0, 63)), false);
  });
});
