// A JobSource fed through the kernel: the anywidget model's traits hold the state, custom
// messages carry the log, the actions and files. The Python widget
// (jupyter_compute_queue/notebook/widget.py, whose docstring has the whole contract) keeps the other end:
//
//   traits (snake_case):  job_id run_id queue state phase reason exit_code message outputs
//                         cached queued_at started_at finished_at job_url page_url
//                         definition mode error
//   kernel → front end:   {type: "logs", run, offset, records}  records from byte `offset` on
//                         {type: "ack", of, id}                 first answer to every request
//                         {type: "done", of, id, error?}        an action has been done
//                         {type: "file", id, path, size} + one buffer, or {type: "file", id, error}
//   front end → kernel:   {type: "logs", id, since}             replay the log from `since`
//                         {type: "cancel" | "rerun", id}
//                         {type: "submit", id, definition, queue, files: [names]} + one buffer
//                                                               per file
//                         {type: "read", id, path, max} | {type: "zip", id, max}
//                         {type: "rendered", id}                the view is shown
// A request unacknowledged for a moment is sent again (same id; the kernel handles it once).
import type { AnyModel } from '@anywidget/types';

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
  encodePath
} from './source';

/** Snapshot field → trait name. */
const TRAITS: Record<Exclude<keyof JobSnapshot, 'outputs'>, string> = {
  jobId: 'job_id',
  runId: 'run_id',
  queue: 'queue',
  state: 'state',
  phase: 'phase',
  reason: 'reason',
  exitCode: 'exit_code',
  message: 'message',
  cached: 'cached',
  queuedAt: 'queued_at',
  startedAt: 'started_at',
  finishedAt: 'finished_at'
};
/** Every trait the view follows. */
const WATCHED = [...Object.values(TRAITS), 'outputs', 'mode', 'definition', 'error', 'page_url'];

/**
 * How long a request may go unacknowledged before the view says the kernel is busy: a cell
 * that blocks (the `%%container` magic waiting for its job) keeps the kernel from reading
 * comm messages unless the front end sends them on a subshell (JupyterLab ≥ 4.4, ipykernel 7).
 */
export const ACK_TIMEOUT_MS = 1500;

/**
 * When a request is sent again while unacknowledged (ms after the first send). The first
 * messages of a new widget can reach the kernel before the front end has its comm subshell,
 * and then wait for the blocked cell; a copy sent a little later goes on the subshell. The
 * kernel handles each request id once, so copies are harmless.
 */
export const RESEND_AFTER_MS = [250, 600, 1200, 2500, 5000];
/** Requests carrying more bytes than this (file uploads) are not sent again. */
const RESEND_MAX_BYTES = 1024 * 1024;

/** What the view says when an action gets no acknowledgement in time. */
export const BUSY_NOTICE: Record<string, string> = {
  cancel:
    'The kernel is busy with this cell and cannot receive Cancel: interrupt the kernel (■) to ' +
    'cancel the job.',
  rerun:
    'The kernel is busy with this cell and cannot receive Rerun: wait for the cell to finish, ' +
    'or interrupt the kernel (■).',
  submit:
    'The kernel is busy with this cell and cannot receive the job: wait for the cell to ' +
    'finish, or interrupt the kernel (■).'
};

type KernelMessage =
  | { type: 'logs'; run?: string | null; offset: number; records: LogRecord[] }
  | { type: 'ack'; of: string; id?: string | null }
  | { type: 'done'; of: string; id: string; error?: string | null }
  | { type: 'file'; id: string; path?: string; size?: number; error?: string };

type Answer = { message: KernelMessage; buffers: DataView[] };

interface Pending {
  kind: string;
  acked: boolean;
  /** Whether the ack is the whole answer (`logs`, `rendered`), or `done`/`file` follows. */
  ackOnly: boolean;
  timers: ReturnType<typeof setTimeout>[];
  resolve: (value: Answer) => void;
  reject: (error: Error) => void;
}

let instances = 0;

