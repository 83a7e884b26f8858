// One queue in the sidebar: its workers, its runs and a chart of its length, live over the
// queue's websocket (docs/protocol.md "Client websocket"). Events change the model at once;
// the DOM is redrawn at most every RENDER_MS (about ten updates a second), however many
// events arrive.
import type { Counts, HostApi, Run, Worker } from './api';
import { age, duration, el, size } from './dom';

const RENDER_MS = 100;
const SAMPLE_MS = 2000;
/** How often worker details (last seen) are read again without a worker event. */
const STATUS_MS = 15000;
/** Five minutes of samples for the chart. */
const SAMPLES = 150;
/** Runs listed per queue (the socket's snapshot holds the 100 newest). */
const SHOWN_RUNS = 50;

export interface QueueActions {
  open(run: Run): void;
  remove(queue: string): void;
}

export class QueueSection {
  readonly node: HTMLElement;
  private readonly runs = new Map<string, Run>();
  private workers: Worker[] = [];
  private counts: Counts = {};
  private readonly lengths: number[] = [];
  private socket: WebSocket | null = null;
  private retry = 0;
  private disposed = false;
  private renderTimer = 0;
  private statusTimer = 0;
  private readonly sampler: number;
  private readonly refresher: number;
  private error = '';
  private workerCommand: string | null = null;

  constructor(
    readonly queue: string,
    private readonly api: HostApi,
    private readonly actions: QueueActions
  ) {
    this.node = el('section', 'jcq-queue');
    this.node.dataset.queue = queue;
    this.sampler = window.setInterval(() => this.sample(), SAMPLE_MS);
    // Heartbeats are not events: re-read the workers now and then so "seen … ago" stays true.
    this.refresher = window.setInterval(() => this.refreshStatus(), STATUS_MS);
    this.connect();
    this.render();
  }

  dispose(): void {
    this.disposed = true;
    window.clearInterval(this.sampler);
    window.clearInterval(this.refresher);
    window.clearTimeout(this.renderTimer);
    window.clearTimeout(this.statusTimer);
    this.socket?.close();
    this.node.remove();
  }

  // --- the model ------------------------------------------------------------------------------

  private connect(): void {
    const socket = new WebSocket(this.api.socketUrl(this.queue));
    this.socket = socket;
    socket.onopen = () => {
      this.retry = 0;
      this.error = '';
    };
    socket.onmessage = event => this.received(JSON.parse(event.data));
    socket.onclose = event => {
      if (this.disposed) {
        return;
      }
      this.error = event.code === 1006 ? 'disconnected: reconnecting…' : `closed (${event.code})`;
      this.schedule();
      // Reconnect with backoff; the new socket starts with a fresh snapshot.
      this.retry = Math.min(this.retry + 1, 5);
      window.setTimeout(() => !this.disposed && this.connect(), 500 * 2 ** this.retry);
    };
  }

  private received(message: any): void {
    if (message.type === 'snapshot') {
      this.runs.clear();
      for (const run of message.runs as Run[]) {
        this.runs.set(run.runId, run);
      }
      this.counts = { ...(message.counts as Counts) };
      this.workers = message.workers as Worker[];
      this.loadWorkerCommand();
    } else if (message.type === 'run') {
      const run = message.run as Run;
      const before = this.runs.get(run.runId);
      if (before?.state !== run.state) {
        if (before) {
          this.counts[before.state] = Math.max(0, (this.counts[before.state] ?? 0) - 1);
        }
        this.counts[run.state] = (this.counts[run.state] ?? 0) + 1;
      }
      this.runs.set(run.runId, run);
      this.follow(run);
    } else if (message.type === 'worker') {
      this.refreshStatus();
    } else if (message.type === 'error') {
      this.error = String(message.error);
    }
    this.schedule();
  }

