// Builds the job widget's front end: one ES module, jupyter_compute_queue/static/widget.js,
// that anywidget loads as `_esm`. Every dependency is bundled in (nothing from a CDN), and CSS
// is imported as text and injected by the code (src/style.ts), so the bundle stays one file.
// esbuild's JS API, not its command: it needs no bin link nor install script.
import * as esbuild from 'esbuild';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

await esbuild.build({
  absWorkingDir: here,
  entryPoints: ['src/widget.ts'],
  outfile: '../jupyter_compute_queue/static/widget.js',
  bundle: true,
  format: 'esm',
  target: 'es2020',
  minify: !process.argv.includes('--development'),
  sourcemap: process.argv.includes('--development') ? 'inline' : false,
  loader: { '.css': 'text' },
  legalComments: 'none',
  logLevel: 'info'
});
