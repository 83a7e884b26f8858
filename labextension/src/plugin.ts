// The JupyterLab plugin. For now it adds the compute-queue panel to the left sidebar, saying it
// is loading: the real sidebar (queues, workers, runs) comes with the sidebar issue.
import {
  ILayoutRestorer,
  type JupyterFrontEnd,
  type JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

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

function createSidebar(): Widget {
  const sidebar = new Widget();
  sidebar.id = SIDEBAR_ID;
  sidebar.addClass('jcq-sidebar');
  sidebar.title.icon = queueIcon;
  sidebar.title.label = 'Compute queues';
  sidebar.title.caption = 'Compute queues';
  const loading = document.createElement('p');
  loading.className = 'jcq-sidebar-loading';
  loading.textContent = 'Loading compute queues…';
  sidebar.node.appendChild(loading);
  return sidebar;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-compute-queue:plugin',
  description: 'Compute queues: the sidebar.',
  autoStart: true,
  optional: [ILayoutRestorer],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null) => {
    const sidebar = createSidebar();
    app.shell.add(sidebar, 'left', { rank: 800 });
    restorer?.add(sidebar, SIDEBAR_ID);
  }
};

export default plugin;
