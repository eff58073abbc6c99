#!/usr/bin/env bash
# Bundles the UI into ui/dist: installs the locked npm packages (chart.js, esbuild,
# playwright-core) when package-lock.json changed, then runs esbuild. Needs npm (`make up`
# installs it); nothing is fetched at run time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../ui"
command -v npm >/dev/null || { echo "ui: error: npm is missing: run \`make up\`" >&2; exit 1; }
if [ ! -f node_modules/.installed ] || [ package-lock.json -nt node_modules/.installed ]; then
    echo "ui: npm ci"
    npm ci --no-audit --no-fund --loglevel=error
    touch node_modules/.installed
fi
node build.mjs
