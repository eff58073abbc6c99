# Helpers of services/up.sh and services/up-ha.sh (sourced; VAR must be set).

log() { printf 'up: %s\n' "$*"; }
die() { printf 'up: error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for NAME SECONDS LOGFILE COMMAND...: retries COMMAND until it succeeds.
wait_for() {
    local name=$1 seconds=$2 logfile=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            # Without the frames of stack traces (ClickHouse's `12. /lib/...`): the messages.
            echo "---- last lines of $logfile ----" >&2
            grep -v '^[0-9]*\. ' "$logfile" | tail -n 40 >&2 || true
            die "$name did not answer within ${seconds}s"
        fi
        sleep 0.5
    done
    log "$name is up"
}

render() { sed "s#VAR#$VAR#g" "$1" >"$2"; }