  /** A worker's running runs follow the run events at once: the host sends a worker event
   * only when a worker connects or leaves, so the status read at that time goes stale as soon
   * as a run starts or ends. */
  private follow(run: Run): void {
    for (const worker of this.workers) {
      const others = (worker.running ?? []).filter(id => id !== run.runId);
      if (run.state === 'Running' && run.worker?.id === worker.id) {
        others.push(run.runId);
      }
      worker.running = others;
    }
  }

  /** Worker details come from the status route, at most twice a second. */
  private refreshStatus(): void {
    if (this.statusTimer) {
      return;
    }
    this.statusTimer = window.setTimeout(async () => {
      this.statusTimer = 0;
      try {
        const status = await this.api.status(this.queue);
        // The status may have been read before a finish this section has already seen.
        this.workers = status.workers.map(worker => ({
          ...worker,
          running: (worker.running ?? []).filter(id => this.runs.get(id)?.state !== 'Finished')
        }));
        this.counts = { ...status.counts };
        this.loadWorkerCommand();
      } catch (error) {
        this.error = String((error as Error).message);
      }
      this.schedule();
    }, 500);
  }

  private loadWorkerCommand(): void {
    if (this.workerCommand !== null || this.workers.some(w => w.connected !== false)) {
      return;
    }
    this.workerCommand = '';
    this.api
      .workerCommand(this.queue)
      .then(answer => (this.workerCommand = answer.command))
      .catch(() => (this.workerCommand = `jupyter compute-queue worker ${this.queue} --url … --token …`))
      .finally(() => this.schedule());
  }

  private sample(): void {
    this.lengths.push(this.counts.Queued ?? 0);
    if (this.lengths.length > SAMPLES) {
      this.lengths.shift();
    }
    this.schedule();
  }

  // --- the view -------------------------------------------------------------------------------

  private schedule(): void {
    if (!this.renderTimer && !this.disposed) {
      this.renderTimer = window.setTimeout(() => {
        this.renderTimer = 0;
        this.render();
      }, RENDER_MS);
    }
  }

  private render(): void {
    const header = el('header', 'jcq-queue-header');
    const name = el('span', 'jcq-queue-name', this.queue);
    const counts = el(
      'span',
      'jcq-queue-counts',
      `${this.counts.Queued ?? 0} queued · ${this.counts.Running ?? 0} running`
    );
    header.append(name, counts);
    if (this.queue !== 'local') {
      const remove = el('button', 'jcq-queue-remove', '×');
      remove.title = `Stop showing queue ${this.queue}`;
      remove.addEventListener('click', () => this.actions.remove(this.queue));
      header.append(remove);
    }
    const parts: HTMLElement[] = [header];
    if (this.error) {
      parts.push(el('p', 'jcq-queue-error', this.error));
    }
    parts.push(this.chart(), this.workersView(), this.runsView());
    this.node.replaceChildren(...parts);
  }

  private chart(): HTMLElement {
    const box = el('div', 'jcq-queue-chart');
    box.title = 'Queued runs over the last five minutes';
    const width = 200;
    const height = 32;
    const ns = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    svg.setAttribute('preserveAspectRatio', 'none');
    const top = Math.max(1, ...this.lengths);
    const step = width / (SAMPLES - 1);
    const offset = SAMPLES - this.lengths.length;
    const points = this.lengths
      .map((n, i) => `${((offset + i) * step).toFixed(1)},${(height - 1 - (n / top) * (height - 2)).toFixed(1)}`)
      .join(' ');
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('points', points);
    line.setAttribute('class', 'jcq-queue-chart-line');
    svg.append(line);
    box.append(svg, el('span', 'jcq-queue-chart-max', `max ${top}`));
    return box;
  }

