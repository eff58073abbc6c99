#!/usr/bin/env bash
# Starts view_counts in the background on $TOPIC, feeds it demo traffic and shows a count.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR="$ROOT/var"
BIN="$ROOT/target/release"
TOPIC=${TOPIC:-video-events}
DB=${CLICKHOUSE_DATABASE:-video_counts}
WORKERS=${WORKERS:-2}
mkdir -p "$VAR"

if [ -f "$VAR/view_counts.pid" ] && kill -0 "$(cat "$VAR/view_counts.pid")" 2>/dev/null; then
    echo "run-job: view_counts already running (pid $(cat "$VAR/view_counts.pid"))"
else
    nohup "$BIN/view_counts" --topic "$TOPIC" --database "$DB" --workers "$WORKERS" \
        >"$VAR/view_counts.log" 2>&1 </dev/null &
    echo $! >"$VAR/view_counts.pid"
    echo "run-job: view_counts started (pid $!, log var/view_counts.log)"
fi

echo "run-job: producing 20,000 demo events per second for 10 seconds"
"$BIN/loadgen" --topic "$TOPIC" --rate 20000 --duration 10 --videos 500 --seed "$RANDOM"
sleep 3
q() { curl -sS --max-time 10 "${CLICKHOUSE_URL:-http://127.0.0.1:8123}/?database=$DB" --data-binary "$1"; }
echo
echo "Top videos by views in the last 24 hours:"
q "SELECT video_id, sum(count) AS views FROM event_counts_hour WHERE event_type = 'view' AND hour >= now() - INTERVAL 1 DAY GROUP BY video_id ORDER BY views DESC LIMIT 5 FORMAT PrettyCompact"
cat <<MSG

view_counts keeps running on topic $TOPIC (database $DB). Try:
  clickhouse-client --database $DB --query "SELECT sum(count) FROM event_counts_minute WHERE video_id = 'vid000001' AND event_type = 'view'"
  curl -sS '${CLICKHOUSE_URL:-http://127.0.0.1:8123}/?database=$DB' --data-binary "SELECT reason, count() FROM dead_letters GROUP BY reason"
  target/release/loadgen --topic $TOPIC --rate 5000 --duration 60     # more traffic
  tail -f var/view_counts.log                                           # what the job is doing
  make stop-job                                                         # flush, record offsets, stop
MSG
