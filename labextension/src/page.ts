// The job page, `{base_url}compute-queue/ui/#?queue=…&job=…` (SPEC §9): the job view outside
// JupyterLab, fed straight from the host (HostJobSource), so a job's URL can be shared.
//
// `job` is a job id (64 hex), or a definition as base64url of UTF-8 JSON (the seed's base64 of
// URI-encoded JSON is read too). Reserved parameters: `queue`, `job`, `autostart`. With a
// definition, every other parameter is added to its `env`; with an id they are ignored. A
// definition runs when the visitor presses Run, or at once with `autostart` — only on a public
// host and never on `local` (the host says whether it is public; a private queue never
// autostarts, so a link cannot make someone's machine run a job unasked).
import css from '../style/job.css';
import { element } from './format';
import { HostJobSource } from './host';
import type { JobDefinition } from './source';
import { injectStyle } from './style';
import { renderJob } from './view';

interface PageConfig {
  baseUrl: string;
  public: boolean;
  version: string;
}

const RESERVED = new Set(['queue', 'job', 'autostart']);
const JOB_ID = /^[0-9a-f]{64}$/;

export interface PageRequest {
  queue: string;
  jobId: string | null;
  definition: JobDefinition | null;
  autostart: boolean;
}

function fromBase64(text: string): Uint8Array {
  const standard = text.replace(/[- ]/g, '+').replace(/_/g, '/');
  const padded = standard + '='.repeat((4 - (standard.length % 4)) % 4);
  return Uint8Array.from(atob(padded), c => c.charCodeAt(0));
}

/** A definition from the `job` parameter: base64url of UTF-8 JSON, or the seed's base64 of
 * URI-encoded JSON. */
export function decodeDefinition(text: string): JobDefinition {
  const bytes = fromBase64(text);
  const attempts = [
    () => new TextDecoder('utf-8', { fatal: true }).decode(bytes),
    () => decodeURIComponent(String.fromCharCode(...bytes))
  ];
  for (const attempt of attempts) {
    try {
      const value = JSON.parse(attempt());
      if (value && typeof value === 'object' && !Array.isArray(value)) {
        return value as JobDefinition;
      }
    } catch {
      // try the next spelling
    }
  }
  throw new Error('the job parameter is neither a job id nor a definition (base64url of JSON)');
}

/** The page's request from its URL hash (`#?queue=…&job=…`). */
export function parseHash(hash: string): PageRequest {
  const params = new URLSearchParams(hash.replace(/^#\??/, ''));
  const job = params.get('job');
  const request: PageRequest = {
    queue: params.get('queue') || 'local',
    jobId: null,
    definition: null,
    autostart: ['1', 'true', 'yes', ''].includes(params.get('autostart') ?? 'no')
  };
  if (job && JOB_ID.test(job)) {
    request.jobId = job;
  } else if (job) {
    const definition = decodeDefinition(job);
    const env = { ...((definition.env as Record<string, string> | undefined) ?? {}) };
    params.forEach((value, key) => {
      if (!RESERVED.has(key)) {
        env[key] = value;
      }
    });
    if (Object.keys(env).length > 0) {
      definition.env = env;
    }
    request.definition = definition;
  }
  return request;
}

function showError(root: HTMLElement, config: PageConfig, error: unknown): void {
  const box = element('div', 'jcq-page-error');
  box.append(element('p', '', String(error instanceof Error ? error.message : error)));
  const login = element('a', '', 'Log in to this Jupyter server');
  const next = location.pathname + location.search + location.hash;
  login.href = `${config.baseUrl}login?next=${encodeURIComponent(next)}`;
  box.append(login);
  root.append(box);
}

/** A definition not yet submitted: what it runs, where, and a Run button. */
function showPending(
  root: HTMLElement,
  request: PageRequest,
  onRun: () => Promise<void>,
  canAutostart: boolean
): void {
  const panel = element('section', 'jcq-page-pending');
  const definition = request.definition ?? {};
  panel.append(element('h2', '', `A job for queue ${request.queue}`));
  const pre = element('pre', 'jcq-page-definition', JSON.stringify(definition, null, 2));
  panel.append(pre);
  if (request.autostart && !canAutostart) {
    panel.append(
      element(
        'p',
        'jcq-page-note',
        `This link asks to start the job at once, but queue ${request.queue} is private: ` +
          'press Run if you want to run it.'
      )
    );
  }
  const run = element('button', 'jcq-page-run', 'Run');
  run.type = 'button';
  run.addEventListener('click', () => {
    run.disabled = true;
    onRun().catch(error => {
      run.disabled = false;
      panel.append(element('p', 'jcq-page-error', String(error?.message ?? error)));
    });
  });
  panel.append(run);
  root.append(panel);
}

export async function main(root: HTMLElement): Promise<void> {
  injectStyle('jupyter-compute-queue-job-style', css);
  const config = JSON.parse(root.dataset.config ?? '{}') as PageConfig;
  root.textContent = '';
  let request: PageRequest;
  try {
    request = parseHash(location.hash);
  } catch (error) {
    root.append(element('p', 'jcq-page-error', String((error as Error).message)));
    return;
  }
  document.title = request.jobId
    ? `Job ${request.jobId.slice(0, 12)} · ${request.queue}`
    : `New job · ${request.queue}`;
  const source = new HostJobSource({
    baseUrl: config.baseUrl,
    queue: request.queue,
    jobId: request.jobId
  });
  const view = element('div', 'jcq-page-job');
  if (request.jobId) {
    root.append(view);
    renderJob(view, source);
    source.ready.catch(error => showError(root, config, error));
    return;
  }
  if (!request.definition) {
    root.append(
      element('p', 'jcq-page-note', 'No job in this link: add #?queue=NAME&job=JOB_ID to the URL.')
    );
    return;
  }
  const definition = request.definition;
  const run = async (): Promise<void> => {
    await source.submit(definition);
    root.textContent = '';
    root.append(view);
    renderJob(view, source);
  };
  const canAutostart = config.public && request.queue !== 'local';
  if (request.autostart && canAutostart) {
    await run().catch(error => showError(root, config, error));
  } else {
    showPending(root, request, run, canAutostart);
  }
}

const root = typeof document !== 'undefined' ? document.getElementById('jcq-page') : null;
if (root) {
  void main(root);
}
