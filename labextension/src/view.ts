// The job view, shared by the widget (KernelJobSource), the sidebar and the job page
// (HostJobSource): a header (state, phase, short id linking to the job page, elapsed time,
// exit code, Cancel / Rerun / Edit), the source's notices and errors, the live log in a
// terminal, and the outputs. In editor mode (no job yet, or Edit) it shows the job editor.
import xtermCss from '@xterm/xterm/css/xterm.css';

import css from '../style/job.css';
import { type EditorHandle, renderEditor } from './editor';
import { button, element, errorText, formatDuration, parseTime, shortId } from './format';
import { OutputsView } from './outputs';
import type { Dispose, JobSnapshot, JobSource, Phase } from './source';
import { injectStyle } from './style';
import { LogTerminal } from './terminal';

export interface ViewOptions {
  /** Rows the terminal grows to before it scrolls (default 20). */
  terminalRows?: number;
}

const PHASES: Record<Phase, string> = {
  pulling: 'pulling the image',
  building: 'building the image',
  preparing: 'preparing the inputs',
  running: 'running',
  uploading: 'uploading the outputs'
};

/** The state as shown: the reason once finished, else the state. */
function stateLabel(snapshot: JobSnapshot): string {
  return snapshot.reason ?? snapshot.state ?? '';
}

/** The elapsed time as shown, or '' when nothing has started. */
function elapsed(snapshot: JobSnapshot, now: number): string {
  const queued = parseTime(snapshot.queuedAt);
  const started = parseTime(snapshot.startedAt);
  const finished = parseTime(snapshot.finishedAt);
  if (started !== null) {
    return formatDuration((finished ?? now) - started);
  }
  if (queued !== null && snapshot.state === 'Queued') {
    return `queued ${formatDuration(now - queued)}`;
  }
  return '';
}

/**
 * Adds the view's styles to the document once: xterm's own, then the job view's. (In
 * JupyterLab the extension's style module loads them too; the esbuild bundles carry them as
 * text.)
 */
export function injectJobStyles(): void {
  if (typeof xtermCss === 'string') {
    injectStyle('jupyter-compute-queue-xterm-style', xtermCss);
  }
  if (typeof css === 'string') {
    injectStyle('jupyter-compute-queue-job-style', css);
  }
}

