// The few REST calls the sidebar makes, with the browser's own credentials (the Jupyter login
// cookie, and `_xsrf` on writes), under `{baseUrl}compute-queue/`.

/** A run record as the host sends it (the fields the sidebar shows). */
export interface Run {
  runId: string;
  jobId: string;
  queue: string;
  state: 'Queued' | 'Running' | 'Finished';
  phase: string | null;
  reason: string | null;
  exitCode: number | null;
  namespaces: string[];
  queuedAt: string;
  startedAt: string | null;
  finishedAt: string | null;
  worker: { id: string } | null;
}

/** A worker as `GET q/{queue}/status` and the socket's snapshot give it. */
export interface Worker {
  id: string;
  connected?: boolean;
  capacity?: { cpus?: number; memory?: number | null; gpus?: number };
  running?: string[];
  lastSeen?: number | null;
  version?: string | null;
}

export type Counts = Partial<Record<Run['state'], number>>;

function cookie(name: string): string | undefined {
  const match = document.cookie.match(`(?:^|;)\\s*${name}=([^;]*)`);
  return match ? decodeURIComponent(match[1]) : undefined;
}

export class HostApi {
  readonly api: string;

  constructor(
    readonly baseUrl: string,
    readonly wsUrl: string
  ) {
    this.api = `${baseUrl}compute-queue/`;
  }

  async request(method: string, path: string, body?: unknown): Promise<any> {
    const headers: Record<string, string> = { 'Content-Type': 'application/json' };
    const xsrf = cookie('_xsrf');
    if (xsrf) {
      headers['X-XSRFToken'] = xsrf;
    }
    const response = await fetch(this.api + path, {
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

  queuePath(queue: string): string {
    return `q/${encodeURIComponent(queue)}`;
  }

  socketUrl(queue: string): string {
    return `${this.wsUrl}compute-queue/${this.queuePath(queue)}/ws`;
  }

  /** The job page of a job (a URL people can share). */
  pageUrl(queue: string, jobId: string): string {
    const page = new URL(`${this.api}ui/`, location.href);
    page.hash = `?queue=${encodeURIComponent(queue)}&job=${jobId}`;
    return page.href;
  }

  cancel(run: Run): Promise<unknown> {
    return this.request('POST', `${this.queuePath(run.queue)}/j/${run.jobId}/cancel`);
  }

  /** Submits the run's job again to its queue, even if a cached result exists. */
  async resubmit(run: Run): Promise<unknown> {
    const path = `${this.queuePath(run.queue)}/j/${run.jobId}/definition.json`;
    const definition = await this.request('GET', path);
    return this.request('POST', this.queuePath(run.queue), { definition, rerun: true });
  }

  workerCommand(queue: string): Promise<{ command: string }> {
    return this.request('GET', `${this.queuePath(queue)}/worker-token`);
  }

  status(queue: string): Promise<{ workers: Worker[]; counts: Counts }> {
    return this.request('GET', `${this.queuePath(queue)}/status`);
  }
}
