"""sql/schema.sql on current ClickHouse (chdb, embedded), with the project's ZooKeeper.

The Replicated* tables need ZooKeeper even on one node; `make up` runs one on 127.0.0.1:2181.
The test applies the schema statement by statement, twice (it must be idempotent), checks
every table's columns, runs the README's analyst queries against it, and runs the shapes of
the query service's SQL (`query/lib.rs`, `query-service/hot.rs`) over a few rows, with the
values the clickhouse crate binds client-side.
"""

import os
import pathlib
import re
import subprocess
import sys
import traceback
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA = (ROOT / "sql" / "schema.sql").read_text()
README = (ROOT / "README.md").read_text()

EXPECTED_COLUMNS = {
    "event_counts_minute": ["video_id", "event_type", "minute", "count", "epoch"],
    "event_counts_hour": ["video_id", "event_type", "hour", "count", "epoch"],
    "event_counts_day": ["video_id", "event_type", "day", "count", "epoch"],
    "events_raw": ["video_id", "event_type", "ts", "partition", "offset"],
    "dead_letters": ["job", "topic", "partition", "offset", "reason", "detail", "payload", "message_ts"],
    "checkpoint_ranges": ["job", "topic", "epoch", "partition", "start_offset", "end_offset", "peers"],
    "checkpoint_commits": ["job", "topic", "epoch", "committed_at"],
    "checkpoint_generations": ["job", "topic", "generation", "base_epoch", "started_at", "lease_token"],
    "checkpoint_snapshots": ["job", "topic", "epoch", "partition", "end_offset"],
    # The same columns as stats_minute, in the same order: event_stats inserts the same block.
    "stats_changes": [
        "video_id", "event_type", "aggregate", "minute", "count", "value_count", "sum", "min", "max", "state",
        "epoch", "compacted",
    ],
    "stats_minute": [
        "video_id", "event_type", "aggregate", "minute", "count", "value_count", "sum", "min", "max", "state",
        "epoch", "compacted",
    ],
}


def statements(sql):
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def connect(tmp):
    import chdb

    config = tmp / "config.xml"
    config.write_text(
        "<clickhouse>"
        "<zookeeper><node><host>127.0.0.1</host><port>2181</port></node></zookeeper>"
        f"<macros><replica>chdb_{uuid.uuid4().hex[:8]}</replica><shard>01</shard></macros>"
        "</clickhouse>"
    )
    return chdb.connect(f"file:{tmp / 'data'}?config-file={config}")


def check(cursor):
    database = f"chdb_{uuid.uuid4().hex[:12]}"
    cursor.execute(f"CREATE DATABASE {database}")
    cursor.execute(f"USE {database}")
    for _ in range(2):
        for statement in statements(SCHEMA):
            cursor.execute(statement)
    cursor.execute("SELECT version()")
    version = cursor.fetchone()[0]
    assert int(version.split(".")[0]) >= 23, f"expected a current ClickHouse, got {version}"
    for table, columns in EXPECTED_COLUMNS.items():
        cursor.execute(
            f"SELECT name FROM system.columns WHERE database = '{database}' AND table = '{table}' ORDER BY position"
        )
        assert [row[0] for row in cursor.fetchall()] == columns, table
    cursor.execute(f"SELECT engine FROM system.tables WHERE database = '{database}' AND name = 'event_counts_minute'")
    assert cursor.fetchone()[0] == "ReplicatedSummingMergeTree"

    # Every query the README offers analysts runs here too (on empty tables).
    queries = re.findall(r"```sql\n(.*?)```", README, flags=re.S)
    assert len(queries) >= 3, "README should document analyst queries"
    for block in queries:
        for query in statements(block):
            cursor.execute(query)
            cursor.fetchall()
    check_read_path(cursor, database)
    print(f"schema ok on ClickHouse {version}")


