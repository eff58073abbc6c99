#!/usr/bin/env bash
# make load-test RATE=r DURATION=d: starts the stack if it is not running (start-stack.sh), then
# drives the write API at RATE events/s for DURATION seconds through the client library and
# checks every accepted event through the read API (load_test run). The stack keeps running:
# `make stop-job` stops it. LOAD_TEST_ARGS adds flags (see `target/release/load_test run --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/start-stack.sh"
exec "$ROOT/target/release/load_test" run --rate "${RATE:-2000}" --duration "${DURATION:-30}" \
    --ingest-url "http://${VIDEOCOUNT_INGEST_LISTEN:-127.0.0.1:8080}" \
    --query-url "http://${VIDEOCOUNT_QUERY_LISTEN:-127.0.0.1:8081}" ${LOAD_TEST_ARGS:-}
