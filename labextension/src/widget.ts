// The anywidget front end (jupyter_compute_queue/static/widget.js, one ES module): the job view
// fed through the kernel. The other exports let a page without a kernel (the job page, the
// browser tests) use the same bundle with a HostJobSource.
import type { AnyModel, RenderProps } from '@anywidget/types';

import css from '../style/job.css';
import { KernelJobSource } from './kernel';
import { injectStyle } from './style';
import { renderJob } from './view';

export { HostJobSource } from './host';
export { KernelJobSource } from './kernel';
export { LogCursor, emptySnapshot, recordEnd } from './source';
export { renderJob } from './view';

function render({ model, el }: Pick<RenderProps, 'model' | 'el'>): () => void {
  injectStyle('jupyter-compute-queue-job-style', css);
  const source = new KernelJobSource(model as AnyModel);
  const remove = renderJob(el, source);
  // The kernel side (widget.py) waits for this to know a front end shows the widget.
  model.send({ type: 'rendered' });
  return () => {
    remove();
    source.dispose();
  };
}

export default { render };
