// Small formatting helpers of the job view: sizes, durations, ids, file kinds, DOM building.

/** `1.5 KiB`, `12 MiB`, `980 B`. */
export function formatBytes(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes < 0) {
    return '?';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
  const text = value.toFixed(digits);
  return `${digits > 0 ? text.replace(/\.?0+$/, '') : text} ${units[unit]}`;
}

/** `0:07`, `3:25`, `1:02:09` (hours:minutes:seconds, like a stopwatch). */
export function formatDuration(ms: number): string {
  const total = Math.max(0, Math.floor(ms / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = String(total % 60).padStart(2, '0');
  return hours > 0
    ? `${hours}:${String(minutes).padStart(2, '0')}:${seconds}`
    : `${minutes}:${seconds}`;
}

/** Milliseconds since the epoch of an ISO 8601 time, or null. */
export function parseTime(iso: string | null): number | null {
  if (!iso) {
    return null;
  }
  const ms = Date.parse(iso);
  return Number.isNaN(ms) ? null : ms;
}

/** How a job id is shown: its first 12 hex digits (as the magic and the CLI show it). */
export function shortId(jobId: string): string {
  return jobId.slice(0, 12);
}

/** The last part of a path: the name a download is saved under. */
export function baseName(path: string): string {
  const parts = path.split('/');
  return parts[parts.length - 1] || path;
}

/** The extension of a path, lower case, without the dot ('' when none). */
export function extension(path: string): string {
  const name = baseName(path);
  const dot = name.lastIndexOf('.');
  return dot > 0 ? name.slice(dot + 1).toLowerCase() : '';
}

/** Raster images the view previews with `<img>`, by extension, and their types. */
export const IMAGE_TYPES: Record<string, string> = {
  png: 'image/png',
  jpg: 'image/jpeg',
  jpeg: 'image/jpeg',
  gif: 'image/gif',
  webp: 'image/webp',
  bmp: 'image/bmp'
};

/** Extensions previewed as a table of their first rows, and their separators. */
export const TABLE_SEPARATORS: Record<string, string> = { csv: ',', tsv: '\t' };

/** Extensions previewed as text (never as markup: `.html`, `.svg` are only downloaded). */
export const TEXT_EXTENSIONS = new Set([
  'txt',
  'text',
  'log',
  'out',
  'err',
  'md',
  'rst',
  'json',
  'jsonl',
  'ndjson',
  'yaml',
  'yml',
  'toml',
  'ini',
  'cfg',
  'conf',
  'py',
  'r',
  'jl',
  'sh',
  'js',
  'ts',
  'c',
  'h',
  'cpp',
  'go',
  'rs',
  'java',
  'sql',
  'tex',
  'diff',
  'patch'
]);

/** How an output is previewed: an image, a table, text, or not at all (download only). */
export type PreviewKind = 'image' | 'table' | 'text' | null;

export function previewKind(path: string): PreviewKind {
  const ext = extension(path);
  if (ext in IMAGE_TYPES) {
    return 'image';
  }
  if (ext in TABLE_SEPARATORS) {
    return 'table';
  }
  return TEXT_EXTENSIONS.has(ext) ? 'text' : null;
}

/**
 * The first `maxRows` rows of delimited text (RFC 4180 quoting: `"a,b"`, `""` for a quote).
 * A row cut off at the end of `text` (a partial read) is dropped unless `text` is complete.
 */
export function parseTable(
  text: string,
  separator: string,
  maxRows: number,
  complete: boolean
): { rows: string[][]; more: boolean } {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  let i = 0;
  const endRow = () => {
    row.push(field);
    rows.push(row);
    row = [];
    field = '';
  };
  while (i < text.length && rows.length < maxRows) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i += 1;
      } else if (c === '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c === '"' && field === '') {
      quoted = true;
    } else if (c === separator) {
      row.push(field);
      field = '';
    } else if (c === '\n' || c === '\r') {
      if (c === '\r' && text[i + 1] === '\n') {
        i += 1;
      }
      endRow();
    } else {
      field += c;
    }
    i += 1;
  }
  const rest = i < text.length;
  if (!rest && complete && (field !== '' || row.length > 0) && rows.length < maxRows) {
    endRow();
  }
  return { rows, more: rest || !complete };
}

/** An element with a class, and text (a text node: job data never becomes markup). */
export function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className?: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  if (className) {
    el.className = className;
  }
  if (text !== undefined) {
    el.textContent = text;
  }
  return el;
}

/** A button with a class and label, calling `onClick`. */
export function button(
  className: string,
  label: string,
  onClick: (event: MouseEvent) => void,
  title?: string
): HTMLButtonElement {
  const el = element('button', `jcq-button ${className}`, label);
  el.type = 'button';
  if (title) {
    el.title = title;
  }
  el.addEventListener('click', onClick);
  return el;
}

/** The message of whatever was thrown. */
export function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