/** Renders `source` into `el`; the returned function removes the view and its listeners. */
export function renderJob(el: HTMLElement, source: JobSource, options: ViewOptions = {}): Dispose {
  injectJobStyles();
  const root = element('div', 'jcq-job');

  // --- the job part ---------------------------------------------------------------------------
  const main = element('div', 'jcq-job-main');
  const header = element('div', 'jcq-job-header');
  const state = element('span', 'jcq-job-state');
  const phase = element('span', 'jcq-job-phase');
  const jobId = element('a', 'jcq-job-id');
  jobId.target = '_blank';
  jobId.rel = 'noopener noreferrer';
  const queue = element('span', 'jcq-job-queue');
  const cached = element('span', 'jcq-job-cached', 'cached');
  const exit = element('span', 'jcq-job-exit');
  const clock = element('span', 'jcq-job-elapsed');
  const actions = element('span', 'jcq-job-actions');
  const cancel = button(
    'jcq-job-cancel',
    'Cancel',
    () => void act(cancel, 'Cancelling…', () => source.cancel()),
    'Stop the job'
  );
  const rerun = button(
    'jcq-job-rerun',
    'Rerun',
    () => void act(rerun, 'Rerunning…', () => source.rerun()),
    'Run the job again, even though a result exists'
  );
  const edit = button(
    'jcq-job-edit',
    'Edit',
    () => {
      editing = true;
      show(source.snapshot);
    },
    'Change the job and submit it as a new one'
  );
  actions.append(cancel, rerun, edit);
  header.append(state, phase, jobId, queue, cached, exit, clock, actions);
  const message = element('div', 'jcq-job-message');
  const notice = element('div', 'jcq-job-notice');
  notice.setAttribute('role', 'status');
  const error = element('div', 'jcq-job-error');
  error.setAttribute('role', 'alert');
  const terminal = new LogTerminal({ maxRows: options.terminalRows });
  const outputs = new OutputsView(source);
  main.append(header, message, notice, error, terminal.node, outputs.node);
  root.appendChild(main);

  // --- the editor part (made when needed) -----------------------------------------------------
  let editing = false;
  let editor: EditorHandle | null = null;
  let actionError: string | null = null;

  /** Runs an action from a button: the button says what is happening, errors show. */
  async function act(target: HTMLButtonElement, busyLabel: string, run: () => Promise<void>) {
    const label = target.textContent;
    target.disabled = true;
    target.textContent = busyLabel;
    target.dataset.busy = 'true';
    actionError = null;
    try {
      await run();
    } catch (err) {
      actionError = errorText(err);
    } finally {
      target.textContent = label;
      delete target.dataset.busy;
      show(source.snapshot);
    }
  }

  const openEditor = () => {
    const snapshot = source.snapshot;
    editor = renderEditor({
      source,
      definition: source.definition,
      queue: snapshot.queue ?? 'local',
      onSubmitted: () => {
        editing = false;
        show(source.snapshot);
      },
      onBack: source.mode === 'job' ? () => ((editing = false), show(source.snapshot)) : undefined
    });
    editor.showError(source.error);
    root.appendChild(editor.node);
  };

  let runId: string | null = null;
  let lastError: string | null = null;
  let ticker: ReturnType<typeof setInterval> | undefined;

  const tick = () => {
    clock.textContent = elapsed(source.snapshot, Date.now());
  };

  let disposed = false;
  const show = (snapshot: JobSnapshot) => {
    if (disposed) {
      return; // an action that ended after the view was removed
    }
    if (snapshot.runId !== runId) {
      runId = snapshot.runId;
      terminal.clear(); // a new run's log starts again at offset 0
      actionError = null;
    }
    const inEditor = source.mode === 'editor' || editing;
    if (inEditor && !editor) {
      openEditor();
    } else if (!inEditor && editor) {
      editor.dispose();
      editor = null;
    }
    if (editor && source.error !== lastError) {
      editor.showError(source.error);
    }
    lastError = source.error;
    main.hidden = inEditor;
    root.dataset.mode = inEditor ? 'editor' : 'job';

    const label = stateLabel(snapshot);
    state.textContent = label;
    root.dataset.state = label;
    root.dataset.runId = snapshot.runId ?? '';
    const running = snapshot.state === 'Running' && snapshot.phase;
    phase.textContent = running ? PHASES[snapshot.phase as Phase] ?? snapshot.phase : '';
    phase.hidden = phase.textContent === '';

    jobId.textContent = snapshot.jobId ? shortId(snapshot.jobId) : '';
    jobId.title = snapshot.jobId ? `job ${snapshot.jobId}: open its page` : '';
    jobId.dataset.jobId = snapshot.jobId ?? '';
    const page = source.pageUrl();
    if (page) {
      jobId.href = page;
    } else {
      jobId.removeAttribute('href');
    }
    queue.textContent = snapshot.queue ? `on ${snapshot.queue}` : '';
    queue.hidden = !snapshot.queue;
    cached.hidden = !snapshot.cached;
    const code = snapshot.exitCode;
    exit.textContent = code !== null && code !== undefined && code !== 0 ? `exit code ${code}` : '';
    exit.hidden = exit.textContent === '';
    tick();
    const live = snapshot.state === 'Queued' || snapshot.state === 'Running';
    if (live && ticker === undefined) {
      ticker = setInterval(tick, 1000);
    } else if (!live && ticker !== undefined) {
      clearInterval(ticker);
      ticker = undefined;
    }

    if (!cancel.dataset.busy) {
      cancel.disabled = !live;
    }
    cancel.hidden = snapshot.state === 'Finished';
    if (!rerun.dataset.busy) {
      rerun.disabled = snapshot.state !== 'Finished';
    }
    rerun.hidden = !cancel.hidden;
    edit.hidden = source.definition === null;

    message.textContent = snapshot.message ?? '';
    message.hidden = !snapshot.message;
    notice.textContent = source.notice ?? '';
    notice.hidden = !source.notice;
    const shownError = actionError ?? source.error;
    error.textContent = shownError ?? '';
    error.hidden = !shownError;

    outputs.show(snapshot);
  };

  show(source.snapshot);
  const stopChanges = source.onChange(show);
  const stopLog = source.onLog((_offset, records) => terminal.write(records));
  el.appendChild(root);
  return () => {
    disposed = true;
    stopChanges();
    stopLog();
    clearInterval(ticker);
    editor?.dispose();
    terminal.dispose();
    outputs.dispose();
    root.remove();
  };
}
