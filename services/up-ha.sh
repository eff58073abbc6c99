#!/usr/bin/env bash
# make up-ha: the replicated stack on this machine, beside (not instead of) `make up`'s single
# nodes. Each node has its own ports, data and logs under var/ha/<node>/:
#   ZooKeeper ensemble   zookeeper-1..3   client 2281-2283 (quorum 2381-2383, election 2481-2483)
#   Kafka (KRaft)        kafka-1..3       9191-9193 (controllers 9291-9293); RF 3, min ISR 2
#   ClickHouse replicas  clickhouse-1..2  HTTP 8221-8222, native 9301-9302, replication 9111-9112
# Safe to run again: what answers is left alone. `make down` stops it with the rest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR="$ROOT/var"
SERVICES="$ROOT/services"
HA="$VAR/ha"
KAFKA_LIBS="$VAR/kafka/libs"
# shellcheck source=services/lib.sh
source "$SERVICES/lib.sh"

# render_node TEMPLATE OUT NODE: VAR and NODE filled in.
render_node() { sed "s#VAR#$VAR#g; s#NODE#$3#g" "$1" >"$2"; }

# start_node NAME LOGFILE COMMAND...: runs COMMAND in the background with its pid in var/ha/NAME/pid.
start_node() {
    local name=$1 logfile=$2
    shift 2
    log "starting $name"
    nohup "$@" >"$logfile" 2>&1 </dev/null &
    echo $! >"$HA/$name/pid"
}

# running NAME: the node's recorded process is alive and is that node (its command line names
# var/ha/NAME/). A process killed a moment ago is not: while the kernel takes it down (1.7 s
# for a ClickHouse here) its command line is already empty, and a reused pid names another.
running() {
    local pid
    pid=$(cat "$HA/$1/pid" 2>/dev/null) || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$HA/$1/"
}

# gone NAME: waits (up to 30 s) until the node's previous process, if it is still exiting, has
# let go of its ports and files: a node started while the killed one still holds its listening
# socket cannot bind it. Exiting: an empty command line and not yet a zombie (state Z, which
# holds nothing); a pid that names another command was reused and is not waited for.
gone() {
    local pid state
    pid=$(cat "$HA/$1/pid" 2>/dev/null) || return 0
    for _ in $(seq 1 60); do
        [ -e "/proc/$pid" ] || return 0
        tr -d '\0' 2>/dev/null <"/proc/$pid/cmdline" | grep -q . && return 0
        state=$(sed 's/.*) \([A-Z]\).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 0
        [ "$state" = Z ] && return 0
        sleep 0.5
    done
    die "$1's previous process $pid is still exiting after 30 s"
}

zookeeper_ok() { (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf stat >&3 && cat <&3) 2>/dev/null | grep -q '^Mode:'; }

start_zookeepers() {
    for n in 1 2 3; do
        local dir="$HA/zookeeper-$n"
        running "zookeeper-$n" && continue
        gone "zookeeper-$n"
        mkdir -p "$dir/data"
        echo "$n" >"$dir/data/myid"
        render_node "$SERVICES/ha/zoo.cfg" "$dir/zoo.cfg" "$n"
        start_node "zookeeper-$n" "$dir/zookeeper.log" java -Xms32m -Xmx128m -Dzookeeper.log.dir="$dir" \
            -cp "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar" \
            org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/zoo.cfg"
    done
    for n in 1 2 3; do wait_for "zookeeper-$n" 90 "$HA/zookeeper-$n/zookeeper.log" zookeeper_ok "228$n"; done
}

clickhouse_ok() { [ "$(curl -fsS --max-time 2 "http://127.0.0.1:822$1/ping" 2>/dev/null)" = "Ok." ]; }

start_clickhouses() {
    local server=clickhouse-server
    command -v "$server" >/dev/null || server=/usr/sbin/clickhouse-server
    for n in 1 2; do
        local dir="$HA/clickhouse-$n"
        running "clickhouse-$n" && continue
        gone "clickhouse-$n"
        mkdir -p "$dir"/{data,tmp,user_files,format_schemas,log}
        render_node "$SERVICES/ha/clickhouse.xml" "$dir/config.xml" "$n"
        cp "$SERVICES/clickhouse/users.xml" "$dir/users.xml"
        (cd "$dir" && start_node "clickhouse-$n" "$dir/log/stdout.log" "$server" --config-file="$dir/config.xml")
    done
    for n in 1 2; do wait_for "clickhouse-$n" 90 "$HA/clickhouse-$n/log/error.log" clickhouse_ok "$n"; done
}

kafka_java() {
    java -Xms64m -Xmx256m -Dkafka.logs.dir="$HA" -Dlog4j2.configurationFile="$SERVICES/kafka/log4j2.properties" \
        -cp "$KAFKA_LIBS/*" "$@"
}

HA_BROKERS=127.0.0.1:9191,127.0.0.1:9192,127.0.0.1:9193
# The cluster answers once a topic list comes back and all three brokers are registered.
kafka_ok() {
    kafka_java org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "$HA_BROKERS" 2>/dev/null |
        grep -c '^127.0.0.1:919[123] (id: [123]' | grep -qx 3
}

start_kafkas() {
    [ -f "$HA/kafka-cluster-id" ] || kafka_java kafka.tools.StorageTool random-uuid >"$HA/kafka-cluster-id"
    for n in 1 2 3; do
        local dir="$HA/kafka-$n"
        running "kafka-$n" && continue
        gone "kafka-$n"
        mkdir -p "$dir/data"
        render_node "$SERVICES/ha/server.properties" "$dir/server.properties" "$n"
        if [ ! -f "$dir/data/meta.properties" ]; then
            kafka_java kafka.tools.StorageTool format --ignore-formatted -t "$(cat "$HA/kafka-cluster-id")" \
                -c "$dir/server.properties" >"$dir/format.log" 2>&1 ||
                { cat "$dir/format.log" >&2; die "formatting kafka-$n failed"; }
        fi
        start_node "kafka-$n" "$dir/stdout.log" java -Xms256m -Xmx384m -XX:+UseG1GC -Dkafka.logs.dir="$dir" \
            -Dlog4j2.configurationFile="$SERVICES/kafka/log4j2.properties" \
            -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties"
    done
    wait_for "kafka (3 brokers)" 180 "$HA/kafka-1/stdout.log" kafka_ok
}

"$SERVICES/up.sh" --install-only
mkdir -p "$HA"/{zookeeper-1,zookeeper-2,zookeeper-3,kafka-1,kafka-2,kafka-3,clickhouse-1,clickhouse-2}
start_zookeepers
start_clickhouses
start_kafkas
log "HA stack up: --brokers $HA_BROKERS --clickhouse-url http://127.0.0.1:8221,http://127.0.0.1:8222 --zookeeper 127.0.0.1:2281,127.0.0.1:2282,127.0.0.1:2283"
