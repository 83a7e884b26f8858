// The job view's data source: one interface, fed either through the kernel (the widget in a
// notebook) or straight from a queue host (the sidebar and the job page). The view renders a
// `JobSource` and knows nothing about where the data comes from.

/** A run's state (SPEC §4). */
export type RunState = 'Queued' | 'Running' | 'Finished';
/** What a running run is doing on its worker. */
export type Phase = 'pulling' | 'building' | 'preparing' | 'running' | 'uploading';
/** Why a run finished. */
export type Reason =
  | 'Success'
  | 'Failed'
  | 'Error'
  | 'TimedOut'
  | 'Cancelled'
  | 'Replaced'
  | 'WorkerLost';

/** An output file of a finished run: its size and its blob key. */
export interface OutputRef {
  size: number;
  key: string;
}

/** A job definition as on the wire (docs/protocol.md); the host validates it. */
export type JobDefinition = Record<string, unknown>;

/**
 * What the view shows: the job's newest run, with the run record's wire names. Every field
 * is null until known (an editor that has submitted nothing has no job at all).
 */
export interface JobSnapshot {
  jobId: string | null;
  runId: string | null;
  queue: string | null;
  state: RunState | null;
  phase: Phase | null;
  reason: Reason | null;
  exitCode: number | null;
  message: string | null;
  /** Output path → file, for the newest run (empty until it has finished). */
  outputs: Record<string, OutputRef>;
  /** Whether the run is a cached result (a submission answered by an earlier success). */
  cached: boolean | null;
  /** ISO 8601 UTC times. */
  queuedAt: string | null;
  startedAt: string | null;
  finishedAt: string | null;
}

/** One log record (docs/protocol.md, "Logs"). */
export interface LogRecord {
  /** Byte offset of the first byte of `d` in the uncut stream. */
  o: number;
  /** Epoch milliseconds. */
  t: number;
  /** `out` (stdout), `err` (stderr) or `sys` (the system's own lines). */
  s: 'out' | 'err' | 'sys';
  d: string;
  /** Only on a truncation record: the bytes cut, so the stream resumes at `o + cut`. */
  cut?: number;
}

/**
 * Receives log records of the snapshot's run, in order, each byte once: `offset` is where
 * this batch starts in the stream. When the run changes (a rerun), the new run's records
 * start again at offset 0: the view clears its terminal when `snapshot.runId` changes.
 */
export type LogListener = (offset: number, records: LogRecord[]) => void;

/** Undoes a subscription. */
export type Dispose = () => void;

/** What a view shows: the editor (no job yet, or asked for one) or the job. */
export type Mode = 'job' | 'editor';

/** A file chosen in the browser, to go under `/inputs/<name>` of a submitted job. */
export interface InputFile {
  name: string;
  data: Uint8Array;
}

/** Where and with what a job is submitted. */
export interface SubmitOptions {
  /** The queue (default: the source's own). */
  queue?: string;
  /** Input files; a definition input of the same name is replaced. */
  files?: InputFile[];
}

/** Where a job view gets its data and sends its actions. */
export interface JobSource {
  /** The state now. */
  readonly snapshot: JobSnapshot;
  /** `editor` while there is no job to show (or the other end asks for an editor). */
  readonly mode: Mode;
  /** The job's definition (what the editor starts from), or null while unknown. */
  readonly definition: JobDefinition | null;
  /** The other end's last error (a refused submission, a lost job …), or null. */
  readonly error: string | null;
  /**
   * What to tell the person about an action still unanswered (a busy kernel that cannot
   * receive Cancel, a lost connection), or null.
   */
  readonly notice: string | null;
  /** Calls `listener` with each new snapshot, and when mode, definition, error or notice change. */
  onChange(listener: (snapshot: JobSnapshot) => void): Dispose;
  /** Streams the current run's log from byte offset `since` (a replay, then live). */
  onLog(listener: LogListener, since?: number): Dispose;
  /** Cancels the job's unfinished run; settles once the other end has done it. */
  cancel(): Promise<void>;
  /** Runs the job again even if a cached result exists; the snapshot then follows the new run. */
  rerun(): Promise<void>;
  /**
   * Submits a job (the editor); settles once it is submitted and the snapshot follows it, or
   * rejects with the host's message (which names the field it refused).
   */
  submit(definition: JobDefinition, options?: SubmitOptions): Promise<void>;
  /** The first `maxBytes` bytes of an output file of the newest finished run (all if smaller). */
  read(path: string, maxBytes: number): Promise<Uint8Array>;
  /** All outputs as one zip; rejects when it would be over `maxBytes`. */
  readZip(maxBytes: number): Promise<Uint8Array>;
  /** The job page, or null before a job. */
  pageUrl(): string | null;
  /**
   * A direct link to an output file (for files too large to read through `read`; it works
   * where the browser is allowed to fetch from the host), or null before a job.
   */
  outputUrl(path: string): string | null;
  /** A direct link to all outputs as a zip, or null before a job. */
  zipUrl(): string | null;
  /** Drops every listener and connection. */
  dispose(): void;
}

