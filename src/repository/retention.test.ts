import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { applyRetention } from './retention.js';

/** Snapshots at local times, so the test holds in any time zone. */
function at(year: number, month: number, day: number, hour = 3, project = 'cvat'): { time: string; project: string; name: string } {
  const d = new Date(year, month - 1, day, hour, 0, 0);
  return { time: d.toISOString(), project, name: `${year}-${month}-${day}T${hour}` };
}

void describe('retention (restic semantics)', () => {
  // Two backups a day (03:00 and 15:00) from 2026-01-01 to 2026-03-31.
  const snapshots: ReturnType<typeof at>[] = [];
  for (let d = new Date(2026, 0, 1); d <= new Date(2026, 2, 31); d.setDate(d.getDate() + 1)) {
    snapshots.push(at(d.getFullYear(), d.getMonth() + 1, d.getDate(), 3), at(d.getFullYear(), d.getMonth() + 1, d.getDate(), 15));
  }

  void it('keep-last keeps the n newest', () => {
    const r = applyRetention(snapshots, { last: 3 });
    assert.deepEqual(r.keep.map((k) => k.snapshot.name), ['2026-3-31T15', '2026-3-31T3', '2026-3-30T15']);
    assert.equal(r.remove.length, snapshots.length - 3);
  });

  void it('keep-daily 7 keep-weekly 4: the newest of each of the last 7 days and of the last 4 ISO weeks', () => {
    const r = applyRetention(snapshots, { daily: 7, weekly: 4 });
    const kept = r.keep.map((k) => k.snapshot.name);
    // 2026-03-31 is a Tuesday: days 25..31, weeks ending Sun 29, 22, 15 plus the current one (31).
    assert.deepEqual(kept, ['2026-3-31T15', '2026-3-30T15', '2026-3-29T15', '2026-3-28T15', '2026-3-27T15', '2026-3-26T15', '2026-3-25T15', '2026-3-22T15', '2026-3-15T15']);
    assert.deepEqual(r.keep.find((k) => k.snapshot.name === '2026-3-29T15')?.reasons, ['daily', 'weekly']);
  });

  void it('keep-monthly and keep-yearly count only periods that have snapshots; projects are separate', () => {
    const r = applyRetention([...snapshots, at(2025, 6, 1, 3, 'other'), at(2025, 7, 1, 3, 'other')], { monthly: 2, yearly: 5 });
    const kept = r.keep.map((k) => `${k.snapshot.project}:${k.snapshot.name}`);
    assert.deepEqual(kept, ['cvat:2026-3-31T15', 'cvat:2026-2-28T15', 'other:2025-7-1T3', 'other:2025-6-1T3']);
  });
});
