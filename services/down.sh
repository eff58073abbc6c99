#!/usr/bin/env bash
# Stops the services that services/up.sh and services/up-ha.sh started (Kafka first, ZooKeeper
# last). Data stays in var/.
set -uo pipefail
VAR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/var"

stop() {
    local name=$1 pidfile="$VAR/$1/pid"
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        printf 'down: stopping %s (pid %s)\n' "$name" "$pid"
        kill "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

# `down.sh ha` stops only the HA stack (make down-ha).
if [ "${1:-}" != ha ]; then
    stop kafka
    stop clickhouse
    stop zookeeper
fi
# The HA stack (make up-ha), if it runs.
for node in kafka-1 kafka-2 kafka-3 clickhouse-1 clickhouse-2 zookeeper-1 zookeeper-2 zookeeper-3; do
    stop "ha/$node"
done
