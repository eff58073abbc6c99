#!/usr/bin/env bash
# make bench: see scripts/bench.py.
set -euo pipefail
exec python3 "$(dirname "${BASH_SOURCE[0]}")/bench.py" "$@"
