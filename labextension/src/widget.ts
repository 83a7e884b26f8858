// The anywidget front end (jupyter_compute_queue/static/widget.js, one ES module): the job view
// fed through the kernel. The other exports let a page without a kernel (the job page, the
// browser tests) use the same bundle with a HostJobSource.
import type { AnyModel, RenderProps } from '@anywidget/types';

import { KernelJobSource } from './kernel';
import { renderJob } from './view';

export { HostJobSource } from './host';
export { KernelJobSource } from './kernel';
export { LogCursor, emptySnapshot, recordEnd } from './source';
export { injectJobStyles, renderJob } from './view';

function render({ model, el }: Pick<RenderProps, 'model' | 'el'>): () => void {
  const source = new KernelJobSource(model as AnyModel);
  const remove = renderJob(el, source);
  // The kernel side (widget.py) waits for this to know a front end shows the widget.
  source.rendered();
  return () => {
    remove();
    source.dispose();
  };
}

export default { render };
