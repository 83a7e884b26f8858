// Builds the job widget's front end: one ES module, jupyter_compute_queue/notebook/static/widget.js,
// that anywidget loads as `_esm` (and the job page's, jupyter_compute_queue/server/static/page.js). Every dependency is bundled in (nothing from a CDN), and CSS
// is imported as text and injected by the code (src/style.ts), so the bundle stays one file.
// esbuild's JS API, not its command: it needs no bin link nor install script.
import * as esbuild from 'esbuild';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

// Two bundles: the widget (anywidget's _esm) and the job page's script (served as ui/page.js).
// Each beside the Python module that serves it: the widget with notebook/, the page with server/.
for (const [entry, out] of [
  ['src/widget.ts', 'notebook/static/widget.js'],
  ['src/page.ts', 'server/static/page.js']
]) {
await esbuild.build({
  absWorkingDir: here,
  entryPoints: [entry],
  outfile: `../jupyter_compute_queue/${out}`,
  bundle: true,
  format: 'esm',
  target: 'es2020',
  minify: !process.argv.includes('--development'),
  sourcemap: process.argv.includes('--development') ? 'inline' : false,
  loader: { '.css': 'text' },
  legalComments: 'none',
  logLevel: 'info'
});
}
