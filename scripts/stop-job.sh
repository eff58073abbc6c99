#!/usr/bin/env bash
# Stops what run-job.sh started: SIGTERM, so each job flushes and records its offsets and the
# services answer the requests in flight.
set -uo pipefail
VAR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/var"
for job in query ingest view_counts event_stats; do
    PIDFILE="$VAR/$job.pid"
    [ -f "$PIDFILE" ] || continue
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        echo "stop-job: stopping $job (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop-job: $job did not stop within 60s; killing it (a restart re-runs its open epochs)"
            kill -9 "$pid"
        fi
    fi
    rm -f "$PIDFILE"
done
