// The job editor: compose a job (image, command, input files, environment, resources, max
// duration, queue) and submit it through the source. It starts from a definition (the job
// being edited, or what the kernel prefilled) and changes only what the person changed, so an
// unchanged field keeps its exact value (and the job its id).
import { button, element, errorText, formatBytes } from './format';
import type { InputFile, JobDefinition, JobSource } from './source';

export interface EditorOptions {
  source: JobSource;
  /** Where the form starts from. */
  definition: JobDefinition | null;
  /** The queue the job goes to unless changed. */
  queue: string;
  /** Called once the job is submitted (the source now follows it). */
  onSubmitted: () => void;
  /** When given, a "Back" button leaves the editor without submitting. */
  onBack?: () => void;
}

export interface EditorHandle {
  node: HTMLElement;
  /** Shows an error (the source's, e.g. the host refused the definition), or none. */
  showError(text: string | null): void;
  dispose(): void;
}

type Definition = Record<string, any>;

/** Sets `target[key]` to `value`, or removes the key when the value is empty. */
function put(target: Definition, key: string, value: unknown): void {
  const empty =
    value === undefined ||
    value === '' ||
    (typeof value === 'object' && value !== null && Object.keys(value).length === 0);
  if (empty) {
    delete target[key];
  } else {
    target[key] = value;
  }
}

const SIZE_UNITS: [string, number][] = [
  ['t', 1024 ** 4],
  ['g', 1024 ** 3],
  ['m', 1024 ** 2],
  ['k', 1024]
];

/** A size as the form shows it: `2g` for 2147483648, strings as they are. */
function sizeText(value: unknown): string {
  if (typeof value === 'number' && Number.isInteger(value) && value > 0) {
    for (const [unit, bytes] of SIZE_UNITS) {
      if (value % bytes === 0) {
        return `${value / bytes}${unit}`;
      }
    }
  }
  return value === undefined || value === null ? '' : String(value);
}

/** A duration as the form shows it: `20m` for 1200, strings as they are. */
function durationText(value: unknown): string {
  if (typeof value === 'number' && Number.isInteger(value) && value > 0) {
    if (value % 3600 === 0) {
      return `${value / 3600}h`;
    }
    return value % 60 === 0 ? `${value / 60}m` : `${value}s`;
  }
  return value === undefined || value === null ? '' : String(value);
}

/** A command as the form shows it: a string as is, a list as JSON. */
function commandText(value: unknown): string {
  if (Array.isArray(value)) {
    return JSON.stringify(value);
  }
  return typeof value === 'string' ? value : '';
}

/** The command typed: a JSON list of strings is a list (run as given), anything else a string. */
function parseCommand(text: string): string | string[] | undefined {
  const trimmed = text.trim();
  if (trimmed === '') {
    return undefined;
  }
  if (trimmed.startsWith('[')) {
    try {
      const list = JSON.parse(trimmed);
      if (Array.isArray(list) && list.every(item => typeof item === 'string')) {
        return list;
      }
    } catch {
      // not JSON: a shell command that starts with "["
    }
  }
  return text.replace(/\s+$/, '');
}

function envText(value: unknown): string {
  if (!value || typeof value !== 'object') {
    return '';
  }
  return Object.entries(value as Record<string, unknown>)
    .map(([key, val]) => `${key}=${val}`)
    .join('\n');
}

/** KEY=VALUE lines (blank lines and `#` comments skipped) as a map. */
function parseEnv(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  text.split('\n').forEach((raw, index) => {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '' || line.trim().startsWith('#')) {
      return;
    }
    const eq = line.indexOf('=');
    const key = eq > 0 ? line.slice(0, eq).trim() : '';
    if (!key) {
      throw new Error(`environment, line ${index + 1}: write KEY=VALUE`);
    }
    env[key] = line.slice(eq + 1);
  });
  return env;
}

