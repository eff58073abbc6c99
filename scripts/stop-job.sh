#!/usr/bin/env bash
# Stops what run-job.sh started: SIGTERM, so each job flushes and records its offsets and the
# services answer the requests in flight.
set -uo pipefail
SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/stop-lib.sh
source "$SCRIPTS/stop-lib.sh"
for job in query ingest view_counts event_stats; do
    stop_pidfile stop-job "$job" "$SCRIPTS/../var/$job.pid"
done
