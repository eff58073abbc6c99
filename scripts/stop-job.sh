#!/usr/bin/env bash
# Stops a view_counts started by run-job.sh: SIGTERM, so it flushes and records offsets.
set -uo pipefail
PIDFILE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/var/view_counts.pid"
[ -f "$PIDFILE" ] || exit 0
pid=$(cat "$PIDFILE")
if kill -0 "$pid" 2>/dev/null; then
    echo "stop-job: stopping view_counts (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "stop-job: view_counts did not stop within 60s; killing it (a restart re-runs its open epochs)"
        kill -9 "$pid"
    fi
fi
rm -f "$PIDFILE"
