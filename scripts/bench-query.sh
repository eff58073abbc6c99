#!/usr/bin/env bash
# make bench-query: the read API against a year of data for 10,000 videos.
# 1. `query_bench load` generates a year of events_raw inside ClickHouse (50M events over
#    10,000 videos, skewed, plus 10M views of one popular video, heavy000) and the minute, hour
#    and day tables from it (once; the database bench_query is kept for later runs).
# 2. Stats need event_stats' states: loadgen produces 2M events (Zipf over the same 10,000
#    videos) and event_stats counts them (recent minutes only: the job refuses events older
#    than 7 days).
# 3. The service warms up (its own warm-up, then every video asked for once), then 100 concurrent clients (and 1) over
#    random ranges of whole minutes (answered from memory) and of milliseconds (their edges from
#    events_raw), per read call; millisecond ranges of the last hour while view_counts counts a
#    live feed into it (edges from memory); then views without memory, then the same views as
#    plain SQL over events_raw.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BENCH_BIN:-$ROOT/target/release}"
DB=${BENCH_DATABASE:-bench_query}
SECONDS_EACH=${BENCH_SECONDS:-15}
CLIENTS=${BENCH_CLIENTS:-100}
PORT=${BENCH_QUERY_PORT:-18091}
CH=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
# Events/s view_counts counts into the last hour during the hot-window runs.
LIVE_RATE=${BENCH_LIVE_RATE:-2000}
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
echo "bench-query: warm-up: the service's own (it starts with it), then every video's views asked for once, until memory holds them all"
"$BIN/query_bench" --database "$DB" warm --url "http://127.0.0.1:$PORT"
# run CLIENTS ARGS...: one measured run against the service.
run() { local clients=$1; shift; "$BIN/query_bench" --database "$DB" run --url "http://127.0.0.1:$PORT" --clients "$clients" --seconds "$SECONDS_EACH" "$@"; }
echo "bench-query: whole-minute ranges (from memory alone), 100 clients and 1, random videos and heavy000"
run "$CLIENTS" --call views --aligned
run "$CLIENTS" --call count --aligned
run 1 --call views --aligned
run "$CLIENTS" --call views --aligned --video heavy000
echo "bench-query: millisecond ranges (whole minutes from memory, the edges from events_raw)"
run "$CLIENTS" --call views
run 1 --call views
run "$CLIENTS" --call views --video heavy000
echo "bench-query: millisecond ranges inside the last hour while view_counts counts ${LIVE_RATE} events/s into it (edges from the event times memory keeps; the first run reads them)"
# The topic event_stats counted (a database holds the counts of one topic): view_counts counts
# its events first (once: later runs resume), then the live feed.
LIVE_TOPIC=$(curl -fsS "$CH/?database=$DB" --data-binary "SELECT any(topic) FROM checkpoint_commits WHERE job = 'event_stats'")
[ -n "$LIVE_TOPIC" ] || { echo "bench-query: no event_stats topic in $DB" >&2; exit 1; }
RUST_LOG=warn "$BIN/view_counts" --topic "$LIVE_TOPIC" --database "$DB" --workers 1 >"$ROOT/var/bench-query-job.log" 2>&1 &
LIVE_JOB=$!
"$BIN/loadgen" --topic "$LIVE_TOPIC" --rate "$LIVE_RATE" --duration $((SECONDS_EACH * 3 + 150)) --videos 10000 --seed 9 \
    --malformed-fraction 0 --duplicate-fraction 0 >/dev/null &
LIVE_FEED=$!
# Caught up with the topic once its commits are those of the live feed: the newest one is
# from the last few seconds.
live_behind() { curl -fsS "$CH/?database=$DB" --data-binary "SELECT toUInt64(now() - max(committed_at)) FROM checkpoint_commits WHERE job = 'view_counts' AND topic = '$LIVE_TOPIC'"; }
LIVE_FROM=$(curl -fsS "$CH/?database=$DB" --data-binary "SELECT toUInt64(max(epoch)) FROM checkpoint_commits WHERE job = 'view_counts'")
for _ in $(seq 1 240); do
    [ "$(curl -fsS "$CH/?database=$DB" --data-binary "SELECT count() FROM checkpoint_commits WHERE job = 'view_counts' AND epoch > $LIVE_FROM")" -gt 5 ] \
        && [ "$(live_behind)" -le 3 ] && break
    sleep 0.5
done
[ "$(live_behind)" -le 3 ] || { echo "bench-query: view_counts did not commit the live feed (var/bench-query-job.log)" >&2; exit 1; }
run "$CLIENTS" --call views --hot
run "$CLIENTS" --call views --hot
run 1 --call views --hot
echo "bench-query: $(curl -fsS "$CH/?database=$DB" --data-binary "SELECT toString(count()) || ' epochs committed during the runs, ' || toString(sum(rows)) || ' changelog rows, ' || toString(sum(events)) || ' events' FROM (SELECT epoch, count() AS rows, sum(count) AS events FROM count_changes WHERE epoch > $LIVE_FROM AND epoch IN (SELECT epoch FROM checkpoint_commits WHERE job = 'view_counts') GROUP BY epoch)")"
kill "$LIVE_FEED" 2>/dev/null || true
kill -TERM "$LIVE_JOB" 2>/dev/null || true
wait "$LIVE_FEED" "$LIVE_JOB" 2>/dev/null || true
echo "bench-query: stats from memory: the service's stats warm-up, then every video's watch-time p50 and distinct viewers asked for once (a key the warm-up did not take loads on its first request), then the runs"
"$BIN/query_bench" --database "$DB" warm-stats --url "http://127.0.0.1:$PORT"
run "$CLIENTS" --call stats
run "$CLIENTS" --call uniq
run 1 --call stats
stop
echo "bench-query: views and stats again without memory (--no-memory)"
serve --no-memory
run "$CLIENTS" --call views --aligned
run "$CLIENTS" --call views
run "$CLIENTS" --call stats
run "$CLIENTS" --call uniq
run 1 --call stats
stop
echo "bench-query: the same views as plain SQL over events_raw"
run "$CLIENTS" --call raw-sql --aligned
run 1 --call raw-sql --aligned
run "$CLIENTS" --call raw-sql
run "$CLIENTS" --call raw-sql --video heavy000
