// Bundles the UI into dist/: app.js (with Chart.js), app.css and index.html. No network at run time.
import { build } from 'esbuild';
import { copyFileSync, mkdirSync, rmSync } from 'node:fs';

rmSync('dist', { recursive: true, force: true });
mkdirSync('dist');
await build({
  entryPoints: ['src/app.js'],
  bundle: true,
  minify: true,
  sourcemap: true,
  target: ['es2020'],
  outfile: 'dist/app.js',
  logLevel: 'warning',
});
copyFileSync('src/app.css', 'dist/app.css');
copyFileSync('index.html', 'dist/index.html');
console.log('ui: built dist/ (index.html, app.js, app.css)');
