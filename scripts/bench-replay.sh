#!/usr/bin/env bash
# make bench-replay: `videocount replay` over a year of events_raw.
# 1. `query_bench load` generates a year of events_raw inside ClickHouse (BENCH_REPLAY_EVENTS,
#    20M by default, over 10,000 videos) and the count tables from it, in database
#    bench_replay (kept for later runs), and a checkpoint that has committed all of it.
# 2. The replay recomputes the minute, hour and day tables from events_raw and swaps them in,
#    timed; the same three GROUP BYs as plain SQL (without writing) give the floor to compare
#    with, measured in the same run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
DB=${BENCH_REPLAY_DATABASE:-bench_replay}
EVENTS=${BENCH_REPLAY_EVENTS:-20000000}
TOPIC=bench-replay
CH=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
cd "$ROOT"
sql() { curl -fsS "$CH/?database=$DB" --data-binary "$1"; }

echo "bench-replay: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, database $DB, $EVENTS events over a year"
"$BIN/query_bench" --database "$DB" load --events "$EVENTS" --heavy-events 0
if [ "$(sql "SELECT count() FROM checkpoint_commits")" = 0 ]; then
    # Everything in events_raw is committed: one snapshot at the first epoch of generation 1.
    sql "INSERT INTO checkpoint_snapshots SELECT 'view_counts', '$TOPIC', 4294967296, partition, max(offset) + 1 FROM events_raw GROUP BY partition"
    sql "INSERT INTO checkpoint_commits VALUES ('view_counts', '$TOPIC', 4294967296, now())"
fi
raw=$(sql "SELECT count() FROM events_raw")

floor_started=$(date +%s.%N)
for bucket in "toStartOfMinute(toDateTime(intDiv(ts, 1000), 'UTC'))" "toStartOfHour(toDateTime(intDiv(ts, 1000), 'UTC'))" "toDate(toDateTime(intDiv(ts, 1000), 'UTC'))"; do
    sql "SELECT count() FROM (SELECT video_id, event_type, $bucket AS b, count() FROM events_raw GROUP BY video_id, event_type, b)" >/dev/null
done
floor=$(awk -v a="$floor_started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')

started=$(date +%s.%N)
RUST_LOG=warn "$BIN/videocount" --database "$DB" replay --topic "$TOPIC"
took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
awk -v raw="$raw" -v took="$took" -v floor="$floor" 'BEGIN {
    printf "bench-replay: %d raw events replayed in %.1f s (%.0f events/s); the three GROUP BYs alone (plain SQL, no writes) %.1f s: replay/plain %.2f\n", raw, took, raw / took, floor, took / floor
}'
sql "SELECT 'rows after the replay: minute ' || toString((SELECT count() FROM event_counts_minute)) || ', hour ' || toString((SELECT count() FROM event_counts_hour)) || ', day ' || toString((SELECT count() FROM event_counts_day)) || ', events ' || toString((SELECT sum(count) FROM event_counts_day))"
