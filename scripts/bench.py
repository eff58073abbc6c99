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
BENCH_ONLY=trending measures view_counts' top lists: catch-up with trending on and off
(alternating, three runs each, medians), the memory they take for 1M distinct videos in the
windows (BENCH_TRENDING_VIDEOS), and /v1/top under 100 clients, from the kept lists and as
the sum over the minute table.
BENCH_ONLY=builds compares two builds of view_counts: catch-up of the same events by the
binaries in BENCH_BASELINE_BIN and in BENCH_BIN, alternating, three runs each after one
uncounted run: the ratio of the medians is what a change costs.
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


def run_job(topic, workers, raw, job="view_counts", extra=(), keep=False, job_bin=None):
    database = f"bench_{uuid.uuid4().hex[:8]}"
    subprocess.run([f"{BIN}/videocount", "--database", database, "schema"], check=True, stdout=subprocess.DEVNULL)
    args = [f"{job_bin or BIN}/{job}", "--topic", topic, "--database", database, "--workers", str(workers), "--until-caught-up"]
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
    if keep:
        return seconds, usage.ru_maxrss / 1024, counted, database
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


def fill(event_ids, events=EVENTS, extra=(), videos=100000):
    """A new topic with `events` valid events (each with an event_id when asked); the count."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    subprocess.run([os.path.join(ROOT, "services/kafka/topic.sh"), topic, str(PARTITIONS)], check=True, stdout=subprocess.DEVNULL)
    print(f"bench: producing {events:,} events to {topic} ({PARTITIONS} partitions), ids {'on' if event_ids else 'off'}", flush=True)
    expected_file = f"/tmp/{topic}.json"
    subprocess.run(
        [f"{BIN}/loadgen", "--topic", topic, "--events", str(events), "--videos", str(videos),
         "--malformed-fraction", "0", "--duplicate-fraction", "0", "--expected", expected_file]
        + (["--event-ids"] if event_ids else []) + list(extra),
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


def bench_trending():
    """view_counts with its top lists on and off: catch-up (medians of three alternating runs),
    the memory of the windows and arrangements for many distinct videos, and /v1/top."""
    topic, expected = fill(False)
    # One run first, not counted: the first run after the fill is slower (cold caches), and the
    # alternation would charge it to trending.
    run_job(topic, 2, False)
    runs = {True: [], False: []}
    database = None
    for _ in range(3):
        for trending in (True, False):
            extra = [] if trending else ["--no-trending"]
            seconds, rss, counted, db = run_job(topic, 2, False, extra=extra, keep=True)
            ok = "exact" if counted == expected else f"WRONG ({counted})"
            runs[trending].append((expected / seconds, rss, ok))
            print(f"bench: view_counts, 2 workers, trending {'on' if trending else 'off'}: {expected / seconds:,.0f} "
                  f"events/s, peak RSS {rss:,.0f} MiB, {ok}", flush=True)
            if trending and database is None:
                database = db
            else:
                sql(f"DROP DATABASE {db}")
    print("\n| run | trending | events/s (median of 3) | the 3 runs | peak memory (median) | counts |")
    print("|---|---|---:|---|---:|---|")
    for trending in (True, False):
        rates = [r for r, _, _ in runs[trending]]
        rss = statistics.median(m for _, m, _ in runs[trending])
        oks = ", ".join(sorted({ok for _, _, ok in runs[trending]}))
        print(f"| view_counts, 2 workers, events_raw off | {'on' if trending else 'off'} | {statistics.median(rates):,.0f} "
              f"| {' / '.join(f'{r:,.0f}' for r in rates)} | {rss:,.0f} MiB | {oks} |")
    on, off = (statistics.median(r for r, _, _ in runs[t]) for t in (True, False))
    print(f"\ntrending on / off = {on / off:.2f}x events/s (medians)")

    # Many distinct videos in the windows: every video alike, all in the last hour.
    videos = int(os.environ.get("BENCH_TRENDING_VIDEOS", "1000000"))
    wide, wide_expected = fill(False, events=3 * videos, videos=videos, extra=["--zipf-exponent", "0", "--late-fraction", "0"])
    memory = {}
    for trending in (True, False):
        extra = [] if trending else ["--no-trending"]
        seconds, rss, counted, db = run_job(wide, 2, False, extra=extra, keep=True)
        distinct = int(sql("SELECT uniqExact(video_id) FROM event_counts_minute", db))
        expected_ok = counted == wide_expected
        memory[trending] = (rss, distinct, expected_ok, wide_expected / seconds)
        sql(f"DROP DATABASE {db}")
        print(f"bench: {wide_expected:,} events over {distinct:,} distinct videos, trending {'on' if trending else 'off'}: "
              f"peak RSS {rss:,.0f} MiB, {wide_expected / seconds:,.0f} events/s, {'exact' if expected_ok else 'WRONG'}",
              flush=True)
    (rss_on, distinct, _, rate_on), (rss_off, _, _, rate_off) = memory[True], memory[False]
    print(f"\n{distinct:,} distinct videos in both windows: trending takes {rss_on - rss_off:+,.0f} MiB of peak memory "
          f"({(rss_on - rss_off) / (distinct / 1e6):,.0f} MiB per million videos); events/s on / off = {rate_on / rate_off:.2f}x")

    # /v1/top under 100 clients, on the first trending run's database.
    port = os.environ.get("BENCH_QUERY_PORT", "18092")
    service = subprocess.Popen([f"{BIN}/query", "--database", database, "--listen", f"127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"{url}/v1/top?window=1h", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            time.sleep(0.2)
        print("\n| call | clients | requests/s | p50 ms | p99 ms | p999 ms | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        results = {}
        for call in ("top", "top-scan"):
            out = subprocess.run([f"{BIN}/query_bench", "--database", database, "run", "--url", url, "--clients", "100",
                                  "--seconds", "10", "--call", call], check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            results[call] = r
            print(f"| /v1/top {'?window= (kept lists)' if call == 'top' else '(sum over the last hour)'} | 100 | "
                  f"{r['requests_per_second']:,.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['p999_ms']} | {r['errors']} |", flush=True)
        ratio = results["top"]["requests_per_second"] / max(results["top-scan"]["requests_per_second"], 1)
        print(f"\nkept lists / sum over the minute table = {ratio:.0f}x requests/s")
    finally:
        service.kill()
        service.wait()
        sql(f"DROP DATABASE {database}")


def bench_builds():
    """view_counts of BENCH_BASELINE_BIN against BENCH_BIN's on the same events (2 workers, raw
    log off); the schema and the events come from BENCH_BIN's tools."""
    builds = {"baseline": os.environ.get("BENCH_BASELINE_BIN"), "this": BIN}
    if not builds["baseline"]:
        sys.exit("bench: BENCH_ONLY=builds needs BENCH_BASELINE_BIN (a directory holding the other view_counts)")
    topic, expected = fill(False)
    run_job(topic, 2, False)
    runs = {name: [] for name in builds}
    for _ in range(3):
        for name, binary in builds.items():
            # Only the job's binary differs: run_job takes `videocount` (schema) from BIN too.
            seconds, rss, counted, db = run_job(topic, 2, False, keep=True, job_bin=binary)
            sql(f"DROP DATABASE {db}")
            ok = "exact" if counted == expected else f"WRONG ({counted})"
            runs[name].append((expected / seconds, rss))
            print(f"bench: view_counts of {name} ({binary}): {expected / seconds:,.0f} events/s, peak RSS {rss:,.0f} MiB, {ok}",
                  flush=True)
    medians = {name: (statistics.median(r for r, _ in rs), statistics.median(m for _, m in rs)) for name, rs in runs.items()}
    print("\n| build | events/s (median of 3) | peak memory (median) |\n|---|---:|---:|")
    for name, (rate, rss) in medians.items():
        print(f"| {name} ({builds[name]}) | {rate:,.0f} | {rss:,.0f} MiB |")
    print(f"\nthis / baseline = {medians['this'][0] / medians['baseline'][0]:.3f}x events/s (medians)")


def main():
    if os.environ.get("BENCH_ONLY") == "builds":
        bench_builds()
        return
    if os.environ.get("BENCH_ONLY") == "ids":
        bench_ids()
        return
    if os.environ.get("BENCH_ONLY") == "trending":
        bench_trending()
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
