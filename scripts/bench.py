#!/usr/bin/env python3
"""`make bench`: catch-up throughput of the jobs on a pre-filled topic.

Fills a topic with N events (default 10M, BENCH_EVENTS to change), then times
`view_counts --until-caught-up` from an empty checkpoint for 1 and 2 workers, with and
without events_raw, and `event_stats` (default functions) for 1 and 2 workers, each into a
fresh database, reporting events/s and peak memory, and checking the counts. Then counts the
same topic with ClickHouse's own Kafka engine and a materialized view into a minute table, the
alternative a user would reach for. Prints a Markdown table. BENCH_ONLY=view_counts or
BENCH_ONLY=event_stats runs one job's rows only (and skips the Kafka engine for event_stats).
BENCH_ONLY=ids measures the cost of event ids instead: the same events with and without an
`event_id` each (two topics), both jobs, three alternating runs each: the medians of events/s
and of peak memory (the dedup windows).
BENCH_BIN picks the binaries (default target/release).
"""

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BENCH_BIN", os.path.join(ROOT, "target", "release"))
CH = os.environ.get("CLICKHOUSE_URL", "http://127.0.0.1:8123")
EVENTS = int(os.environ.get("BENCH_EVENTS", "10000000"))
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "8"))


def sql(query, database=None):
    url = CH + "/" + (f"?database={database}" if database else "")
    with urllib.request.urlopen(urllib.request.Request(url, data=query.encode()), timeout=600) as r:
        return r.read().decode().strip()


