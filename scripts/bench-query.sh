#!/usr/bin/env bash
# make bench-query: the read API against a year of data for 10,000 videos.
# 1. `query_bench load` generates a year of events_raw inside ClickHouse (50M events over
#    10,000 videos, skewed, plus 10M views of one popular video, heavy000) and the minute, hour
#    and day tables from it (once; the database bench_query is kept for later runs).
# 2. Stats need event_stats' states: loadgen produces 2M events (Zipf over the same 10,000
#    videos) and event_stats counts them (recent minutes only: the job refuses events older
#    than 7 days).
# 3. 100 concurrent clients over random ranges per read call, 1 client for views, views without
#    the hot cache, then the same views as plain SQL over events_raw (100 clients and 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
DB=${BENCH_DATABASE:-bench_query}
SECONDS_EACH=${BENCH_SECONDS:-15}
CLIENTS=${BENCH_CLIENTS:-100}
PORT=${BENCH_QUERY_PORT:-18091}
CH=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
cd "$ROOT"

echo "bench-query: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, database $DB, ${CLIENTS} clients, ${SECONDS_EACH}s per run"
"$BIN/query_bench" --database "$DB" load
stats_rows=$(curl -fsS "$CH/?database=$DB" --data-binary "SELECT count() FROM stats_minute")
if [ "$stats_rows" = 0 ]; then
    TOPIC="bench-query-$(date +%s)"
    services/kafka/topic.sh "$TOPIC" 8 >/dev/null
    echo "bench-query: 2,000,000 events through event_stats for the stats call"
    "$BIN/loadgen" --topic "$TOPIC" --events 2000000 --videos 10000 --seed 7 >/dev/null
    RUST_LOG=warn "$BIN/event_stats" --topic "$TOPIC" --database "$DB" --workers 2 --until-caught-up
fi
curl -fsS "$CH/?database=$DB" --data-binary \
    "SELECT 'rows: events_raw ' || toString((SELECT count() FROM events_raw)) || ', minute ' || toString((SELECT count() FROM event_counts_minute)) || ', hour ' || toString((SELECT count() FROM event_counts_hour)) || ', day ' || toString((SELECT count() FROM event_counts_day)) || ', stats_minute ' || toString((SELECT count() FROM stats_minute))"

serve() {
    # shellcheck disable=SC2068
    RUST_LOG=warn "$BIN/query" --database "$DB" --listen "127.0.0.1:$PORT" $@ >"$ROOT/var/bench-query.log" 2>&1 &
    QUERY=$!
    for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null && break; sleep 0.2; done
}
stop() { kill "$QUERY" 2>/dev/null || true; wait "$QUERY" 2>/dev/null || true; }
trap stop EXIT

serve
for call in views count stats; do
    "$BIN/query_bench" --database "$DB" run --url "http://127.0.0.1:$PORT" --call "$call" --clients "$CLIENTS" --seconds "$SECONDS_EACH"
done
echo "bench-query: views with 1 client (the latency of one request, without queueing)"
"$BIN/query_bench" --database "$DB" run --url "http://127.0.0.1:$PORT" --call views --clients 1 --seconds "$SECONDS_EACH"
echo "bench-query: views of heavy000 (10M views over the year), 100 clients and 1"
"$BIN/query_bench" --database "$DB" run --url "http://127.0.0.1:$PORT" --call views --video heavy000 --clients "$CLIENTS" --seconds "$SECONDS_EACH"
"$BIN/query_bench" --database "$DB" run --url "http://127.0.0.1:$PORT" --call views --video heavy000 --clients 1 --seconds "$SECONDS_EACH"
stop
echo "bench-query: views again without the hot cache (--no-hot-cache)"
serve --no-hot-cache
"$BIN/query_bench" --database "$DB" run --url "http://127.0.0.1:$PORT" --call views --clients "$CLIENTS" --seconds "$SECONDS_EACH"
stop
echo "bench-query: the same views as plain SQL over events_raw"
"$BIN/query_bench" --database "$DB" run --call raw-sql --clients "$CLIENTS" --seconds "$SECONDS_EACH"
"$BIN/query_bench" --database "$DB" run --call raw-sql --clients 1 --seconds "$SECONDS_EACH"
"$BIN/query_bench" --database "$DB" run --call raw-sql --video heavy000 --clients "$CLIENTS" --seconds "$SECONDS_EACH"
"$BIN/query_bench" --database "$DB" run --call raw-sql --video heavy000 --clients 1 --seconds "$SECONDS_EACH"
