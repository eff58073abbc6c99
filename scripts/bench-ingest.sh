#!/usr/bin/env bash
# make bench-ingest: the ingest service on loopback against the real Kafka, driven by
# ingest_bench: events/s through POST /v1/events batches and requests/s of single-event calls,
# with p50/p99 latency. Client, service and broker share this machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
SECONDS_EACH=${BENCH_SECONDS:-10}
PORT=${BENCH_INGEST_PORT:-18090}
TOPIC="bench-ingest-$(date +%s)"
cd "$ROOT"

services/kafka/topic.sh "$TOPIC" 8 >/dev/null
# shellcheck disable=SC2086
RUST_LOG=warn "$BIN/ingest" --topic "$TOPIC" --listen "127.0.0.1:$PORT" ${INGEST_ARGS:-} >"$ROOT/var/bench-ingest.log" 2>&1 &
INGEST=$!
cleanup() {
    kill "$INGEST" 2>/dev/null || true
    wait "$INGEST" 2>/dev/null || true
    java -Xmx256m -Dlog4j2.configurationFile="$ROOT/services/kafka/log4j2.properties" \
        -Dkafka.logs.dir="$ROOT/var/kafka" -cp "$ROOT/var/kafka/libs/*" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "${KAFKA_BROKERS:-127.0.0.1:9092}" --delete --topic "$TOPIC" >/dev/null 2>&1 || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null && break; sleep 0.2; done

echo "bench-ingest: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, ${SECONDS_EACH}s per run, topic $TOPIC (8 partitions)"
echo "bench-ingest: batches of 1000 events, 8 requests in flight"
"$BIN/ingest_bench" --url "http://127.0.0.1:$PORT" --mode batch --batch-size 1000 --concurrency 8 --seconds "$SECONDS_EACH"
echo "bench-ingest: single-event calls, 256 requests in flight"
"$BIN/ingest_bench" --url "http://127.0.0.1:$PORT" --mode single --concurrency 256 --seconds "$SECONDS_EACH"
