// A JobSource fed straight from a queue host: REST under `{baseUrl}compute-queue/` for the
// job and the actions, the queue's websocket `q/{queue}/ws` for live run states and logs
// (docs/openapi.yaml, docs/protocol.md). Used where there is no kernel: the sidebar and the
// job page.
import {
  type Dispose,
  type JobDefinition,
  type JobSnapshot,
  type JobSource,
  type LogListener,
  type LogRecord,
  type Mode,
  type SubmitOptions,
  LogCursor,
  emptySnapshot,
  encodePath
} from './source';

export interface HostOptions {
  /** The Jupyter server's base URL, ending in `/` (absolute, or a path on this origin). */
  baseUrl: string;
  queue: string;
  /** The job to follow; none for an editor that has not submitted yet. */
  jobId?: string | null;
  /** The Jupyter token; without it the browser's login cookie (and `_xsrf`) is used. */
  token?: string;
  /** The server's websocket base URL, ending in `/`; by default `baseUrl` as `ws(s):`. */
  wsUrl?: string;
  fetch?: typeof fetch;
  WebSocket?: typeof WebSocket;
}

/** A run record as the host sends it (the fields the view uses). */
interface RunRecord extends Omit<JobSnapshot, 'jobId' | 'runId' | 'queue' | 'queuedAt'> {
  jobId: string;
  runId: string;
  queue: string;
  queuedAt: string;
}

type HostMessage =
  | { type: 'snapshot'; runs: RunRecord[] }
  | { type: 'run'; run: RunRecord }
  | { type: 'logs'; runId: string; records: LogRecord[]; next: number; done: boolean }
  | { type: 'overflow' | 'worker' | 'pong' | 'error' };

function snapshotOf(run: RunRecord): JobSnapshot {
  const { jobId, runId, queue, state, phase, reason, exitCode, message, outputs } = run;
  const { cached, queuedAt, startedAt, finishedAt } = run;
  return {
    ...{ jobId, runId, queue, state, phase, reason, exitCode, message },
    ...{ outputs: outputs ?? {}, cached: cached ?? null, queuedAt, startedAt, finishedAt }
  };
}

/** Inputs this size or smaller go inline in the definition; larger ones as blobs. */
const INLINE_BYTES = 64 * 1024;

