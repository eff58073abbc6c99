#!/usr/bin/env bash
# Starts view_counts, event_stats, the ingest service and the query service in the background
# on $TOPIC and $CLICKHOUSE_DATABASE (each unless it runs already), with the jobs' metrics on
# 127.0.0.1:9101 and :9102, and waits until ingest and query answer. Used by run-job,
# load-test and stress-test; `make stop-job` stops them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/stack-env.sh"

for job in view_counts event_stats ingest query; do
    if [ -f "$VAR/$job.pid" ] && kill -0 "$(cat "$VAR/$job.pid")" 2>/dev/null; then
        echo "start-stack: $job already running (pid $(cat "$VAR/$job.pid"))"
    else
        if [ "$job" = ingest ]; then
            args=(--topic "$TOPIC" --listen "$INGEST_LISTEN")
        elif [ "$job" = query ]; then
            args=(--database "$DB" --listen "$QUERY_LISTEN" --ui-dir "$ROOT/ui/dist" --ingest-url "http://$INGEST_LISTEN"
                --job-metrics-url http://127.0.0.1:9101,http://127.0.0.1:9102)
        elif [ "$job" = view_counts ]; then
            args=(--topic "$TOPIC" --database "$DB" --workers "$WORKERS" --metrics-listen 127.0.0.1:9101)
        else
            args=(--topic "$TOPIC" --database "$DB" --workers "$WORKERS" --metrics-listen 127.0.0.1:9102)
        fi
        nohup "$BIN/$job" "${args[@]}" >"$VAR/$job.log" 2>&1 </dev/null &
        echo $! >"$VAR/$job.pid"
        echo "start-stack: $job started (pid $!, log var/$job.log)"
    fi
done

for url in "http://$INGEST_LISTEN/readyz" "http://$QUERY_LISTEN/readyz"; do
    for _ in $(seq 1 150); do curl -fsS -o /dev/null "$url" 2>/dev/null && break; sleep 0.2; done
    curl -fsS -o /dev/null "$url" || { echo "start-stack: $url does not answer; see var/*.log" >&2; exit 1; }
done
