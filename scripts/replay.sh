#!/usr/bin/env bash
# `make replay`: stops what run-job started (the jobs must not commit while the tables are
# rebuilt), recomputes the count tables from events_raw and swaps them in, then starts again
# what was running, whether the replay succeeded or refused (it replaces nothing then).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/stack-env.sh"

was_running=0
for job in view_counts event_stats ingest query; do
    if [ -f "$VAR/$job.pid" ] && kill -0 "$(cat "$VAR/$job.pid")" 2>/dev/null; then was_running=1; fi
done
[ "$was_running" = 1 ] && "$ROOT/scripts/stop-job.sh"
"$BIN/videocount" --database "$DB" replay --topic "$TOPIC" --job-name "${JOB_NAME:-view_counts}"
status=$?
if [ "$was_running" = 1 ]; then
    echo "replay: starting the stack again"
    "$ROOT/scripts/start-stack.sh"
fi
exit $status