/** A snapshot with nothing known yet. */
export function emptySnapshot(): JobSnapshot {
  return {
    jobId: null,
    runId: null,
    queue: null,
    state: null,
    phase: null,
    reason: null,
    exitCode: null,
    message: null,
    outputs: {},
    cached: null,
    queuedAt: null,
    startedAt: null,
    finishedAt: null
  };
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** The stream offset right after `record`: where a reader resumes. */
export function recordEnd(record: LogRecord): number {
  return record.o + (record.cut ?? encoder.encode(record.d).length);
}

/** The part of `record` from stream offset `from` on (which must fall inside it). */
function tail(record: LogRecord, from: number): LogRecord {
  if (from <= record.o) {
    return record;
  }
  if (record.cut !== undefined) {
    return { ...record, o: from, cut: record.o + record.cut - from };
  }
  const rest = decoder.decode(encoder.encode(record.d).subarray(from - record.o));
  return { ...record, o: from, d: rest };
}

/** Batches a cursor keeps while it waits for a gap to be filled. */
const MAX_PENDING = 256;

/**
 * Keeps one listener's position in a log stream, so that overlapping replays (another
 * listener asked for an earlier offset, a reconnect resent a batch) reach it only once, in
 * order. A batch that starts past the position (a live batch overtook the replay that fills
 * the gap) waits until the gap is filled.
 */
export class LogCursor {
  private pending: LogRecord[][] = [];

  constructor(
    private readonly listener: LogListener,
    public position = 0
  ) {}

  /** Whether a batch waits for an earlier part of the stream. */
  get gap(): boolean {
    return this.pending.length > 0;
  }

  /** Passes on the part of `records` past this listener's position; true when a gap remains. */
  feed(records: LogRecord[]): boolean {
    if (records.length > 0) {
      if (records[0].o > this.position) {
        this.pending.push(records);
        if (this.pending.length > MAX_PENDING) {
          // Nobody filled the gap: show what there is rather than nothing.
          this.pending.sort((a, b) => a[0].o - b[0].o);
          this.position = this.pending[0][0].o;
        }
      } else {
        this.deliver(records);
      }
    }
    let moved = true;
    while (moved) {
      moved = false;
      const ready = this.pending.findIndex(batch => batch[0].o <= this.position);
      if (ready >= 0) {
        this.deliver(this.pending.splice(ready, 1)[0]);
        moved = true;
      }
    }
    return this.gap;
  }

  /** Starts again at `position` (a new run), forgetting waiting batches. */
  reset(position = 0): void {
    this.position = position;
    this.pending = [];
  }

  private deliver(records: LogRecord[]): void {
    const fresh = records
      .filter(r => recordEnd(r) > this.position)
      .map(r => tail(r, this.position));
    if (fresh.length === 0) {
      return;
    }
    this.position = recordEnd(fresh[fresh.length - 1]);
    this.listener(fresh[0].o, fresh);
  }
}

/** The path of an output file as a URL path, each segment escaped. */
export function encodePath(path: string): string {
  return path.split('/').map(encodeURIComponent).join('/');
}
