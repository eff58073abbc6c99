"""sql/schema.sql on current ClickHouse (chdb, embedded), with the project's ZooKeeper.

The Replicated* tables need ZooKeeper even on one node; `make up` runs one on 127.0.0.1:2181.
The test applies the schema statement by statement, twice (it must be idempotent), checks
every table's columns, and runs the README's analyst queries against it.
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
    print(f"schema ok on ClickHouse {version}")


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
