#!/usr/bin/env bash
# Starts videocount on the replicated stack (make up-ha), two of everything: ingest-1 and
# ingest-2, query-1 and query-2, and for each job an instance `a` and an instance `b` (one holds
# the lease and counts, the other waits as its standby). Each runs in the background with its
# pid and log under var/ha/apps/<name>/; what runs already is left alone, so running this again
# restarts exactly what died (the chaos test heals with it). Creates the topic (RF 3) and applies
# the schema on both ClickHouse replicas first. `scripts/stop-ha.sh` (make down-ha) stops them.
#
#   ingest-1 127.0.0.1:8180   ingest-2 127.0.0.1:8182   (write API)
#   query-1  127.0.0.1:8181   query-2  127.0.0.1:8183   (read API, UI)
#   view_counts-a/-b metrics 127.0.0.1:9201/9202, event_stats-a/-b 9203/9204
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/stack-env.sh"

HA_APPS="$VAR/ha/apps"
BROKERS=127.0.0.1:9191,127.0.0.1:9192,127.0.0.1:9193
REPLICA_1=http://127.0.0.1:8221
REPLICA_2=http://127.0.0.1:8222
ZOOKEEPER=127.0.0.1:2281,127.0.0.1:2282,127.0.0.1:2283
HA_WORKERS=${HA_WORKERS:-1}
INGESTS=(127.0.0.1:8180 127.0.0.1:8182)
QUERIES=(127.0.0.1:8181 127.0.0.1:8183)

say() { printf 'start-ha: %s\n' "$*"; }
running() { [ -f "$HA_APPS/$1/pid" ] && kill -0 "$(cat "$HA_APPS/$1/pid")" 2>/dev/null; }

# app NAME BINARY ARGS...: starts BINARY unless NAME runs.
app() {
    local name=$1 binary=$2
    shift 2
    mkdir -p "$HA_APPS/$name"
    if running "$name"; then
        return 0
    fi
    nohup "$BIN/$binary" "$@" >>"$HA_APPS/$name/log" 2>&1 </dev/null &
    echo $! >"$HA_APPS/$name/pid"
    say "$name started (pid $!, log var/ha/apps/$name/log)"
}

if [ "${1:-}" != --apps-only ]; then
    KAFKA_BROKERS=$BROKERS "$ROOT/services/kafka/topic.sh" "$TOPIC" "${PARTITIONS:-8}" 3 >/dev/null
    for replica in "$REPLICA_1" "$REPLICA_2"; do
        "$BIN/videocount" --clickhouse-url "$replica" --database "$DB" schema >/dev/null
    done
fi

common=(--brokers "$BROKERS" --topic "$TOPIC" --database "$DB")
lease=(--zookeeper "$ZOOKEEPER")
# The instances list the replicas in different orders, so that reads and writes spread.
app ingest-1 ingest --brokers "$BROKERS" --topic "$TOPIC" --listen "${INGESTS[0]}"
app ingest-2 ingest --brokers "$BROKERS" --topic "$TOPIC" --listen "${INGESTS[1]}"
metrics_urls=http://127.0.0.1:9201,http://127.0.0.1:9202,http://127.0.0.1:9203,http://127.0.0.1:9204
app view_counts-a view_counts "${common[@]}" "${lease[@]}" --clickhouse-url "$REPLICA_1,$REPLICA_2" \
    --workers "$HA_WORKERS" --metrics-listen 127.0.0.1:9201
app view_counts-b view_counts "${common[@]}" "${lease[@]}" --clickhouse-url "$REPLICA_2,$REPLICA_1" \
    --workers "$HA_WORKERS" --metrics-listen 127.0.0.1:9202
app event_stats-a event_stats "${common[@]}" "${lease[@]}" --clickhouse-url "$REPLICA_1,$REPLICA_2" \
    --workers "$HA_WORKERS" --metrics-listen 127.0.0.1:9203
app event_stats-b event_stats "${common[@]}" "${lease[@]}" --clickhouse-url "$REPLICA_2,$REPLICA_1" \
    --workers "$HA_WORKERS" --metrics-listen 127.0.0.1:9204
app query-1 query --database "$DB" --clickhouse-url "$REPLICA_1,$REPLICA_2" --listen "${QUERIES[0]}" \
    --ui-dir "$ROOT/ui/dist" --ingest-url "http://${INGESTS[0]}" --job-metrics-url "$metrics_urls"
app query-2 query --database "$DB" --clickhouse-url "$REPLICA_2,$REPLICA_1" --listen "${QUERIES[1]}" \
    --ui-dir "$ROOT/ui/dist" --ingest-url "http://${INGESTS[1]}" --job-metrics-url "$metrics_urls"

for address in "${INGESTS[@]}" "${QUERIES[@]}"; do
    for _ in $(seq 1 150); do curl -fsS -o /dev/null "http://$address/readyz" 2>/dev/null && break; sleep 0.2; done
    curl -fsS -o /dev/null "http://$address/readyz" || { echo "start-ha: http://$address does not answer; see var/ha/apps/*/log" >&2; exit 1; }
done
