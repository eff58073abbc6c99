#!/usr/bin/env bash
# Installs what is missing, starts what is not running, and waits until each service answers:
# ZooKeeper (127.0.0.1:2181), ClickHouse (HTTP 127.0.0.1:8123) and Kafka in KRaft mode
# (127.0.0.1:9092). Data and logs live under var/. Safe to run again at any time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR="$ROOT/var"
SERVICES="$ROOT/services"
KAFKA_LIBS="$VAR/kafka/libs"

# shellcheck source=services/lib.sh
source "$SERVICES/lib.sh"

install_packages() {
    local missing=()
    command -v clickhouse-server >/dev/null || [ -x /usr/sbin/clickhouse-server ] || missing+=(clickhouse-server)
    command -v clickhouse-client >/dev/null || missing+=(clickhouse-client)
    [ -f /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
    command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null || missing+=(maven)
    command -v curl >/dev/null || missing+=(curl)
    # The UI is bundled with npm and tested in Debian's Chromium (never a downloaded browser).
    command -v npm >/dev/null || missing+=(npm)
    command -v chromium >/dev/null || missing+=(chromium)
    # The chaos test cuts a broker off the network with it (make chaos-test).
    command -v iptables >/dev/null || missing+=(iptables)
    if ((${#missing[@]})); then
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$VAR/apt.log" 2>&1 ||
            { tail -n 30 "$VAR/apt.log" >&2; die "apt-get install failed (log: var/apt.log)"; }
    fi
    if [ ! -f "$KAFKA_LIBS/.complete" ]; then
        log "resolving Apache Kafka from Maven Central (services/kafka/pom.xml)"
        rm -rf "$KAFKA_LIBS"
        mvn -q -B -f "$SERVICES/kafka/pom.xml" dependency:copy-dependencies \
            -DoutputDirectory="$KAFKA_LIBS" -DincludeScope=runtime >"$VAR/mvn.log" 2>&1 ||
            { tail -n 30 "$VAR/mvn.log" >&2; die "maven could not resolve Kafka (log: var/mvn.log)"; }
        touch "$KAFKA_LIBS/.complete"
    fi
}

# `ruok` answers imok while ZooKeeper is still loading its data; `stat` shows a Mode only once
# it serves requests (ClickHouse gives up on Replicated tables it cannot attach before that).
zookeeper_ok() { (exec 3<>/dev/tcp/127.0.0.1/2181 && printf stat >&3 && cat <&3) 2>/dev/null | grep -q '^Mode:'; }

start_zookeeper() {
    local dir="$VAR/zookeeper"
    if zookeeper_ok; then log "zookeeper already running"; return; fi
    mkdir -p "$dir/data"
    render "$SERVICES/zookeeper/zoo.cfg" "$dir/zoo.cfg"
    log "starting zookeeper"
    nohup java -Xms64m -Xmx512m -Dzookeeper.log.dir="$dir" \
        -cp "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar" \
        org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/zoo.cfg" \
        >"$dir/zookeeper.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    wait_for zookeeper 60 "$dir/zookeeper.log" zookeeper_ok
}

clickhouse_ok() { [ "$(curl -fsS --max-time 2 http://127.0.0.1:8123/ping 2>/dev/null)" = "Ok." ]; }

start_clickhouse() {
    local dir="$VAR/clickhouse"
    if clickhouse_ok; then log "clickhouse already running"; return; fi
    # A server that is still shutting down holds the data directory's lock.
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
        log "waiting for the previous clickhouse (pid $(cat "$dir/pid")) to exit"
        local deadline=$((SECONDS + 120))
        while kill -0 "$(cat "$dir/pid")" 2>/dev/null; do
            ((SECONDS < deadline)) || die "clickhouse pid $(cat "$dir/pid") neither answers nor exits; stop it by hand"
            sleep 0.5
        done
    fi
    mkdir -p "$dir"/{data,tmp,user_files,format_schemas,log}
    render "$SERVICES/clickhouse/config.xml" "$dir/config.xml"
    cp "$SERVICES/clickhouse/users.xml" "$dir/users.xml"
    log "starting clickhouse"
    local server=clickhouse-server
    command -v "$server" >/dev/null || server=/usr/sbin/clickhouse-server
    pushd "$dir" >/dev/null
    nohup "$server" --config-file="$dir/config.xml" >"$dir/log/stdout.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    popd >/dev/null
    wait_for clickhouse 90 "$dir/log/error.log" clickhouse_ok
}

kafka_java() {
    java -Xms256m -Xmx1g -XX:+UseG1GC -Dkafka.logs.dir="$VAR/kafka" \
        -Dlog4j2.configurationFile="$SERVICES/kafka/log4j2.properties" \
        -cp "$KAFKA_LIBS/*" "$@"
}

kafka_ok() {
    port_open 9092 && kafka_java org.apache.kafka.tools.TopicCommand \
        --bootstrap-server 127.0.0.1:9092 --list >/dev/null 2>&1
}

start_kafka() {
    local dir="$VAR/kafka"
    if port_open 9092; then
        wait_for kafka 60 "$dir/server.log" kafka_ok
        return
    fi
    mkdir -p "$dir/data"
    render "$SERVICES/kafka/server.properties" "$dir/server.properties"
    if [ ! -f "$dir/data/meta.properties" ]; then
        log "formatting kafka storage"
        kafka_java kafka.tools.StorageTool format --ignore-formatted \
            -t "$(kafka_java kafka.tools.StorageTool random-uuid)" \
            -c "$dir/server.properties" >"$dir/format.log" 2>&1 ||
            { cat "$dir/format.log" >&2; die "kafka storage format failed"; }
    fi
    log "starting kafka"
    nohup java -Xms512m -Xmx1g -XX:+UseG1GC -Dkafka.logs.dir="$dir" \
        -Dlog4j2.configurationFile="$SERVICES/kafka/log4j2.properties" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties" \
        >"$dir/stdout.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    wait_for kafka 120 "$dir/stdout.log" kafka_ok
}

mkdir -p "$VAR"
install_packages
# services/up-ha.sh needs the packages and Kafka's jars, not this single-node stack.
[ "${1:-}" = "--install-only" ] && exit 0
start_zookeeper
start_clickhouse
start_kafka