function base64(data: Uint8Array): string {
  let binary = '';
  for (let i = 0; i < data.length; i += 0x8000) {
    binary += String.fromCharCode(...data.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function hex(digest: ArrayBuffer): string {
  return [...new Uint8Array(digest)].map(b => b.toString(16).padStart(2, '0')).join('');
}

/** The first `maxBytes` bytes of a response's body, without reading the rest. */
export async function readHead(response: Response, maxBytes: number): Promise<Uint8Array> {
  const reader = response.body?.getReader();
  if (!reader) {
    return new Uint8Array(await response.arrayBuffer()).slice(0, maxBytes);
  }
  const chunks: Uint8Array[] = [];
  let size = 0;
  while (size < maxBytes) {
    const { done, value } = await reader.read();
    if (done) {
      break;
    }
    chunks.push(value);
    size += value.length;
  }
  await reader.cancel().catch(() => undefined);
  const head = new Uint8Array(Math.min(size, maxBytes));
  let at = 0;
  for (const chunk of chunks) {
    const part = chunk.subarray(0, head.length - at);
    head.set(part, at);
    at += part.length;
  }
  return head;
}

function cookie(name: string): string | undefined {
  if (typeof document === 'undefined') {
    return undefined;
  }
  const match = document.cookie.match(`(?:^|;)\\s*${name}=([^;]*)`);
  return match ? decodeURIComponent(match[1]) : undefined;
}

export class HostJobSource implements JobSource {
  /** Settles when the job's first state has been read (at once without a job). */
  readonly ready: Promise<void>;
  private current: JobSnapshot = emptySnapshot();
  private known: JobDefinition | null = null;
  private failure: string | null = null;
  private disconnected: string | null = null;
  private queue: string;
  private readonly changeListeners = new Set<(snapshot: JobSnapshot) => void>();
  private readonly cursors = new Set<LogCursor>();
  private socket: WebSocket | null = null;
  private retry = 0;
  private disposed = false;
  private readonly api: string;
  private readonly fetch: typeof fetch;

  constructor(private readonly options: HostOptions) {
    this.queue = options.queue;
    this.api = `${options.baseUrl}compute-queue/`;
    this.fetch = options.fetch ?? fetch.bind(globalThis);
    this.ready = options.jobId ? this.load(options.jobId) : Promise.resolve();
    // A view learns of a failure through `error` (or `ready`, if it asks).
    this.ready.catch(error => this.fail(error));
    this.connect();
  }

  get snapshot(): JobSnapshot {
    return this.current;
  }

  /** `editor` only for a source made without a job, until it submits one. */
  get mode(): Mode {
    return this.current.jobId || this.options.jobId ? 'job' : 'editor';
  }

  get definition(): JobDefinition | null {
    return this.known;
  }

  get error(): string | null {
    return this.failure;
  }

  get notice(): string | null {
    return this.disconnected;
  }

  onChange(listener: (snapshot: JobSnapshot) => void): Dispose {
    this.changeListeners.add(listener);
    return () => this.changeListeners.delete(listener);
  }

  onLog(listener: LogListener, since = 0): Dispose {
    const cursor = new LogCursor(listener, since);
    this.cursors.add(cursor);
    this.subscribe();
    return () => this.cursors.delete(cursor);
  }

  async cancel(): Promise<void> {
    if (!this.current.jobId) {
      throw new Error('nothing to cancel: no job has been submitted here yet');
    }
    await this.request('POST', `${this.jobPath(this.current.jobId)}/cancel`);
  }

  async rerun(): Promise<void> {
    if (!this.known) {
      throw new Error('cannot rerun: the host has not given this job\'s definition');
    }
    await this.send({ definition: this.known, rerun: true });
  }

  async submit(definition: JobDefinition, options: SubmitOptions = {}): Promise<void> {
    const files = options.files ?? [];
    const full = { ...definition };
    if (files.length > 0) {
      const inputs = { ...((full.inputs as Record<string, unknown> | undefined) ?? {}) };
      for (const file of files) {
        inputs[file.name] = await this.dataRef(file.data);
      }
      full.inputs = inputs;
    }
    if (options.queue && options.queue !== this.queue) {
      this.switchQueue(options.queue);
    }
    await this.send(full);
  }

  async read(path: string, maxBytes: number): Promise<Uint8Array> {
    const url = this.outputUrl(path);
    if (!url) {
      throw new Error('there is no job yet');
    }
    return readHead(await this.get(url), maxBytes);
  }

  async readZip(maxBytes: number): Promise<Uint8Array> {
    const url = this.zipUrl();
    if (!url) {
      throw new Error('there is no job yet');
    }
    const data = await readHead(await this.get(url), maxBytes + 1);
    if (data.length > maxBytes) {
      throw new Error(`the outputs are over ${maxBytes} bytes as a zip: download them`);
    }
    return data;
  }

  pageUrl(): string | null {
    const job = this.current.jobId;
    const queue = encodeURIComponent(this.queue);
    return job && `${this.api}ui/#?queue=${queue}&job=${job}`;
  }

  outputUrl(path: string): string | null {
    const job = this.current.jobId;
    return job && `${this.api}${this.jobPath(job)}/outputs/${encodePath(path)}`;
  }

  zipUrl(): string | null {
    const job = this.current.jobId;
    return job && `${this.api}${this.jobPath(job)}/outputs.zip`;
  }

  dispose(): void {
    this.disposed = true;
    this.changeListeners.clear();
    this.cursors.clear();
    this.socket?.close();
  }

  private jobPath(jobId: string): string {
    return `q/${encodeURIComponent(this.queue)}/j/${jobId}`;
  }

  private headers(contentType: string): Record<string, string> {
    const headers: Record<string, string> = { 'Content-Type': contentType };
    const xsrf = cookie('_xsrf');
    if (this.options.token) {
      headers.Authorization = `token ${this.options.token}`;
    } else if (xsrf) {
      headers['X-XSRFToken'] = xsrf;
    }
    return headers;
  }

  private async request(method: string, path: string, body?: unknown): Promise<any> {
    const response = await this.fetch(this.api + path, {
      method,
      headers: this.headers('application/json'),
      credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body)
    });
    const answer = await response.json().catch(() => null);
    if (!response.ok) {
      throw new Error(answer?.error ?? `${method} ${path}: HTTP ${response.status}`);
    }
    return answer;
  }

  /** A GET of a file; its response once it answers 200. */
  private async get(url: string): Promise<Response> {
    const headers = this.headers('application/octet-stream');
    delete headers['Content-Type'];
    const response = await this.fetch(url, { headers, credentials: 'same-origin' });
    if (!response.ok) {
      const answer = await response.json().catch(() => null);
      throw new Error(answer?.error ?? `GET ${url}: HTTP ${response.status}`);
    }
    return response;
  }

  /** An input's DataRef: inline when small, else a blob uploaded to the host (SPEC §2). */
  private async dataRef(data: Uint8Array): Promise<{ type: string; value: string }> {
    if (data.length <= INLINE_BYTES) {
      return { type: 'base64', value: base64(data) };
    }
    if (!globalThis.crypto?.subtle) {
      throw new Error('input files over 64 KiB need a secure page (https or localhost)');
    }
    const body = data.slice().buffer as ArrayBuffer;
    const key = hex(await crypto.subtle.digest('SHA-256', body));
    const response = await this.fetch(`${this.api}f/${key}`, {
      method: 'PUT',
      headers: this.headers('application/octet-stream'),
      credentials: 'same-origin',
      body
    });
    if (!response.ok) {
      const answer = await response.json().catch(() => null);
      throw new Error(answer?.error ?? `uploading an input: HTTP ${response.status}`);
    }
    return { type: 'key', value: key };
  }

  private fail(error: unknown): void {
    this.failure = error instanceof Error ? error.message : String(error);
    this.changeListeners.forEach(listener => listener(this.current));
  }

  /** Follows another queue (a submission to it): its websocket instead of the old one's. */
  private switchQueue(queue: string): void {
    this.queue = queue;
    const old = this.socket;
    this.socket = null;
    old?.close();
    this.connect();
  }

  private async load(jobId: string): Promise<void> {
    const job = await this.request('GET', this.jobPath(jobId));
    this.known = job.definition ?? null;
    this.failure = null;
    if (job.runs.length > 0) {
      this.set(snapshotOf(job.runs[0]));
    } else {
      this.set({ ...emptySnapshot(), jobId, queue: this.queue });
    }
  }

  private async send(submission: unknown): Promise<void> {
    const answer = await this.request('POST', `q/${encodeURIComponent(this.queue)}`, submission);
    await this.load(answer.jobId);
  }

  private set(snapshot: JobSnapshot): void {
    const newRun = snapshot.runId !== this.current.runId;
    const oldRun = this.current.runId;
    this.current = snapshot;
    if (newRun) {
      if (oldRun) {
        this.message({ type: 'unsubscribe', runId: oldRun });
      }
      // A new run's log starts at offset 0 (LogListener).
      this.cursors.forEach(cursor => cursor.reset(0));
      this.subscribe();
    }
    this.changeListeners.forEach(listener => listener(snapshot));
  }

  /** Takes a run record if it is the job's current run or a newer one. */
  private update(run: RunRecord): void {
    const { jobId, runId, queuedAt } = this.current;
    const newer = runId === null || run.runId === runId || run.queuedAt > (queuedAt ?? '');
    if (run.jobId === jobId && run.queue === this.queue && newer) {
      this.set(snapshotOf(run));
    }
  }

  private subscribe(): void {
    const runId = this.current.runId;
    if (runId && this.cursors.size > 0) {
      const since = Math.min(...[...this.cursors].map(cursor => cursor.position));
      this.message({ type: 'subscribe', runId, since });
    }
  }

  private message(message: object): void {
    if (this.socket?.readyState === 1 /* OPEN */) {
      this.socket.send(JSON.stringify(message));
    }
  }

  private connect(): void {
    const Socket = this.options.WebSocket ?? WebSocket;
    const base =
      this.options.wsUrl ?? new URL(this.options.baseUrl, location.href).href.replace(/^http/, 'ws');
    const token = this.options.token ? `?token=${encodeURIComponent(this.options.token)}` : '';
    const queue = encodeURIComponent(this.queue);
    const socket = new Socket(`${base}compute-queue/q/${queue}/ws${token}`);
    this.socket = socket;
    socket.onopen = () => {
      this.retry = 0;
      this.setDisconnected(null);
      this.subscribe();
    };
    socket.onmessage = event => {
      if (this.socket === socket) {
        this.received(JSON.parse(event.data) as HostMessage);
      }
    };
    socket.onclose = () => {
      if (!this.disposed && this.socket === socket) {
        // Reconnect with backoff; a resubscription resumes each log where it stopped.
        this.setDisconnected('Lost the connection to the host; reconnecting…');
        this.retry = Math.min(this.retry + 1, 5);
        setTimeout(() => {
          if (!this.disposed && this.socket === socket) {
            this.connect();
          }
        }, 500 * 2 ** this.retry);
      }
    };
  }

  private setDisconnected(notice: string | null): void {
    if (notice !== this.disconnected) {
      this.disconnected = notice;
      this.changeListeners.forEach(listener => listener(this.current));
    }
  }

  private received(message: HostMessage): void {
    if (message.type === 'snapshot') {
      const mine = message.runs.filter(run => run.jobId === this.current.jobId);
      if (mine.length > 0) {
        this.update(mine[0]);
      }
    } else if (message.type === 'run') {
      this.update(message.run);
    } else if (message.type === 'logs' && message.runId === this.current.runId) {
      this.cursors.forEach(cursor => cursor.feed(message.records));
    }
  }
}
