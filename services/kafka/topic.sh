#!/usr/bin/env bash
# Creates a topic on the local broker if it does not exist: topic.sh NAME PARTITIONS
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[ $# -eq 2 ] || { echo "usage: $0 TOPIC PARTITIONS" >&2; exit 2; }
exec java -Xmx256m -Dlog4j2.configurationFile="$ROOT/services/kafka/log4j2.properties" \
    -Dkafka.logs.dir="$ROOT/var/kafka" -cp "$ROOT/var/kafka/libs/*" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "${KAFKA_BROKERS:-127.0.0.1:9092}" \
    --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor 1
