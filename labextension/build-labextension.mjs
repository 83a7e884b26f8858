// Builds the prebuilt JupyterLab extension into ../jupyter_compute_queue/labextension.
//
// This is what `jupyter labextension build .` runs, without needing Python: the builder
// (@jupyter/builder) and JupyterLab's core metadata (@jupyterlab/core-meta, which pins the
// shared packages) both come from node_modules, so the build works offline and inside the
// isolated Python build environment. Extra arguments (--development, --watch) are passed on.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, 'package.json'));
const builderDir = path.dirname(require.resolve('@jupyter/builder/package.json'));
const builder = path.join(builderDir, 'lib', 'build-labextension.js');
const coreMeta = require.resolve('@jupyterlab/core-meta/core.package.json');

const args = [builder, '--core-package-file', coreMeta, ...process.argv.slice(2), here];
const result = spawnSync(process.execPath, args, { cwd: here, stdio: 'inherit' });
process.exit(result.status ?? 1);
