// Small DOM and formatting helpers of the sidebar. Every text goes in as textContent: job data
// is never parsed as HTML.

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

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

export function size(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}
