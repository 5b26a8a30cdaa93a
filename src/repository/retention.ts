/**
 * Retention policy with restic's semantics (`restic forget --keep-*`):
 * - keep-last n: the n most recent snapshots;
 * - keep-hourly/daily/weekly/monthly/yearly n: for the last n hours (days, ISO weeks, months,
 *   years) that have snapshots, the most recent snapshot of each;
 * - a snapshot is kept if any rule keeps it; rules apply per project. Times are local time, as in
 *   restic. Pure function of the snapshot times: testable without a clock.
 */
export interface RetentionPolicy {
  last?: number;
  hourly?: number;
  daily?: number;
  weekly?: number;
  monthly?: number;
  yearly?: number;
}

export interface Decision<T> {
  keep: { snapshot: T; reasons: string[] }[];
  remove: T[];
}

function isoWeek(d: Date): string {
  // ISO 8601: weeks start on Monday; week 1 holds the year's first Thursday.
  const date = new Date(Date.UTC(d.getFullYear(), d.getMonth(), d.getDate()));
  const dayNumber = date.getUTCDay() || 7;
  date.setUTCDate(date.getUTCDate() + 4 - dayNumber);
  const yearStart = Date.UTC(date.getUTCFullYear(), 0, 1);
  const week = Math.ceil(((date.getTime() - yearStart) / 86400000 + 1) / 7);
  return `${date.getUTCFullYear()}-W${week}`;
}

const BUCKETS: { rule: keyof RetentionPolicy; key: (d: Date) => string }[] = [
  { rule: 'last', key: () => '' },
  { rule: 'hourly', key: (d) => `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}-${d.getHours()}` },
  { rule: 'daily', key: (d) => `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}` },
  { rule: 'weekly', key: isoWeek },
  { rule: 'monthly', key: (d) => `${d.getFullYear()}-${d.getMonth()}` },
  { rule: 'yearly', key: (d) => `${d.getFullYear()}` },
];

export function isEmptyPolicy(policy: RetentionPolicy): boolean {
  return Object.values(policy).every((v) => v === undefined || v === 0);
}

export function applyRetention<T extends { time: string; project: string }>(snapshots: T[], policy: RetentionPolicy): Decision<T> {
  const byProject = new Map<string, T[]>();
  for (const s of snapshots) byProject.set(s.project, [...(byProject.get(s.project) ?? []), s]);
  const keep: Decision<T>['keep'] = [];
  const remove: T[] = [];
  for (const group of byProject.values()) {
    const newestFirst = [...group].sort((a, b) => b.time.localeCompare(a.time));
    const reasons = new Map<T, string[]>();
    for (const { rule, key } of BUCKETS) {
      const count = policy[rule];
      if (!count) continue;
      let kept = 0;
      let lastBucket: string | undefined;
      for (const s of newestFirst) {
        if (kept >= count) break;
        const bucket = key(new Date(s.time));
        if (rule !== 'last' && bucket === lastBucket) continue;
        lastBucket = bucket;
        kept++;
        reasons.set(s, [...(reasons.get(s) ?? []), rule]);
      }
    }
    for (const s of newestFirst) {
      const why = reasons.get(s);
      if (why) keep.push({ snapshot: s, reasons: why });
      else remove.push(s);
    }
  }
  return { keep, remove };
}
