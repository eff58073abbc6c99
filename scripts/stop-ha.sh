#!/usr/bin/env bash
# Stops what start-ha.sh started: SIGTERM (each job flushes and records its offsets; a standby
# just leaves), SIGKILL after 60 s.
set -uo pipefail
APPS="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/var/ha/apps"
for name in query-1 query-2 ingest-1 ingest-2 view_counts-b event_stats-b view_counts-a event_stats-a; do
    pidfile="$APPS/$name/pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        echo "stop-ha: stopping $name (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { echo "stop-ha: $name did not stop within 60 s; killing it"; kill -9 "$pid"; }
    fi
    rm -f "$pidfile"
done
