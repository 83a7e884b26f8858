// The job's log in a terminal (xterm.js): ANSI colours and carriage-return progress bars work
// as in a real terminal. stdout is shown as is, stderr tinted red and the system's own lines
// (pull, build, timeouts, cuts) cyan. The terminal grows with its log up to `maxRows`, then
// scrolls; it is opened only once it has a size (xterm measures its font when it opens).
import { FitAddon } from '@xterm/addon-fit';
import { Terminal } from '@xterm/xterm';

import { element } from './format';
import type { LogRecord } from './source';

/** What a stream switch writes: a reset, then the stream's tint. */
const TINT: Record<LogRecord['s'], string> = {
  out: '\x1b[0m',
  err: '\x1b[0;31m',
  sys: '\x1b[0;36m'
};

const THEME = {
  background: '#1e1e1e',
  foreground: '#d4d4d4',
  cursor: '#1e1e1e', // no visible cursor: nobody types here
  cursorAccent: '#1e1e1e',
  selectionBackground: '#264f78',
  red: '#f07171',
  brightRed: '#ff9a9a',
  cyan: '#4fc1d6',
  brightCyan: '#7fdbeb'
};

/** CSS variable of the page, or `fallback` (outside JupyterLab). */
function cssVariable(node: Element, name: string, fallback: string): string {
  return getComputedStyle(node).getPropertyValue(name).trim() || fallback;
}

export interface TerminalOptions {
  /** Rows the terminal grows to before it scrolls. */
  maxRows?: number;
  /** Lines kept for scrolling back. */
  scrollback?: number;
}

export class LogTerminal {
  /** The terminal's element: hidden until the first byte of log. */
  readonly node: HTMLDivElement;
  private term: Terminal | null = null;
  private readonly fit = new FitAddon();
  private readonly observer: ResizeObserver;
  private stream: LogRecord['s'] | null = null;
  /**
   * The log's last line break, held back until more text comes: the cursor then stays at the
   * end of the last line, and the terminal has no empty row at its bottom.
   */
  private heldBreak = false;
  /** Text written before the terminal could open. */
  private waiting = '';
  private readonly maxRows: number;
  private readonly scrollback: number;
  private disposed = false;

  constructor(options: TerminalOptions = {}) {
    this.maxRows = options.maxRows ?? 20;
    this.scrollback = options.scrollback ?? 20_000;
    this.node = element('div', 'jcq-terminal');
    this.node.hidden = true;
    this.observer = new ResizeObserver(() => this.layout());
    this.observer.observe(this.node);
  }

  /** Writes log records, tinting each stream. */
  write(records: LogRecord[]): void {
    let text = this.heldBreak ? '\r\n' : '';
    for (const record of records) {
      if (record.s !== this.stream) {
        text += TINT[record.s] ?? TINT.out;
        this.stream = record.s;
      }
      // A log's lines end in "\n"; a terminal needs "\r\n" to go back to the first column.
      text += record.d.replace(/\r?\n/g, '\r\n');
    }
    this.heldBreak = text.endsWith('\r\n');
    if (this.heldBreak) {
      text = text.slice(0, -2);
    }
    if (text === '') {
      return;
    }
    this.node.hidden = false;
    if (this.term) {
      this.term.write(text, () => this.grow());
    } else {
      this.waiting += text;
      this.layout();
    }
  }

  /** Empties the terminal (a new run). */
  clear(): void {
    this.stream = null;
    this.heldBreak = false;
    this.waiting = '';
    this.term?.reset();
    this.term?.resize(this.term.cols, 1);
    this.node.hidden = true;
  }

  /** The terminal's text (for tests and copying), lines joined with "\n". */
  text(): string {
    const buffer = this.term?.buffer.active;
    if (!buffer) {
      return this.waiting.replace(/\x1b\[[0-9;]*m/g, '').replace(/\r\n/g, '\n');
    }
    const lines: string[] = [];
    for (let i = 0; i < buffer.length; i += 1) {
      lines.push(buffer.getLine(i)?.translateToString(true) ?? '');
    }
    return lines.join('\n').replace(/\n+$/, '');
  }

  dispose(): void {
    this.disposed = true;
    this.observer.disconnect();
    this.term?.dispose();
    this.term = null;
  }

  /** Opens the terminal once it has a width, and fits its columns to it. */
  private layout(): void {
    if (this.disposed || this.node.hidden || !this.node.isConnected) {
      return;
    }
    if (this.node.clientWidth === 0) {
      return;
    }
    if (!this.term) {
      this.open();
    }
    this.fitColumns();
  }

  private open(): void {
    const term = new Terminal({
      convertEol: false,
      disableStdin: true,
      cursorBlink: false,
      cursorStyle: 'bar',
      cursorInactiveStyle: 'none',
      rows: 1,
      cols: 80,
      scrollback: this.scrollback,
      fontFamily: cssVariable(
        this.node,
        '--jp-code-font-family',
        "Menlo, Consolas, 'DejaVu Sans Mono', monospace"
      ),
      fontSize: parseFloat(cssVariable(this.node, '--jp-code-font-size', '13px')) || 13,
      lineHeight: 1.15,
      theme: THEME,
      allowProposedApi: false
    });
    term.loadAddon(this.fit);
    term.open(this.node);
    this.term = term;
    const text = this.waiting;
    this.waiting = '';
    this.fitColumns();
    if (text) {
      term.write(text, () => this.grow());
    }
  }

  private fitColumns(): void {
    const term = this.term;
    const proposed = term && this.fit.proposeDimensions();
    if (term && proposed && Number.isFinite(proposed.cols)) {
      const cols = Math.max(20, proposed.cols);
      if (cols !== term.cols) {
        term.resize(cols, term.rows);
        this.grow();
      }
    }
  }

  /** As many rows as the log has lines, up to maxRows. */
  private grow(): void {
    const term = this.term;
    if (!term || this.disposed) {
      return;
    }
    const buffer = term.buffer.active;
    // Lines in use: up to the cursor's (which ends the last line: the break is held back).
    const used = buffer.baseY + buffer.cursorY + 1;
    const rows = Math.min(this.maxRows, Math.max(1, used));
    if (rows !== term.rows) {
      term.resize(term.cols, rows);
    }
  }
}
