#!/usr/bin/env bash
# Creates a topic if it does not exist: topic.sh NAME PARTITIONS [REPLICATION_FACTOR (1)], on
# KAFKA_BROKERS (the local broker by default).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[ $# -ge 2 ] || { echo "usage: $0 TOPIC PARTITIONS [REPLICATION_FACTOR]" >&2; exit 2; }
exec java -Xmx256m -Dlog4j2.configurationFile="$ROOT/services/kafka/log4j2.properties" \
    -Dkafka.logs.dir="$ROOT/var/kafka" -cp "$ROOT/var/kafka/libs/*" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "${KAFKA_BROKERS:-127.0.0.1:9092}" \
    --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor "${3:-1}"
