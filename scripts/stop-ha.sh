#!/usr/bin/env bash
# Stops what start-ha.sh started: SIGTERM (each job flushes and records its offsets; a standby
# just leaves), SIGKILL after 60 s.
set -uo pipefail
SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/stop-lib.sh
source "$SCRIPTS/stop-lib.sh"
for name in query-1 query-2 ingest-1 ingest-2 view_counts-b event_stats-b view_counts-a event_stats-a; do
    stop_pidfile stop-ha "$name" "$SCRIPTS/../var/ha/apps/$name/pid"
done