/** A labelled field of the form. */
function field(label: string, control: HTMLElement, hint?: string): HTMLLabelElement {
  const wrap = element('label', 'jcq-field');
  wrap.appendChild(element('span', 'jcq-field-label', label));
  wrap.appendChild(control);
  if (hint) {
    wrap.appendChild(element('span', 'jcq-field-hint', hint));
  }
  return wrap;
}

function input(name: string, value: string, placeholder = '', type = 'text'): HTMLInputElement {
  const el = element('input', 'jcq-input');
  el.type = type;
  el.name = name;
  el.value = value;
  el.placeholder = placeholder;
  el.spellcheck = false;
  el.autocomplete = 'off';
  return el;
}

function textarea(name: string, value: string, placeholder: string, rows: number) {
  const el = element('textarea', 'jcq-input');
  el.name = name;
  el.value = value;
  el.placeholder = placeholder;
  el.rows = rows;
  el.spellcheck = false;
  return el;
}

export function renderEditor(options: EditorOptions): EditorHandle {
  const { source } = options;
  const base: Definition = structuredClone(options.definition ?? {});
  const requirements: Definition = base.requirements ?? {};
  const initialDuration = base.maxDuration ?? requirements.maxDuration;
  const initialInputs: Definition = base.inputs ?? {};

  const form = element('form', 'jcq-editor');
  form.noValidate = true;
  const title = element('div', 'jcq-editor-title', options.onBack ? 'Edit and submit' : 'New job');

  // The build of an image-less definition is kept as is (the form does not edit Dockerfiles).
  const imageName = typeof base.image === 'string' ? base.image : '';
  const image = input('image', imageName, 'python:3.12-slim');
  const command = textarea(
    'command',
    commandText(base.command),
    'python3 -c "print(42)"   or a JSON list: ["python3", "-c", "print(42)"]',
    3
  );
  const files = input('files', '', '', 'file');
  files.multiple = true;
  const env = textarea('env', envText(base.env), 'KEY=VALUE, one a line', 2);
  const cpus = input('cpus', requirements.cpus?.toString() ?? '', 'any', 'number');
  cpus.min = '0';
  cpus.step = 'any';
  const memory = input('memory', sizeText(requirements.memory), 'e.g. 512m, 4g');
  const gpus = input('gpus', requirements.gpus?.toString() ?? '', '0', 'number');
  gpus.min = '0';
  gpus.step = '1';
  const duration = input('maxDuration', durationText(initialDuration), 'e.g. 90s, 20m, 2h');
  const queue = input('queue', options.queue, 'local');
  const initial = new Map<HTMLInputElement | HTMLTextAreaElement, string>(
    [image, command, env, cpus, memory, gpus, duration].map(el => [el, el.value])
  );
  const changed = (el: HTMLInputElement | HTMLTextAreaElement) => el.value !== initial.get(el);

  // Inputs of the definition being edited: kept unless removed (or replaced by a file).
  const removed = new Set<string>();
  const kept = element('ul', 'jcq-editor-inputs');
  for (const path of Object.keys(initialInputs).sort()) {
    const item = element('li', 'jcq-editor-input');
    const name = element('span', 'jcq-editor-input-name', path);
    const remove = button('jcq-editor-input-remove', 'Remove', () => {
      const gone = !removed.has(path);
      if (gone) {
        removed.add(path);
      } else {
        removed.delete(path);
      }
      item.classList.toggle('jcq-mod-removed', gone);
      remove.textContent = gone ? 'Keep' : 'Remove';
    });
    item.append(name, remove);
    kept.appendChild(item);
  }
  const chosen = element('ul', 'jcq-editor-files');
  files.addEventListener('change', () => {
    chosen.replaceChildren(
      ...[...(files.files ?? [])].map(file =>
        element('li', undefined, `${file.name} (${formatBytes(file.size)})`)
      )
    );
  });
  const filesBox = element('div', 'jcq-editor-filebox');
  filesBox.append(kept, files, chosen);

  const resources = element('div', 'jcq-editor-row');
  resources.append(
    field('CPUs', cpus),
    field('Memory', memory),
    field('GPUs', gpus),
    field('Max duration', duration),
    field('Queue', queue)
  );

  const error = element('div', 'jcq-editor-error');
  error.setAttribute('role', 'alert');
  error.hidden = true;
  const status = element('span', 'jcq-editor-status');
  const submit = element('button', 'jcq-button jcq-mod-accept jcq-editor-submit', 'Submit');
  submit.type = 'submit';
  const actions = element('div', 'jcq-editor-actions');
  actions.append(submit);
  if (options.onBack) {
    actions.append(button('jcq-editor-back', 'Back', () => options.onBack?.()));
  }
  actions.append(status);

  const imageHint =
    base.build && !base.image ? 'empty: keep building the image from its Dockerfile' : undefined;
  form.append(
    title,
    field('Image', image, imageHint),
    field('Command', command, 'run by /bin/sh -c when it has shell syntax'),
    field('Input files', filesBox, 'saved under /inputs in the container'),
    field('Environment', env),
    resources,
    error,
    actions
  );

  const showError = (text: string | null) => {
    error.textContent = text ?? '';
    error.hidden = !text;
  };

  /** The definition the form describes (throws when a field is wrong). */
  const definition = (): Definition => {
    const out: Definition = structuredClone(base);
    if (changed(image)) {
      const value = image.value.trim();
      if (value) {
        out.image = value;
        delete out.build;
      } else {
        delete out.image;
      }
    }
    if (!out.image && !out.build) {
      throw new Error('image: name the container image to run');
    }
    if (changed(command)) {
      const value = parseCommand(command.value);
      put(out, 'command', value);
    }
    if (changed(env)) {
      const value = parseEnv(env.value);
      put(out, 'env', value);
    }
    const req: Definition = { ...(out.requirements ?? {}) };
    if (changed(cpus)) {
      const value = cpus.value.trim();
      const number = Number(value);
      if (value && !(number > 0)) {
        throw new Error('cpus: a number above 0, e.g. 2 or 0.5');
      }
      put(req, 'cpus', value ? number : undefined);
    }
    if (changed(memory)) {
      const value = memory.value.trim();
      put(req, 'memory', value);
    }
    if (changed(gpus)) {
      const value = gpus.value.trim();
      const number = Number(value);
      if (value && !(Number.isInteger(number) && number >= 0)) {
        throw new Error('gpus: a whole number');
      }
      put(req, 'gpus', value ? number : undefined);
    }
    if (changed(duration)) {
      delete req.maxDuration; // the seed's spelling: ours is the top-level field
      const value = duration.value.trim();
      put(out, 'maxDuration', /^\d+$/.test(value) ? Number(value) : value);
    }
    put(out, 'requirements', req);
    return out;
  };

  const readFiles = async (): Promise<InputFile[]> =>
    Promise.all(
      [...(files.files ?? [])].map(async file => ({
        name: file.name,
        data: new Uint8Array(await file.arrayBuffer())
      }))
    );

  let busy = false;
  form.addEventListener('submit', event => {
    event.preventDefault();
    if (busy) {
      return;
    }
    let job: Definition;
    try {
      job = definition();
    } catch (err) {
      showError(errorText(err));
      return;
    }
    busy = true;
    submit.disabled = true;
    showError(null);
    status.textContent = 'Submitting…';
    void (async () => {
      try {
        const uploads = await readFiles();
        const inputs: Definition = { ...(job.inputs ?? {}) };
        for (const path of removed) {
          delete inputs[path];
        }
        for (const file of uploads) {
          delete inputs[file.name]; // the file chosen replaces the input of that name
        }
        put(job, 'inputs', inputs);
        await source.submit(job, { queue: queue.value.trim() || options.queue, files: uploads });
        status.textContent = '';
        options.onSubmitted();
      } catch (err) {
        status.textContent = '';
        showError(errorText(err));
      } finally {
        busy = false;
        submit.disabled = false;
      }
    })();
  });

  return {
    node: form,
    showError,
    dispose: () => form.remove()
  };
}
