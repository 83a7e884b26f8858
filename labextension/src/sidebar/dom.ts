// Small DOM and formatting helpers of the sidebar. Every text goes in as textContent: job data
// is never parsed as HTML.

// One element helper and one byte format for the whole front end (format.ts).
export { element as el, formatBytes as size } from '../format';

function seconds(total: number): string {
  const s = Math.max(0, Math.round(total));
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${s % 60}s`;
  }
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

/** How long ago an ISO time was, e.g. "3m 10s ago". */
export function age(iso: string): string {
  return `${seconds((Date.now() - Date.parse(iso)) / 1000)} ago`;
}

/** The time from `start` to `end` (or now). */
export function duration(start: string, end: string | null): string {
  const until = end ? Date.parse(end) : Date.now();
  return seconds((until - Date.parse(start)) / 1000);
}