export class KernelJobSource implements JobSource {
  private readonly changeListeners = new Set<(snapshot: JobSnapshot) => void>();
  private readonly cursors = new Set<LogCursor>();
  private readonly pending = new Map<string, Pending>();
  /** Request ids are unique per view: the kernel's answers reach every view of the model. */
  private readonly prefix = `${Date.now().toString(36)}-${(instances += 1)}-${Math.random()
    .toString(36)
    .slice(2, 8)}`;
  private counter = 0;
  private current: JobSnapshot;
  private busy: string | null = null;
  private askedSince: number | null = null;

  constructor(private readonly model: AnyModel) {
    this.current = this.readTraits();
    for (const trait of WATCHED) {
      model.on(`change:${trait}`, this.changed);
    }
    model.on('msg:custom', this.received);
  }

  get snapshot(): JobSnapshot {
    return this.current;
  }

  get mode(): Mode {
    return this.model.get('mode') === 'editor' ? 'editor' : 'job';
  }

  get definition(): JobDefinition | null {
    const definition = this.model.get('definition') as JobDefinition | undefined;
    return definition && Object.keys(definition).length > 0 ? definition : null;
  }

  get error(): string | null {
    return (this.model.get('error') as string | undefined) || null;
  }

  get notice(): string | null {
    return this.busy;
  }

  onChange(listener: (snapshot: JobSnapshot) => void): Dispose {
    this.changeListeners.add(listener);
    return () => this.changeListeners.delete(listener);
  }

  onLog(listener: LogListener, since = 0): Dispose {
    const cursor = new LogCursor(listener, since);
    this.cursors.add(cursor);
    this.askReplay(since);
    return () => this.cursors.delete(cursor);
  }

  /** Tells the kernel a view shows the widget (the `%%container` magic waits for it). */
  rendered(): void {
    this.request('rendered', {}).catch(() => undefined);
  }

  async cancel(): Promise<void> {
    await this.action('cancel', {});
  }

  async rerun(): Promise<void> {
    await this.action('rerun', {});
  }

  async submit(definition: JobDefinition, options: SubmitOptions = {}): Promise<void> {
    const files = options.files ?? [];
    await this.action(
      'submit',
      {
        definition,
        queue: options.queue ?? this.current.queue,
        files: files.map(file => file.name)
      },
      files.map(file => file.data)
    );
  }

  async read(path: string, maxBytes: number): Promise<Uint8Array> {
    return this.file({ type: 'read', path, max: maxBytes });
  }

  async readZip(maxBytes: number): Promise<Uint8Array> {
    return this.file({ type: 'zip', max: maxBytes });
  }

  pageUrl(): string | null {
    return (this.model.get('page_url') as string | undefined) || null;
  }

  outputUrl(path: string): string | null {
    const url = this.jobUrl();
    return url && `${url}/outputs/${encodePath(path)}`;
  }

  zipUrl(): string | null {
    const url = this.jobUrl();
    return url && `${url}/outputs.zip`;
  }

  dispose(): void {
    for (const trait of WATCHED) {
      this.model.off(`change:${trait}`, this.changed);
    }
    this.model.off('msg:custom', this.received);
    this.changeListeners.clear();
    this.cursors.clear();
    for (const request of this.pending.values()) {
      request.timers.forEach(clearTimeout);
      request.reject(new Error('the view was closed'));
    }
    this.pending.clear();
  }

  private jobUrl(): string | null {
    const url = this.model.get('job_url') as string | undefined;
    return url ? url.replace(/\/+$/, '') : null;
  }

  private readTraits(): JobSnapshot {
    const get = (trait: string) => this.model.get(trait) ?? null;
    const snapshot = { outputs: get('outputs') ?? {} } as JobSnapshot;
    for (const [field, trait] of Object.entries(TRAITS)) {
      (snapshot as unknown as Record<string, unknown>)[field] = get(trait);
    }
    return snapshot;
  }

