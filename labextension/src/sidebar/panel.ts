// The sidebar's body: the queues this browser follows (`local` first, then those added by
// name, remembered in localStorage), each a QueueSection, and a form to add one.
import type { HostApi, Run } from './api';
import { el } from './dom';
import { QueueSection } from './queue';

const STORAGE_KEY = 'jupyter-compute-queue:queues';
const QUEUE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

function remembered(): string[] {
  try {
    const value = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? '[]');
    return Array.isArray(value) ? value.filter(q => typeof q === 'string' && QUEUE_NAME.test(q)) : [];
  } catch {
    return [];
  }
}

export class QueuesPanel {
  readonly node: HTMLElement;
  private readonly sections = new Map<string, QueueSection>();
  private readonly list: HTMLElement;
  private readonly problem: HTMLElement;

  constructor(
    private readonly api: HostApi,
    private readonly openRun: (run: Run) => void
  ) {
    this.node = el('div', 'jcq-sidebar-body');
    this.list = el('div', 'jcq-queues');
    this.problem = el('p', 'jcq-add-queue-error');
    this.node.append(el('h3', 'jcq-sidebar-title', 'Compute queues'), this.addForm(), this.problem, this.list);
    for (const queue of ['local', ...remembered().filter(q => q !== 'local')]) {
      this.show(queue);
    }
  }

  /** Follow `queue` (and remember it); false with a message for an invalid name. */
  add(queue: string): boolean {
    const name = queue.trim();
    if (!QUEUE_NAME.test(name)) {
      this.problem.textContent =
        `${JSON.stringify(name)} is not a queue name: 1 to 128 letters, digits, '.', '_' or '-'.`;
      return false;
    }
    this.problem.textContent = '';
    this.show(name);
    this.save();
    return true;
  }

  remove(queue: string): void {
    this.sections.get(queue)?.dispose();
    this.sections.delete(queue);
    this.save();
  }

  dispose(): void {
    this.sections.forEach(section => section.dispose());
    this.sections.clear();
  }

  private show(queue: string): void {
    if (this.sections.has(queue)) {
      return;
    }
    const section = new QueueSection(queue, this.api, {
      open: run => this.openRun(run),
      remove: name => this.remove(name)
    });
    this.sections.set(queue, section);
    this.list.append(section.node);
  }

  private save(): void {
    const queues = [...this.sections.keys()].filter(q => q !== 'local');
    localStorage.setItem(STORAGE_KEY, JSON.stringify(queues));
  }

  private addForm(): HTMLElement {
    const form = el('form', 'jcq-add-queue');
    const input = el('input', 'jcq-add-queue-name');
    input.placeholder = 'Add a queue by name';
    input.setAttribute('aria-label', 'Queue name');
    const button = el('button', 'jcq-add-queue-button', 'Add');
    button.type = 'submit';
    form.append(input, button);
    form.addEventListener('submit', event => {
      event.preventDefault();
      if (this.add(input.value)) {
        input.value = '';
      }
    });
    return form;
  }
}
