# Shared by stop-job.sh and stop-ha.sh (source it).

# stop_pidfile WHO NAME PIDFILE: SIGTERM to the process in PIDFILE (each job flushes and records
# its offsets, a standby just leaves, a service answers what is in flight), SIGKILL after 60 s;
# then removes PIDFILE. WHO prefixes the messages.
stop_pidfile() {
    local who=$1 name=$2 pidfile=$3 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        echo "$who: stopping $name (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$who: $name did not stop within 60 s; killing it (a restart re-runs its open epochs)"
            kill -9 "$pid"
        fi
    fi
    rm -f "$pidfile"
}
