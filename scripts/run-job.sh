#!/usr/bin/env bash
# Starts view_counts, event_stats, the ingest service and the query service (with the UI) in
# the background on $TOPIC, feeds them demo traffic (Kafka directly and over HTTP) and shows a
# few answers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/stack-env.sh"

"$ROOT/scripts/start-stack.sh"

echo "run-job: producing 20,000 demo events per second for 10 seconds"
"$BIN/loadgen" --topic "$TOPIC" --rate 20000 --duration 10 --videos 500 --seed "$RANDOM"
echo "run-job: sending events over HTTP to the ingest service at http://$INGEST_LISTEN"
curl -fsS -X POST "http://$INGEST_LISTEN/v1/videos/vid000001/views"; echo
curl -fsS -X POST "http://$INGEST_LISTEN/v1/videos/vid000001/events/watch_time/p50" \
    -H 'content-type: application/json' -d '{"value": 312.5, "viewer_id": "demo-viewer"}'; echo
curl -fsS -X POST "http://$INGEST_LISTEN/v1/events" -H 'content-type: application/json' \
    -d '[{"video_id":"vid000002","event_type":"like","viewer_id":"demo"},{"video_id":"bad id"}]'; echo
sleep 3
q() { curl -sS --max-time 10 "${CLICKHOUSE_URL:-http://127.0.0.1:8123}/?database=$DB" --data-binary "$1"; }
echo
echo "Top videos by views in the last 24 hours:"
q "SELECT video_id, sum(count) AS views FROM event_counts_hour WHERE event_type = 'view' AND hour >= now() - INTERVAL 1 DAY GROUP BY video_id ORDER BY views DESC LIMIT 5 FORMAT PrettyCompact"
from=$(( ($(date +%s) - 86400) * 1000 ))
echo "vid000001 in the last 24 hours (query service, exact to the millisecond):"
curl -fsS "http://$QUERY_LISTEN/v1/videos/vid000001/views?from=$from"; echo
echo "vid000001 in the last 24 hours (videocount):"
echo "  views:               $("$BIN/videocount" --database "$DB" views vid000001 --from "$from")"
echo "  median watch time:   $("$BIN/videocount" --database "$DB" stats vid000001 watch_time p50 --from "$from")"
echo "  distinct viewers:    $("$BIN/videocount" --database "$DB" stats vid000001 view uniq --from "$from")"
cat <<MSG

view_counts and event_stats keep running on topic $TOPIC (database $DB); the ingest service
(the write API) listens on http://$INGEST_LISTEN and the query service (the read API) on
http://$QUERY_LISTEN.

  UI: http://$QUERY_LISTEN/      (search vid000001)

Try:
  curl "http://$QUERY_LISTEN/v1/videos/vid000001/events/watch_time/stats/p99?from=$from"
  curl "http://$QUERY_LISTEN/v1/top?limit=5"
  curl http://$QUERY_LISTEN/openapi.json
  curl -X POST http://$INGEST_LISTEN/v1/videos/vid000003/views
  curl http://$INGEST_LISTEN/metrics
  curl http://127.0.0.1:9101/metrics     # view_counts (event_stats: 9102)
  target/release/videocount --database $DB stats vid000001 watch_time p99 --from 2026-01-01T00:00:00Z --json
  target/release/videocount --database $DB count vid000002 like --from $from
  clickhouse-client --database $DB --query "SELECT job, reason, count() FROM dead_letters GROUP BY job, reason"
  target/release/loadgen --topic $TOPIC --rate 5000 --duration 60     # more traffic
  tail -f var/view_counts.log var/event_stats.log var/ingest.log var/query.log
  make stop-job                                                         # flush, record offsets, stop
MSG