  private workersView(): HTMLElement {
    const box = el('div', 'jcq-workers');
    box.append(el('h4', '', 'Workers'));
    const connected = this.workers.filter(w => w.connected !== false);
    if (connected.length === 0) {
      const empty = el('div', 'jcq-workers-empty');
      empty.append(el('p', '', 'No worker serves this queue yet. Start one on any machine with Docker:'));
      const command = el('pre', 'jcq-worker-command', this.workerCommand || 'loading the command…');
      const copy = el('button', 'jcq-copy', 'Copy');
      copy.addEventListener('click', () => void navigator.clipboard?.writeText(command.textContent ?? ''));
      empty.append(command, copy);
      box.append(empty);
      return box;
    }
    const list = el('ul', 'jcq-worker-list');
    for (const worker of connected) {
      const item = el('li', 'jcq-worker');
      item.dataset.workerId = worker.id;
      item.dataset.running = (worker.running ?? []).join(' ');
      const cap = worker.capacity ?? {};
      const resources = [
        `${worker.running?.length ?? 0} running`,
        cap.cpus !== undefined ? `${cap.cpus} CPU` : '',
        cap.memory ? size(cap.memory) : '',
        cap.gpus ? `${cap.gpus} GPU` : ''
      ].filter(Boolean);
      const seen = worker.lastSeen ? `seen ${age(new Date(worker.lastSeen * 1000).toISOString())}` : '';
      item.append(
        el('span', 'jcq-worker-id', worker.id),
        el('span', 'jcq-worker-detail', [...resources, seen].filter(Boolean).join(' · '))
      );
      list.append(item);
    }
    box.append(list);
    return box;
  }

  private runsView(): HTMLElement {
    const box = el('div', 'jcq-runs');
    box.append(el('h4', '', 'Runs'));
    const runs = [...this.runs.values()]
      .sort((a, b) => (a.queuedAt < b.queuedAt ? 1 : -1))
      .slice(0, SHOWN_RUNS);
    if (runs.length === 0) {
      box.append(
        el(
          'p',
          'jcq-runs-empty',
          `No runs yet. In a notebook: %%container -q ${this.queue} … ; in a shell: ` +
            `jupyter compute-queue job add ${this.queue} -i IMAGE -c COMMAND`
        )
      );
      return box;
    }
    const list = el('ul', 'jcq-run-list');
    for (const run of runs) {
      list.append(this.runView(run));
    }
    box.append(list);
    return box;
  }

  private runView(run: Run): HTMLElement {
    const item = el('li', 'jcq-run');
    item.dataset.runId = run.runId;
    item.dataset.state = run.reason ?? run.state;
    const label = run.reason ?? run.phase ?? run.state;
    const time = run.finishedAt
      ? duration(run.startedAt ?? run.queuedAt, run.finishedAt)
      : run.startedAt
        ? `running ${duration(run.startedAt, null)}`
        : `queued ${age(run.queuedAt)}`;
    const open = el('button', 'jcq-run-open', run.jobId.slice(0, 12));
    open.title = 'Open the logs and outputs';
    open.addEventListener('click', () => this.actions.open(run));
    const state = el('span', 'jcq-run-state', label);
    const when = el('span', 'jcq-run-time', time);
    const buttons = el('span', 'jcq-run-actions');
    const action = (cls: string, text: string, title: string, fn: () => Promise<unknown>) => {
      const button = el('button', cls, text);
      button.title = title;
      button.addEventListener('click', () => {
        fn().catch(error => {
          this.error = String((error as Error).message);
          this.schedule();
        });
      });
      buttons.append(button);
    };
    if (run.state !== 'Finished') {
      action('jcq-run-cancel', 'Cancel', 'Cancel this run', () => this.api.cancel(run));
    }
    action('jcq-run-copy', 'Copy URL', 'Copy the job page URL', async () => {
      await navigator.clipboard.writeText(this.api.pageUrl(run.queue, run.jobId));
    });
    action('jcq-run-resubmit', 'Rerun', 'Submit the job again', () => this.api.resubmit(run));
    item.append(open, state, when, buttons);
    return item;
  }
}
