// The outputs of a finished run: each file with its size and a download, all of them as a zip,
// and previews of raster images (`<img>` on a Blob URL) and of text and CSV (text nodes only).
// Nothing from a job is ever parsed as markup: an `.html` or `.svg` output is only downloaded.
import {
  IMAGE_TYPES,
  TABLE_SEPARATORS,
  baseName,
  button,
  element,
  errorText,
  extension,
  formatBytes,
  parseTable,
  previewKind,
  shortId
} from './format';
import type { JobSnapshot, JobSource, OutputRef } from './source';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Largest image previewed. */
export const PREVIEW_IMAGE_BYTES = 10 * MiB;
/** Bytes of a text or CSV file read for its preview (its head). */
export const PREVIEW_TEXT_BYTES = 256 * KiB;
/** Rows of a CSV shown (after its header). */
export const PREVIEW_ROWS = 50;
/** Lines of a text file shown. */
export const PREVIEW_LINES = 200;
/** Largest file (or zip) downloaded through the source (a Blob URL); larger ones use a link. */
export const READ_DOWNLOAD_BYTES = 64 * MiB;
/** Previews loaded at once; the others wait for a click. */
export const AUTO_PREVIEWS = 8;

const decoder = new TextDecoder('utf-8');

/** Starts a download of `data` named `name` (a Blob URL, revoked a minute later). */
function saveBytes(data: Uint8Array, name: string, near: HTMLElement): void {
  const blob = new Blob([data as Uint8Array<ArrayBuffer>], { type: 'application/octet-stream' });
  const url = URL.createObjectURL(blob);
  const link = element('a', 'jcq-hidden-link');
  link.href = url;
  link.download = name;
  link.hidden = true;
  near.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

export class OutputsView {
  /** The section's element: hidden while the run has no outputs. */
  readonly node: HTMLElement;
  private signature = '';
  private objectUrls: string[] = [];
  private generation = 0;

  constructor(private readonly source: JobSource) {
    this.node = element('section', 'jcq-outputs');
    this.node.hidden = true;
  }

  /** Shows the outputs of `snapshot`'s run (rebuilt only when they change). */
  show(snapshot: JobSnapshot): void {
    const outputs = snapshot.state === 'Finished' ? snapshot.outputs ?? {} : {};
    const signature = `${snapshot.jobId}/${snapshot.runId}/${JSON.stringify(outputs)}`;
    if (signature === this.signature) {
      return;
    }
    this.signature = signature;
    this.clear();
    const paths = Object.keys(outputs).sort();
    this.node.hidden = paths.length === 0;
    if (paths.length === 0) {
      return;
    }
    const total = paths.reduce((sum, path) => sum + (outputs[path].size ?? 0), 0);
    const head = element('div', 'jcq-outputs-head');
    const files = paths.length === 1 ? '1 file' : `${paths.length} files`;
    head.append(
      element('span', 'jcq-outputs-title', 'Outputs'),
      element('span', 'jcq-outputs-summary', `${files}, ${formatBytes(total)}`),
      this.zipLink(snapshot, total)
    );
    const list = element('ul', 'jcq-output-list');
    let previews = 0;
    for (const path of paths) {
      const item = this.item(path, outputs[path], previews < AUTO_PREVIEWS);
      if (item.previewed) {
        previews += 1;
      }
      list.appendChild(item.node);
    }
    this.node.append(head, list);
  }

  dispose(): void {
    this.clear();
  }

  private clear(): void {
    this.generation += 1;
    this.objectUrls.forEach(url => URL.revokeObjectURL(url));
    this.objectUrls = [];
    this.node.replaceChildren();
  }

  /** One output: path, size, download, and its preview (now, or on a click). */
  private item(
    path: string,
    ref: OutputRef,
    auto: boolean
  ): { node: HTMLLIElement; previewed: boolean } {
    const node = element('li', 'jcq-output');
    node.dataset.path = path;
    const row = element('div', 'jcq-output-row');
    const name = element('span', 'jcq-output-path', path);
    name.title = path;
    row.append(name, element('span', 'jcq-output-size', formatBytes(ref.size)));
    row.appendChild(this.downloadLink(path, ref));
    node.appendChild(row);

    const kind = previewKind(path);
    const tooBig = kind === 'image' && ref.size > PREVIEW_IMAGE_BYTES;
    if (kind === null || tooBig) {
      const why = tooBig ? 'too large to preview' : 'no preview: download it to open it';
      row.appendChild(element('span', 'jcq-output-note', why));
      return { node, previewed: false };
    }
    const preview = element('div', 'jcq-output-preview');
    node.appendChild(preview);
    if (auto) {
      this.preview(preview, path, ref);
    } else {
      preview.appendChild(
        button('jcq-output-show', 'Preview', () => this.preview(preview, path, ref))
      );
    }
    return { node, previewed: auto };
  }

  private downloadLink(path: string, ref: OutputRef): HTMLAnchorElement {
    const link = element('a', 'jcq-button jcq-output-download', 'Download');
    link.download = baseName(path);
    link.title = `Download ${path} (${formatBytes(ref.size)})`;
    const direct = this.source.outputUrl(path);
    if (ref.size > READ_DOWNLOAD_BYTES) {
      // Too large to pass through the kernel: a plain link, which works when the browser may
      // fetch from the host (the host is this page's own server).
      if (direct) {
        link.href = direct;
      }
      return link;
    }
    link.href = '#';
    link.addEventListener('click', event => {
      event.preventDefault();
      void this.download(link, () => this.source.read(path, ref.size), baseName(path), ref.size);
    });
    return link;
  }

  private zipLink(snapshot: JobSnapshot, total: number): HTMLAnchorElement {
    const name = `${shortId(snapshot.jobId ?? 'job')}-outputs.zip`;
    const link = element('a', 'jcq-button jcq-outputs-zip', 'All as zip');
    link.download = name;
    link.title = 'Download every output as one zip';
    const direct = this.source.zipUrl();
    if (total > READ_DOWNLOAD_BYTES) {
      if (direct) {
        link.href = direct;
      }
      return link;
    }
    link.href = '#';
    link.addEventListener('click', event => {
      event.preventDefault();
      void this.download(link, () => this.source.readZip(READ_DOWNLOAD_BYTES), name, null);
    });
    return link;
  }

  /** Reads a file through the source and saves it; says so on the link while it reads. */
  private async download(
    link: HTMLAnchorElement,
    read: () => Promise<Uint8Array>,
    name: string,
    size: number | null
  ): Promise<void> {
    if (link.dataset.busy) {
      return;
    }
    const label = link.textContent ?? '';
    link.dataset.busy = 'true';
    link.textContent = 'Downloading…';
    link.removeAttribute('data-error');
    try {
      const data = await read();
      if (size !== null && data.length !== size) {
        throw new Error(`received ${data.length} bytes of ${size}`);
      }
      saveBytes(data, name, link.parentElement ?? link);
    } catch (error) {
      link.dataset.error = errorText(error);
      link.title = `Download failed: ${errorText(error)}`;
    } finally {
      delete link.dataset.busy;
      link.textContent = label;
    }
  }

  private preview(into: HTMLElement, path: string, ref: OutputRef): void {
    const generation = this.generation;
    const kind = previewKind(path);
    const limit = kind === 'image' ? ref.size : Math.min(ref.size, PREVIEW_TEXT_BYTES);
    into.replaceChildren(element('span', 'jcq-output-loading', 'Loading the preview…'));
    this.source.read(path, limit).then(
      data => {
        if (generation !== this.generation) {
          return; // the outputs changed meanwhile
        }
        into.replaceChildren();
        const complete = data.length >= ref.size;
        if (kind === 'image') {
          this.image(into, path, data);
        } else if (kind === 'table') {
          this.table(into, data, TABLE_SEPARATORS[extension(path)], complete);
        } else {
          this.text(into, data, ref.size, complete);
        }
      },
      error => {
        if (generation === this.generation) {
          into.replaceChildren(
            element('span', 'jcq-output-note', `no preview: ${errorText(error)}`)
          );
        }
      }
    );
  }

  private image(into: HTMLElement, path: string, data: Uint8Array): void {
    const blob = new Blob([data as Uint8Array<ArrayBuffer>], {
      type: IMAGE_TYPES[extension(path)]
    });
    const url = URL.createObjectURL(blob);
    this.objectUrls.push(url);
    const img = element('img', 'jcq-output-image');
    img.alt = path;
    img.addEventListener('error', () =>
      into.replaceChildren(element('span', 'jcq-output-note', 'not an image this browser shows'))
    );
    img.src = url;
    into.appendChild(img);
  }

  private table(into: HTMLElement, data: Uint8Array, separator: string, complete: boolean): void {
    const text = decoder.decode(data);
    const { rows, more } = parseTable(text, separator, PREVIEW_ROWS + 1, complete);
    if (rows.length === 0) {
      into.appendChild(element('span', 'jcq-output-note', 'empty'));
      return;
    }
    const table = element('table', 'jcq-output-table');
    const thead = element('thead');
    const headRow = element('tr');
    rows[0].forEach(cell => headRow.appendChild(element('th', undefined, cell)));
    thead.appendChild(headRow);
    const tbody = element('tbody');
    for (const row of rows.slice(1)) {
      const tr = element('tr');
      row.forEach(cell => tr.appendChild(element('td', undefined, cell)));
      tbody.appendChild(tr);
    }
    table.append(thead, tbody);
    const scroller = element('div', 'jcq-output-scroll');
    scroller.appendChild(table);
    into.appendChild(scroller);
    if (more) {
      const shown = rows.length - 1;
      into.appendChild(
        element('div', 'jcq-output-note', `the first ${shown} row${shown === 1 ? '' : 's'}`)
      );
    }
  }

  private text(into: HTMLElement, data: Uint8Array, size: number, complete: boolean): void {
    let text = decoder.decode(data);
    if (!complete) {
      const end = text.lastIndexOf('\n');
      text = end > 0 ? text.slice(0, end + 1) : text;
    }
    const lines = text.split('\n');
    const cut = lines.length > PREVIEW_LINES + 1;
    if (cut) {
      text = lines.slice(0, PREVIEW_LINES).join('\n') + '\n';
    }
    into.appendChild(element('pre', 'jcq-output-text', text));
    if (cut || !complete) {
      const shown = cut ? `the first ${PREVIEW_LINES} lines` : 'the start';
      into.appendChild(element('div', 'jcq-output-note', `${shown} of ${formatBytes(size)}`));
    }
  }
}
