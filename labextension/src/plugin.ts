// The JupyterLab plugin: the compute-queue sidebar (queues, workers, runs) in the left area,
// and a run opened from it as the job view in the main area.
import {
  ILayoutRestorer,
  type JupyterFrontEnd,
  type JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import css from '../style/job.css';
import { HostJobSource } from './host';
import { HostApi, type Run } from './sidebar/api';
import { QueuesPanel } from './sidebar/panel';
import { injectStyle } from './style';
import { renderJob } from './view';

/** The sidebar panel's id (also its tab's `data-id`). */
export const SIDEBAR_ID = 'jupyter-compute-queue:sidebar';

// Three stacked boxes: a queue.
const queueIcon = new LabIcon({
  name: 'jupyter-compute-queue:queue',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">' +
    '<g class="jp-icon3" fill="#616161">' +
    '<rect x="3" y="3" width="18" height="5" rx="1"/>' +
    '<rect x="3" y="9.5" width="18" height="5" rx="1"/>' +
    '<rect x="3" y="16" width="18" height="5" rx="1"/>' +
    '</g></svg>'
});

/** A run in the main area: the job view fed from the host. */
class RunWidget extends Widget {
  private readonly source: HostJobSource;
  private readonly remove: () => void;

  constructor(api: HostApi, run: Run) {
    super();
    this.id = `jupyter-compute-queue:run:${run.runId}`;
    this.addClass('jcq-run-panel');
    this.title.label = `Job ${run.jobId.slice(0, 8)}`;
    this.title.caption = `Job ${run.jobId} on queue ${run.queue}`;
    this.title.icon = queueIcon;
    this.title.closable = true;
    this.source = new HostJobSource({
      baseUrl: api.baseUrl,
      wsUrl: api.wsUrl,
      queue: run.queue,
      jobId: run.jobId
    });
    this.remove = renderJob(this.node, this.source);
  }

  dispose(): void {
    this.remove();
    this.source.dispose();
    super.dispose();
  }
}

function createSidebar(app: JupyterFrontEnd): Widget {
  const settings = app.serviceManager.serverSettings;
  const api = new HostApi(settings.baseUrl, settings.wsUrl);
  const sidebar = new Widget();
  sidebar.id = SIDEBAR_ID;
  sidebar.addClass('jcq-sidebar');
  sidebar.title.icon = queueIcon;
  sidebar.title.caption = 'Compute queues';
  const open = (run: Run) => {
    const id = `jupyter-compute-queue:run:${run.runId}`;
    const existing = [...app.shell.widgets('main')].find(w => w.id === id);
    if (existing) {
      app.shell.activateById(id);
      return;
    }
    const widget = new RunWidget(api, run);
    app.shell.add(widget, 'main');
    app.shell.activateById(widget.id);
  };
  const panel = new QueuesPanel(api, open);
  sidebar.node.appendChild(panel.node);
  sidebar.disposed.connect(() => panel.dispose());
  return sidebar;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-compute-queue:plugin',
  description: 'Compute queues: the sidebar with queues, workers and runs.',
  autoStart: true,
  optional: [ILayoutRestorer],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null) => {
    injectStyle('jupyter-compute-queue-job-style', css);
    const sidebar = createSidebar(app);
    app.shell.add(sidebar, 'left', { rank: 800 });
    restorer?.add(sidebar, SIDEBAR_ID);
  }
};

export default plugin;
