#!/usr/bin/env bash
# make run-job HA=1: videocount on the replicated stack (make up-ha), two of everything
# (scripts/start-ha.sh), fed 10 s of demo traffic through the client library over both ingest
# services and checked through both query services.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/stack-env.sh"
"$ROOT/scripts/start-ha.sh"
echo "run-job HA=1: 2,000 events/s for 10 s over both ingest services, then every count checked"
"$BIN/load_test" run --rate 2000 --duration 10 --videos 200 \
    --ingest-url http://127.0.0.1:8180,http://127.0.0.1:8182 --query-url http://127.0.0.1:8181,http://127.0.0.1:8183
cat <<MSG

On the replicated stack (topic $TOPIC with 3 replicas, database $DB on both ClickHouse replicas):
  write API   http://127.0.0.1:8180  http://127.0.0.1:8182
  read API    http://127.0.0.1:8181  http://127.0.0.1:8183    (UI: http://127.0.0.1:8181/)
  jobs        view_counts-a/-b metrics :9201/:9202, event_stats-a/-b :9203/:9204;
              videocount_job_lease_held says which one is active
  logs        var/ha/apps/<name>/log

Try: kill -9 the active view_counts (its pid is in var/ha/apps/view_counts-a/pid), watch the
other take over (grep lease var/ha/apps/view_counts-b/log), then scripts/start-ha.sh restarts
what died (it becomes the standby). make chaos-test does this and more, measured.
make stop-job stops them; make down-ha stops the stack too.
MSG