def run_job(topic, workers, raw, job="view_counts", extra=()):
    database = f"bench_{uuid.uuid4().hex[:8]}"
    subprocess.run([f"{BIN}/videocount", "--database", database, "schema"], check=True, stdout=subprocess.DEVNULL)
    args = [f"{BIN}/{job}", "--topic", topic, "--database", database, "--workers", str(workers), "--until-caught-up"]
    if not raw:
        args.append("--no-events-raw")
    args.extend(extra)
    started = time.monotonic()
    child = subprocess.Popen(args, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - started
    if status != 0:
        sys.exit(f"bench: {job} failed ({status})")
    if job == "view_counts":
        counted = int(sql("SELECT sum(count) FROM event_counts_minute", database))
    else:
        # Every valid loadgen event feeds the `moments` state (count) of its type.
        counted = int(sql("SELECT sum(count) FROM stats_minute WHERE aggregate = 'moments'", database))
    sql(f"DROP DATABASE {database}")
    return seconds, usage.ru_maxrss / 1024, counted


def clickhouse_kafka_engine(topic, expected):
    database = f"bench_ch_{uuid.uuid4().hex[:8]}"
    try:
        sql(f"CREATE DATABASE {database}")
        sql(
            "CREATE TABLE counts (video_id String, event_type String, minute DateTime, count UInt64) "
            "ENGINE = SummingMergeTree ORDER BY (video_id, event_type, minute)",
            database,
        )
        started = time.monotonic()
        sql(
            f"CREATE TABLE queue (video_id String, event_type String, ts UInt64) ENGINE = "
            f"Kafka('127.0.0.1:9092', '{topic}', 'bench-{database}', 'JSONEachRow')",
            database,
        )
        sql(
            "CREATE MATERIALIZED VIEW consumer TO counts AS SELECT video_id, event_type, "
            "toStartOfMinute(toDateTime(intDiv(ts, 1000))) AS minute, count() AS count FROM queue "
            "GROUP BY video_id, event_type, minute",
            database,
        )
        last, last_change = 0, time.monotonic()
        while True:
            time.sleep(1)
            n = int(sql("SELECT sum(count) FROM counts", database) or 0)
            if n >= expected:
                return time.monotonic() - started, n, None
            if n != last:
                last, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > 60:
                return None, n, f"stalled at {n} rows counted"
    except Exception as e:  # report, do not hide: the comparison row says why it failed
        return None, 0, str(e)[:200]
    finally:
        try:
            sql(f"DROP DATABASE IF EXISTS {database}")
        except Exception:
            pass


def fill(event_ids):
    """A new topic with EVENTS valid events (each with an event_id when asked); the count."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    subprocess.run([os.path.join(ROOT, "services/kafka/topic.sh"), topic, str(PARTITIONS)], check=True, stdout=subprocess.DEVNULL)
    print(f"bench: producing {EVENTS:,} events to {topic} ({PARTITIONS} partitions), ids {'on' if event_ids else 'off'}", flush=True)
    expected_file = f"/tmp/{topic}.json"
    subprocess.run(
        [f"{BIN}/loadgen", "--topic", topic, "--events", str(EVENTS), "--videos", "100000",
         "--malformed-fraction", "0", "--duplicate-fraction", "0", "--expected", expected_file]
        + (["--event-ids"] if event_ids else []),
        check=True,
    )
    return topic, json.load(open(expected_file))["events"]


def bench_ids():
    """Catch-up with and without event ids, alternating, three times each: the ratio of the
    medians is the cost of the ids (single runs of a few seconds vary by 10-20 %)."""
    topics = {ids: fill(ids) for ids in (False, True)}
    rows = []
    for job, workers in (("view_counts", 2), ("event_stats", 1)):
        runs = {False: [], True: []}
        for _ in range(3):
            for ids in (False, True):
                topic, expected = topics[ids]
                seconds, rss, counted = run_job(topic, workers, False, job)
                ok = "exact" if counted == expected else f"WRONG ({counted})"
                runs[ids].append((expected / seconds, rss, ok))
                print(f"bench: {job}, {workers} worker(s), ids {'on' if ids else 'off'}: {expected / seconds:,.0f} "
                      f"events/s, peak RSS {rss:,.0f} MiB, {ok}", flush=True)
        for ids in (False, True):
            rates = [r for r, _, _ in runs[ids]]
            rss = statistics.median(m for _, m, _ in runs[ids])
            oks = {ok for _, _, ok in runs[ids]}
            rows.append((job, workers, ids, statistics.median(rates), rates, rss, ", ".join(sorted(oks))))
    print()
    print("| run | ids | events/s (median of 3) | the 3 runs | peak memory (median) | counts |")
    print("|---|---|---:|---|---:|---|")
    for job, workers, ids, rate, rates, rss, ok in rows:
        runs_text = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"| {job}, {workers} worker(s), events_raw off | {'on' if ids else 'off'} | {rate:,.0f} | {runs_text} "
              f"| {rss:,.0f} MiB | {ok} |")
    for (job, _, _, off, _, rss_off, _), (_, _, _, on, _, rss_on, _) in zip(rows[::2], rows[1::2]):
        print(f"\n{job}: ids on / off = {on / off:.2f}x events/s (medians); memory {rss_on - rss_off:+,.0f} MiB "
              f"({(rss_on - rss_off) / (EVENTS / 1e6):,.0f} MiB per million ids in the windows)")


def main():
    if os.environ.get("BENCH_ONLY") == "ids":
        bench_ids()
        return
    topic, expected = fill(event_ids=False)
    only = os.environ.get("BENCH_ONLY")
    runs = []
    if only in (None, "", "view_counts"):
        runs += [("view_counts", w, raw, f"view_counts, {w} worker(s), events_raw {'on' if raw else 'off'}")
                 for w in (1, 2) for raw in (True, False)]
    if only in (None, "", "event_stats"):
        runs += [("event_stats", w, False, f"event_stats (default functions), {w} worker(s)") for w in (1, 2)]
    rows = []
    for job, workers, raw, name in runs:
        seconds, rss, counted = run_job(topic, workers, raw, job)
        ok = "exact" if counted == expected else f"WRONG ({counted})"
        rows.append((name, seconds, rss, ok))
        print(f"bench: {name}: {expected / seconds:,.0f} events/s, peak RSS {rss:,.0f} MiB, {ok}", flush=True)
    print()
    print(f"| run | events/s | seconds | peak memory | counts |")
    print(f"|---|---:|---:|---:|---|")
    for name, secs, rss, ok in rows:
        print(f"| {name} | {expected / secs:,.0f} | {secs:.1f} | {rss:,.0f} MiB | {ok} |")
    if only == "event_stats":
        return
    seconds, counted, error = clickhouse_kafka_engine(topic, expected)
    best = max(expected / r[1] for r in rows if r[0].startswith("view_counts"))
    if error:
        print(f"| ClickHouse Kafka engine + MV | - | - | - | failed: {error} |")
    else:
        print(f"| ClickHouse Kafka engine + MV | {expected / seconds:,.0f} | {seconds:.1f} | (server) | {counted:,} rows counted |")
        print(f"\nview_counts (best) / Kafka engine: {best / (expected / seconds):.2f}x")


if __name__ == "__main__":
    main()
