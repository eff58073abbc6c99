#!/usr/bin/env bash
# make stress-test: (1) the whole system: load_test stress raises the rate through the write API
# step by step (STRESS_START, x STRESS_FACTOR, STRESS_STEP_SECONDS each) until request p99,
# errors or freshness p99 break their bounds, and says which resource ran out first; (2) the
# job alone: view_counts catching up on a pre-filled topic of STRESS_JOB_EVENTS events
# (scripts/bench.py), its own ceiling with nothing else running.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/start-stack.sh"
echo "== stress test: the whole system, through the write and read APIs"
"$ROOT/target/release/load_test" stress \
    --ingest-url "http://${VIDEOCOUNT_INGEST_LISTEN:-127.0.0.1:8080}" \
    --query-url "http://${VIDEOCOUNT_QUERY_LISTEN:-127.0.0.1:8081}" \
    --start-rate "${STRESS_START:-5000}" --factor "${STRESS_FACTOR:-2}" --duration "${STRESS_STEP_SECONDS:-20}" \
    --p99-bound-ms "${STRESS_P99_MS:-500}" --freshness-bound-s "${STRESS_FRESHNESS_S:-10}" ${STRESS_ARGS:-}
echo
echo "== stress test: view_counts alone, catching up on a pre-filled topic (the services stay idle)"
BENCH_ONLY=view_counts BENCH_EVENTS="${STRESS_JOB_EVENTS:-3000000}" python3 "$ROOT/scripts/bench.py"
