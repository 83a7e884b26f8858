// The job view, shared by the widget (KernelJobSource) and, later, the sidebar and the job page
// (HostJobSource). For now a placeholder: the job id, the state and the log text. The real view
// (terminal, outputs, actions, editor) comes with the job widget issue.
import type { Dispose, JobSnapshot, JobSource } from './source';

function span(className: string): HTMLSpanElement {
  const element = document.createElement('span');
  element.className = className;
  return element;
}

/** Renders `source` into `el`; the returned function removes the view and its listeners. */
export function renderJob(el: HTMLElement, source: JobSource): Dispose {
  const root = document.createElement('div');
  root.className = 'jcq-job';
  const jobId = span('jcq-job-id');
  const state = span('jcq-job-state');
  const log = document.createElement('pre');
  log.className = 'jcq-job-log';
  root.append(jobId, state, log);

  let runId: string | null = null;
  const show = (snapshot: JobSnapshot) => {
    jobId.textContent = snapshot.jobId ?? '';
    const label = snapshot.reason ?? snapshot.phase ?? snapshot.state;
    state.textContent = label ?? '';
    root.dataset.state = snapshot.reason ?? snapshot.state ?? '';
    if (snapshot.runId !== runId) {
      runId = snapshot.runId;
      log.textContent = '';
    }
  };
  show(source.snapshot);
  const stopChanges = source.onChange(show);
  const stopLog = source.onLog((_offset, records) => {
    log.textContent += records.map(record => record.d).join('');
  });
  el.appendChild(root);
  return () => {
    stopChanges();
    stopLog();
    root.remove();
  };
}
