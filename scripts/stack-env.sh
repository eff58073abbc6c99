# Shared by the stack scripts (source it): where things are and the addresses they use.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR="$ROOT/var"
BIN="${VIDEOCOUNT_BIN:-$ROOT/target/release}"
TOPIC=${TOPIC:-video-events}
DB=${CLICKHOUSE_DATABASE:-video_counts}
WORKERS=${WORKERS:-2}
INGEST_LISTEN=${VIDEOCOUNT_INGEST_LISTEN:-127.0.0.1:8080}
QUERY_LISTEN=${VIDEOCOUNT_QUERY_LISTEN:-127.0.0.1:8081}
mkdir -p "$VAR"
cd "$ROOT"