  /**
   * Sends a request with an id; settles with the kernel's answer to it (its ack for `logs`
   * and `rendered`, else `done` or `file`), sending it again while unacknowledged. An action
   * still unacknowledged after ACK_TIMEOUT_MS sets the busy notice until its ack comes.
   */
  private request(kind: string, fields: object, buffers: Uint8Array[] = []): Promise<Answer> {
    const id = `${this.prefix}-${(this.counter += 1)}`;
    const message = { type: kind, ...fields, id };
    return new Promise((resolve, reject) => {
      const ackOnly = kind === 'logs' || kind === 'rendered';
      const pending: Pending = { kind, acked: false, ackOnly, timers: [], resolve, reject };
      this.pending.set(id, pending);
      const send = () => this.model.send(message, undefined, buffers);
      send();
      const bytes = buffers.reduce((sum, buffer) => sum + buffer.byteLength, 0);
      for (const delay of bytes <= RESEND_MAX_BYTES ? RESEND_AFTER_MS : []) {
        pending.timers.push(setTimeout(send, delay));
      }
      if (kind in BUSY_NOTICE) {
        pending.timers.push(setTimeout(() => this.setBusy(BUSY_NOTICE[kind]), ACK_TIMEOUT_MS));
      }
    });
  }

  private async action(kind: string, fields: object, buffers: Uint8Array[] = []): Promise<void> {
    const { message } = await this.request(kind, fields, buffers);
    if (message.type === 'done' && message.error) {
      throw new Error(message.error);
    }
  }

  private async file(fields: { type: string; [key: string]: unknown }): Promise<Uint8Array> {
    const { type, ...rest } = fields;
    const { message, buffers } = await this.request(type, rest);
    if (message.type !== 'file' || message.error || buffers.length === 0) {
      const error = message.type === 'file' ? message.error : undefined;
      throw new Error(error || 'the kernel sent no file');
    }
    const view = buffers[0];
    // A copy: the buffer may be a view into a larger message.
    return new Uint8Array(view.buffer.slice(view.byteOffset, view.byteOffset + view.byteLength));
  }

  private setBusy(notice: string | null): void {
    if (notice !== this.busy) {
      this.busy = notice;
      this.changeListeners.forEach(listener => listener(this.current));
    }
  }

  private acknowledged(id: string, message: KernelMessage, buffers: DataView[]): void {
    const pending = this.pending.get(id);
    if (pending && !pending.acked) {
      pending.acked = true;
      pending.timers.forEach(clearTimeout);
      const waiting = [...this.pending.values()].some(p => !p.acked && p.kind in BUSY_NOTICE);
      if (!waiting) {
        this.setBusy(null);
      }
    }
    if (pending && (message.type !== 'ack' || pending.ackOnly)) {
      this.pending.delete(id);
      pending.resolve({ message, buffers });
    }
  }

  // Traits set together in the kernel arrive as several change events: one snapshot for all.
  private scheduled = false;
  private readonly changed = (): void => {
    if (!this.scheduled) {
      this.scheduled = true;
      queueMicrotask(this.update);
    }
  };

  private readonly update = (): void => {
    this.scheduled = false;
    const previous = this.current;
    this.current = this.readTraits();
    if (this.current.runId !== previous.runId) {
      // A new run's log starts at offset 0 (LogListener).
      this.cursors.forEach(cursor => cursor.reset(0));
      this.askedSince = null;
    }
    this.changeListeners.forEach(listener => listener(this.current));
  };

  private readonly received = (msg: unknown, buffers: DataView[] = []): void => {
    const message = msg as KernelMessage | null;
    if (!message || typeof message !== 'object') {
      return;
    }
    if (message.type === 'logs' && Array.isArray(message.records)) {
      if (message.run && this.current.runId && message.run !== this.current.runId) {
        return; // a late batch of an earlier run
      }
      let gap = false;
      this.cursors.forEach(cursor => {
        gap = cursor.feed(message.records) || gap;
      });
      if (gap) {
        this.fillGap();
      }
    } else if (
      (message.type === 'ack' || message.type === 'done' || message.type === 'file') &&
      message.id
    ) {
      this.acknowledged(message.id, message, buffers);
    }
  };

  /** Asks the kernel to replay the log from `since`. */
  private askReplay(since: number): void {
    this.request('logs', { since }).catch(() => undefined);
  }

  /** A live batch came before the part of the log it follows: ask for that part (once). */
  private fillGap(): void {
    const since = Math.min(...[...this.cursors].filter(c => c.gap).map(c => c.position));
    if (Number.isFinite(since) && since !== this.askedSince) {
      this.askedSince = since;
      this.askReplay(since);
    }
  }
}