def check_read_path(cursor, database):
    """The query service's statements, as bound: the answers must be the same as on 18.16.

    chdb's Replicated tables are read-only (its ZooKeeper session), so the rows go into
    MergeTree copies of the schema's tables, with the same columns and order, in a second
    database."""
    cursor.execute(f"CREATE DATABASE {database}_read")
    for table, bucket in [
        ("event_counts_day", "day"),
        ("event_counts_hour", "hour"),
        ("event_counts_minute", "minute"),
        ("events_raw", "ts"),
        ("stats_day", "day"),
    ]:
        cursor.execute(
            f"CREATE TABLE {database}_read.{table} AS {database}.{table} "
            f"ENGINE = MergeTree ORDER BY (video_id, event_type, {bucket})"
        )
    cursor.execute(f"USE {database}_read")
    day = 1795737600  # 2026-11-27T00:00:00Z
    cursor.execute(
        "INSERT INTO event_counts_day VALUES ('v', 'view', toDate('2026-11-26'), 5, 1), ('w', 'view', toDate('2026-11-26'), 9, 1)"
    )
    cursor.execute(f"INSERT INTO event_counts_hour VALUES ('v', 'view', toDateTime({day}, 'UTC'), 3, 1)")
    cursor.execute(f"INSERT INTO event_counts_minute VALUES ('v', 'view', toDateTime({day + 3600}, 'UTC'), 2, 1)")
    cursor.execute(
        f"INSERT INTO events_raw VALUES ('v', 'view', {day * 1000 + 7_200_500}, 0, 1), ('v', 'view', {day * 1000 - 1}, 0, 2)"
    )
    # Reader::count_plan: one subquery per table, conditions joined by OR.
    cursor.execute(
        "SELECT toUInt64(sum(count)) AS total FROM ("
        "SELECT count FROM event_counts_day WHERE video_id = 'v' AND event_type = 'view' "
        "AND (day >= toDate('2026-11-26') AND day < toDate('2026-11-27')) UNION ALL "
        "SELECT count FROM event_counts_hour WHERE video_id = 'v' AND event_type = 'view' "
        f"AND (hour >= toDateTime({day}, 'UTC') AND hour < toDateTime({day + 3600}, 'UTC') "
        f"OR hour >= toDateTime({day + 7200}, 'UTC') AND hour < toDateTime({day + 7200}, 'UTC')) UNION ALL "
        "SELECT count FROM event_counts_minute WHERE video_id = 'v' AND event_type = 'view' "
        f"AND (minute >= toDateTime({day + 3600}, 'UTC') AND minute < toDateTime({day + 3660}, 'UTC')) UNION ALL "
        "SELECT toUInt64(count()) AS count FROM events_raw WHERE video_id = 'v' AND event_type = 'view' "
        f"AND ((ts >= {day * 1000 + 7_200_000} AND ts < {day * 1000 + 7_201_000}) OR (ts >= 0 AND ts < 1)))"
    )
    assert cursor.fetchone()[0] == 5 + 3 + 2 + 1
    # Reader::series, day step.
    cursor.execute(
        "SELECT toUInt64(toUInt32(day)) * 86400 AS bucket, toUInt64(sum(count)) AS total FROM event_counts_day "
        "WHERE video_id = 'v' AND event_type = 'view' AND day >= toDate('2026-11-20') AND day < toDate('2026-11-28') "
        "GROUP BY bucket ORDER BY bucket"
    )
    rows = cursor.fetchall()
    assert [tuple(r) for r in rows] == [(day - 86400, 5)], rows
    # StatsMemory::try_load, the day table: bucket starts in seconds, the rows up to the
    # applied epoch and every compacted row.
    cursor.execute(
        "INSERT INTO stats_day VALUES ('v', 'view', 'moments', toDate('2026-11-26'), 1, 0, 0, 0, 0, 'a', 7, 0), "
        "('v', 'view', 'moments', toDate('2026-11-26'), 1, 0, 0, 0, 0, 'b', 9, 0), "
        "('v', 'view', 'moments', toDate('2026-11-25'), 0, 0, 0, 0, 0, 'c', 12, 1)"
    )
    cursor.execute(
        "SELECT state, toUInt32(0) AS segment, toUInt32(toUInt32(day) * 86400) AS bucket, epoch, compacted "
        "FROM stats_day WHERE video_id = 'v' AND event_type = 'view' AND aggregate = 'moments' "
        "AND (compacted = 1 OR (state != '' AND epoch <= 8)) ORDER BY bucket, compacted DESC, epoch"
    )
    rows = cursor.fetchall()
    assert [tuple(r) for r in rows] == [("c", 0, day - 2 * 86400, 12, 1), ("a", 0, day - 86400, 7, 0)], rows
    # Reader::top.
    cursor.execute(
        "SELECT video_id, toUInt64(sum(count)) AS total FROM ("
        "SELECT video_id, count FROM event_counts_day WHERE event_type = 'view' "
        "AND day >= toDate('2026-11-20') AND day < toDate('2026-11-27') UNION ALL "
        "SELECT video_id, count FROM event_counts_hour WHERE event_type = 'view' "
        f"AND hour >= toDateTime({day}, 'UTC') AND hour < toDateTime({day + 3600}, 'UTC')) "
        "GROUP BY video_id ORDER BY total DESC, video_id LIMIT 10"
    )
    rows = cursor.fetchall()
    assert [tuple(r) for r in rows] == [("w", 9), ("v", 8)], rows
    # HotCache::read.
    cursor.execute(
        "SELECT video_id, event_type, toUInt64(toUInt32(minute)) AS minute, toUInt64(sum(count)) AS total "
        "FROM event_counts_minute WHERE video_id IN ('v', 'w') AND event_type IN ('view') "
        f"AND minute >= toDateTime({day}, 'UTC') GROUP BY video_id, event_type, minute"
    )
    rows = cursor.fetchall()
    assert [tuple(r) for r in rows] == [("v", "view", day + 3600, 2)], rows


def test_schema_runs_twice_and_has_the_documented_columns(tmp_path):
    # chdb's embedded server does not shut down cleanly while it holds a ZooKeeper session,
    # so the check runs in a child process that exits hard once it has printed its verdict.
    child = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stdout + child.stderr
    assert "schema ok on ClickHouse" in child.stdout


if __name__ == "__main__":
    try:
        connection = connect(pathlib.Path(sys.argv[1]))
        check(connection.cursor())
        sys.stdout.flush()
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
