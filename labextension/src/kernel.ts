// A JobSource fed through the kernel: the anywidget model's traits hold the state, custom
// messages carry the log and the actions. The Python widget (jupyter_compute_queue/widget.py)
// keeps the other end of this contract:
//
//   traits (snake_case):  job_id run_id queue state phase reason exit_code message outputs
//                         queued_at started_at finished_at job_url
//   kernel → front end:   {type: "logs", offset, records}   records from byte `offset` on
//   front end → kernel:   {type: "logs", since}             replay the log from `since`
//                         {type: "cancel"} | {type: "rerun"} | {type: "submit", definition}
// widget.py's docstring has the whole contract (acks, `rendered`, reads of outputs, …).
import type { AnyModel } from '@anywidget/types';

import {
  type Dispose,
  type JobDefinition,
  type JobSnapshot,
  type JobSource,
  type LogListener,
  type LogRecord,
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
  queuedAt: 'queued_at',
  startedAt: 'started_at',
  finishedAt: 'finished_at'
};

interface LogsMessage {
  type: 'logs';
  offset: number;
  records: LogRecord[];
}

export class KernelJobSource implements JobSource {
  private readonly changeListeners = new Set<(snapshot: JobSnapshot) => void>();
  private readonly cursors = new Set<LogCursor>();
  private current: JobSnapshot;

  constructor(private readonly model: AnyModel) {
    this.current = this.read();
    for (const trait of [...Object.values(TRAITS), 'outputs']) {
      model.on(`change:${trait}`, this.changed);
    }
    model.on('msg:custom', this.received);
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
    this.model.send({ type: 'logs', since });
    return () => this.cursors.delete(cursor);
  }

  async cancel(): Promise<void> {
    this.model.send({ type: 'cancel' });
  }

  async rerun(): Promise<void> {
    this.model.send({ type: 'rerun' });
  }

  async submit(definition: JobDefinition): Promise<void> {
    this.model.send({ type: 'submit', definition });
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
    for (const trait of [...Object.values(TRAITS), 'outputs']) {
      this.model.off(`change:${trait}`, this.changed);
    }
    this.model.off('msg:custom', this.received);
    this.changeListeners.clear();
    this.cursors.clear();
  }

  private jobUrl(): string | null {
    const url = this.model.get('job_url') as string | undefined;
    return url ? url.replace(/\/+$/, '') : null;
  }

  private read(): JobSnapshot {
    const get = (trait: string) => this.model.get(trait) ?? null;
    const snapshot = { outputs: get('outputs') ?? {} } as JobSnapshot;
    for (const [field, trait] of Object.entries(TRAITS)) {
      (snapshot as unknown as Record<string, unknown>)[field] = get(trait);
    }
    return snapshot;
  }

  // Traits set together in the kernel arrive as several change events: one snapshot for all.
  private pending = false;
  private readonly changed = (): void => {
    if (!this.pending) {
      this.pending = true;
      queueMicrotask(this.update);
    }
  };

  private readonly update = (): void => {
    this.pending = false;
    const previous = this.current;
    this.current = this.read();
    if (this.current.runId !== previous.runId) {
      // A new run's log starts at offset 0 (LogListener).
      this.cursors.forEach(cursor => (cursor.position = 0));
    }
    this.changeListeners.forEach(listener => listener(this.current));
  };

  private readonly received = (msg: unknown): void => {
    const logs = msg as Partial<LogsMessage> | null;
    if (logs?.type === 'logs' && Array.isArray(logs.records)) {
      this.cursors.forEach(cursor => cursor.feed(logs.records as LogRecord[]));
    }
  };
}
