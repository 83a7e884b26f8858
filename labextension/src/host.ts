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
  const { queuedAt, startedAt, finishedAt } = run;
  return {
    ...{ jobId, runId, queue, state, phase, reason, exitCode, message },
    ...{ outputs: outputs ?? {}, queuedAt, startedAt, finishedAt }
  };
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
  private definition: JobDefinition | null = null;
  private readonly changeListeners = new Set<(snapshot: JobSnapshot) => void>();
  private readonly cursors = new Set<LogCursor>();
  private socket: WebSocket | null = null;
  private retry = 0;
  private disposed = false;
  private readonly api: string;
  private readonly fetch: typeof fetch;

  constructor(private readonly options: HostOptions) {
    this.api = `${options.baseUrl}compute-queue/`;
    this.fetch = options.fetch ?? fetch.bind(globalThis);
    this.ready = options.jobId ? this.load(options.jobId) : Promise.resolve();
    this.ready.catch(() => undefined); // a view learns of it through `ready`, if it asks
    this.connect();
  }

  get snapshot(): JobSnapshot {
    return this.current;
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
    if (!this.definition) {
      throw new Error('cannot rerun: the host has not given this job\'s definition');
    }
    await this.send({ definition: this.definition, rerun: true });
  }

  async submit(definition: JobDefinition): Promise<void> {
    await this.send(definition);
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
    return `q/${encodeURIComponent(this.options.queue)}/j/${jobId}`;
  }

  private async request(method: string, path: string, body?: unknown): Promise<any> {
    const headers: Record<string, string> = { 'Content-Type': 'application/json' };
    const xsrf = cookie('_xsrf');
    if (this.options.token) {
      headers.Authorization = `token ${this.options.token}`;
    } else if (xsrf) {
      headers['X-XSRFToken'] = xsrf;
    }
    const response = await this.fetch(this.api + path, {
      method,
      headers,
      credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body)
    });
    const answer = await response.json().catch(() => null);
    if (!response.ok) {
      throw new Error(answer?.error ?? `${method} ${path}: HTTP ${response.status}`);
    }
    return answer;
  }

  private async load(jobId: string): Promise<void> {
    const job = await this.request('GET', this.jobPath(jobId));
    this.definition = job.definition ?? null;
    if (job.runs.length > 0) {
      this.set(snapshotOf(job.runs[0]));
    } else {
      this.set({ ...emptySnapshot(), jobId, queue: this.options.queue });
    }
  }

  private async send(submission: unknown): Promise<void> {
    const answer = await this.request('POST', `q/${encodeURIComponent(this.options.queue)}`, submission);
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
      this.cursors.forEach(cursor => (cursor.position = 0));
      this.subscribe();
    }
    this.changeListeners.forEach(listener => listener(snapshot));
  }

  /** Takes a run record if it is the job's current run or a newer one. */
  private update(run: RunRecord): void {
    const { jobId, runId, queuedAt } = this.current;
    const newer = runId === null || run.runId === runId || run.queuedAt > (queuedAt ?? '');
    if (run.jobId === jobId && run.queue === this.options.queue && newer) {
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
    const queue = encodeURIComponent(this.options.queue);
    const socket = new Socket(`${base}compute-queue/q/${queue}/ws${token}`);
    this.socket = socket;
    socket.onopen = () => {
      this.retry = 0;
      this.subscribe();
    };
    socket.onmessage = event => this.received(JSON.parse(event.data) as HostMessage);
    socket.onclose = () => {
      if (!this.disposed) {
        // Reconnect with backoff; a resubscription resumes each log where it stopped.
        this.retry = Math.min(this.retry + 1, 5);
        setTimeout(() => this.connect(), 500 * 2 ** this.retry);
      }
    };
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
