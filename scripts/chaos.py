#!/usr/bin/env python3
"""`make chaos-test`: one fault at a time on the replicated stack, under steady load.

Needs `make up-ha`. Starts videocount on it (scripts/start-ha.sh: two ingest, two query, an
active and a standby instance of each job) in a fresh topic and database, then for each fault:
runs `load_test run` through the client library over both ingest services (RATE events/s),
injects the fault BEFORE seconds in, holds it HOLD seconds, heals it (restarts what was killed,
SIGCONT what was stopped) and lets the load run AFTER more seconds; then the load test waits
until the counts settle and checks every (video, type) count through the read API, failing
over between both query services.

Per fault it reports: events acknowledged and counted; lost (acknowledged, not counted: must
be 0); doubled (counted more often than acknowledged: a client retry after a lost
acknowledgement that was counted twice; the load test's client gives every event an id, so it
must be 0); the share of write requests answered 2xx (the
client retries the rest on the other ingest); the share of reads answered (a reader every
100 ms over both query services); the job's failover time (the fault until another instance
holds the lease, read from the jobs' `videocount_job_lease_held`); freshness p99 over the run
(a canary: acknowledged to counted). Besides, per fault, the jobs' own output is checked
against the messages they read (each Kafka message once in events_raw, the counts equal to
it, every event_stats function's count equal to its type's events), and at the end every
message of the topic must be in events_raw or view_counts' dead letters. Prints a Markdown table
and writes it to var/chaos-report.md. Exits 1 if any fault lost or doubled an event, a job wrote
a message twice or skipped one, reads fell below 95 %, or the stack did not heal. A passing run
drops its database and topics; a failing one keeps them.

  scripts/chaos.py [--short] [--faults a,b] [--rate R] [--before S] [--hold S] [--after S]

--short (make test) runs three faults, shorter. CHAOS_BIN picks the binaries' directory
(target/release by default).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HA = os.path.join(ROOT, "var", "ha")
APPS = os.path.join(HA, "apps")
BIN = os.environ.get("CHAOS_BIN", os.path.join(ROOT, "target", "release"))
INGEST_URLS = "http://127.0.0.1:8180,http://127.0.0.1:8182"
QUERY_URLS = "http://127.0.0.1:8181,http://127.0.0.1:8183"
JOB_METRICS = {
    "view_counts": {"view_counts-a": 9201, "view_counts-b": 9202},
    "event_stats": {"event_stats-a": 9203, "event_stats-b": 9204},
}
SERVICE_NODES = ["zookeeper-1", "zookeeper-2", "zookeeper-3", "kafka-1", "kafka-2", "kafka-3",
                 "clickhouse-1", "clickhouse-2"]
APP_NAMES = ["ingest-1", "ingest-2", "query-1", "query-2"] + [i for j in JOB_METRICS.values() for i in j]


REPLICAS = ["http://127.0.0.1:8221", "http://127.0.0.1:8222"]
HA_BROKERS = "127.0.0.1:9191,127.0.0.1:9192,127.0.0.1:9193"


def say(message):
    print(f"chaos: {message}", flush=True)


def pid_of(path):
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def node_pid(node):
    return pid_of(os.path.join(HA, node, "pid"))


def app_pid(name):
    return pid_of(os.path.join(APPS, name, "pid"))


def lease_held(port):
    """1 or 0 from an instance's metrics; None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return None
    found = re.search(r"^videocount_job_lease_held\{[^}]*\} (\d+)", text, re.M)
    return int(found.group(1)) if found else None


def active_instance(job):
    for name, port in JOB_METRICS[job].items():
        if lease_held(port) == 1:
            return name
    return None


def zookeeper_leader():
    for n in (1, 2, 3):
        try:
            out = subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/228{n}; printf stat >&3; cat <&3"],
                                 capture_output=True, text=True, timeout=5).stdout
        except subprocess.TimeoutExpired:
            continue
        if "Mode: leader" in out:
            return f"zookeeper-{n}"
    return "zookeeper-1"


def sql_on(url, query, database, timeout=30):
    """The answer of the replica at `url` (TSV, stripped); OSError if it gives none."""
    request = urllib.request.Request(f"{url}/?database={database}", data=query.encode())
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return r.read().decode().strip()


def sql(query, database, timeout=30):
    """The answer of the first replica that gives one (TSV, stripped)."""
    error = None
    for url in REPLICAS:
        try:
            return sql_on(url, query, database, timeout)
        except OSError as e:
            error = e
    raise RuntimeError(f"no replica answered {query!r}: {error}")


def kafka_tool(tool, *args):
    """Runs one of Kafka's command-line tools (org.apache.kafka.tools.<tool>) on the HA brokers;
    its standard output."""
    libs = os.path.join(ROOT, "var", "kafka", "libs", "*")
    return subprocess.run(
        ["java", "-Xmx128m", f"-Dkafka.logs.dir={os.path.join(ROOT, 'var', 'kafka')}", "-cp", libs,
         f"org.apache.kafka.tools.{tool}", "--bootstrap-server", HA_BROKERS, *args],
        capture_output=True, text=True, timeout=120, check=True).stdout


def kafka_end_offsets(topic):
    """Each partition's end offset: the messages it holds, from 0 (nothing was deleted)."""
    out = kafka_tool("GetOffsetShell", "--topic", topic)
    ends = {}
    for line in out.split():
        if line.count(":") >= 2:
            _, partition, offset = line.rsplit(":", 2)
            ends[int(partition)] = int(offset)
    return ends


def job_check(database, run_id, limit=120):
    """What the jobs wrote for one load run, against the messages they read: every message in
    events_raw once, the counts equal to events_raw, and event_stats' count of every function
    equal to the events of its type. Returns a list of problems (empty: exact)."""
    videos = f"video_id LIKE '{run_id}-v%'"
    deadline = time.time() + limit
    while True:
        for table in ("events_raw", "event_counts_minute", "stats_minute"):
            sql(f"SYSTEM SYNC REPLICA {table}", database, timeout=150)
        rows, messages = map(int, sql(f"SELECT count(), uniqExact(partition, offset) FROM events_raw WHERE {videos}",
                                      database).split())
        counted = int(sql(f"SELECT sum(count) FROM event_counts_minute WHERE {videos}", database) or 0)
        by_type = dict(line.split("\t") for line in sql(
            f"SELECT event_type, count() FROM events_raw WHERE {videos} GROUP BY event_type", database).splitlines())
        stats = [line.split("\t") for line in sql(
            f"SELECT event_type, aggregate, sum(count) FROM stats_minute WHERE {videos} GROUP BY event_type, aggregate",
            database).splitlines()]
        problems = []
        if rows != messages:
            problems.append(f"events_raw holds {rows - messages} messages twice")
        if counted != rows:
            problems.append(f"event_counts_minute counts {counted} for {rows} events in events_raw")
        for event_type, function, count in stats:
            if int(count) != int(by_type.get(event_type, 0)):
                problems.append(f"stats_minute {event_type}/{function} counts {count} for {by_type.get(event_type, 0)}")
        if not problems or time.time() >= deadline:
            return problems
        time.sleep(2)


def topic_check(topic, database, limit=180):
    """Every message of the session's topic (load, canaries) up to its end offsets now is in
    events_raw or view_counts' dead letters, once: the jobs skipped nothing. (The query services' canaries
    keep writing meanwhile, so only the offsets below those ends are compared.) Returns a list
    of problems."""
    ends = kafka_end_offsets(topic)
    total = sum(ends.values())
    below = "offset < multiIf(" + ", ".join(f"partition = {p}, {e}" for p, e in sorted(ends.items())) + ", 0)"
    deadline = time.time() + limit
    while True:
        sql("SYSTEM SYNC REPLICA events_raw", database, timeout=150)
        raw = int(sql(f"SELECT uniqExact(partition, offset) FROM events_raw WHERE {below}", database))
        # view_counts' own: event_stats writes its dead letters beside them (duplicates of event
        # ids are dead letters of both jobs).
        dead = int(sql(f"SELECT count() FROM dead_letters WHERE job = 'view_counts' AND {below}", database))
        if raw + dead == total:
            dups = sql(f"SELECT countIf(reason = 'duplicate event_id') FROM dead_letters WHERE job = 'view_counts' AND {below}",
                       database)
            say(f"the topic's {total:,} messages: {raw:,} in events_raw, {dead:,} dead letters ({int(dups):,} duplicate "
                f"event ids: client retries counted once), none missing")
            return []
        if raw + dead > total or time.time() >= deadline:
            return [f"the topic held {total} messages; events_raw has {raw} of them and dead_letters {dead}"]
        time.sleep(2)


class Stack:
    def __init__(self, topic, database):
        self.topic, self.database = topic, database
        self.env = dict(os.environ, TOPIC=topic, CLICKHOUSE_DATABASE=database, VIDEOCOUNT_BIN=BIN)

    def start_apps(self, first=False):
        args = [os.path.join(ROOT, "scripts", "start-ha.sh")] + ([] if first else ["--apps-only"])
        subprocess.run(args, env=self.env, check=True)

    def remove(self):
        """Drops the run's database on both replicas and deletes its topics (a passing run's: a
        failing one keeps them to be looked at), so that runs do not pile tables up on the stack."""
        for url in REPLICAS:
            sql_on(url, f"DROP DATABASE IF EXISTS {self.database}", "default", timeout=120)
        for topic in (self.topic, f"{self.topic}-dlq"):
            kafka_tool("TopicCommand", "--delete", "--if-exists", "--topic", topic)

    def heal_services(self):
        subprocess.run([os.path.join(ROOT, "services", "up-ha.sh")], check=True, stdout=subprocess.DEVNULL)

    def wait_healthy(self, limit=180):
        """Every node and app runs, and each job has an active instance."""
        deadline = time.time() + limit
        while time.time() < deadline:
            missing = [n for n in SERVICE_NODES if node_pid(n) is None] + [a for a in APP_NAMES if app_pid(a) is None]
            inactive = [job for job in JOB_METRICS if active_instance(job) is None]
            if not missing and not inactive:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the stack is not healthy after {limit} s: not running {missing}, no active {inactive}")


def kill(pid, sig=signal.SIGKILL):
    if pid is not None:
        os.kill(pid, sig)


def watch_failover(job, killed, since, limit):
    """Seconds from `since` until an instance other than `killed` holds the job's lease."""
    deadline = time.time() + limit
    while time.time() < deadline:
        for name, port in JOB_METRICS[job].items():
            if name != killed and lease_held(port) == 1:
                return time.time() - since
        time.sleep(0.1)
    return None


# Each fault: (inject(stack) -> (what, job, killed instance, heal(stack))).
def service_fault(node_choice):
    def inject(stack):
        node = node_choice()
        kill(node_pid(node))
        return f"kill -9 {node}", None, None, lambda s: s.heal_services()
    return inject


def job_fault(job, sig):
    def inject(stack):
        name = active_instance(job)
        pid = app_pid(name)
        kill(pid, sig)
        if sig == signal.SIGSTOP:
            return f"SIGSTOP active {job} ({name}) past its lease", job, name, lambda s: (kill(pid, signal.SIGCONT),
                                                                                           time.sleep(3), s.start_apps())
        return f"kill -9 active {job} ({name})", job, name, lambda s: s.start_apps()
    return inject


def app_fault(name):
    def inject(stack):
        kill(app_pid(name))
        return f"kill -9 {name}", None, None, lambda s: s.start_apps()
    return inject


CUT_CGROUP = "/sys/fs/cgroup/unified/videocount-chaos"


def iptables(action, *rule):
    subprocess.run(["iptables", action, *rule], check=True)


def network_fault(node, ports):
    """Cuts `node` off: nothing reaches its ports, nothing it sends leaves (its process is put in
    a cgroup whose packets the OUTPUT chain drops), both ways on loopback, as a switch that
    lost the host would. Healed by removing the rules."""
    output = ["OUTPUT", "-o", "lo", "-m", "cgroup", "--path", os.path.basename(CUT_CGROUP), "-j", "DROP"]
    inbound = ["INPUT", "-i", "lo", "-p", "tcp", "-m", "multiport", "--dports", ports, "-j", "DROP"]

    def inject(stack):
        pid = node_pid(node)
        os.makedirs(CUT_CGROUP, exist_ok=True)
        with open(os.path.join(CUT_CGROUP, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        iptables("-I", *output)
        iptables("-I", *inbound)

        def heal(stack):
            iptables("-D", *inbound)
            iptables("-D", *output)
            with open(os.path.join(os.path.dirname(CUT_CGROUP), "cgroup.procs"), "w") as f:
                f.write(str(pid))
            os.rmdir(CUT_CGROUP)
        return f"network: {node} cut off (iptables)", None, None, heal
    return inject


def no_fault(stack):
    return "none (baseline)", None, None, lambda s: None


FAULTS = {
    "none": no_fault,
    "kafka": service_fault(lambda: "kafka-2"),
    "clickhouse": service_fault(lambda: "clickhouse-1"),
    "zookeeper": service_fault(zookeeper_leader),
    "view_counts": job_fault("view_counts", signal.SIGKILL),
    "event_stats": job_fault("event_stats", signal.SIGKILL),
    "pause": job_fault("view_counts", signal.SIGSTOP),
    "partition": network_fault("kafka-2", "9192,9292"),
    "ingest": app_fault("ingest-1"),
    "query": app_fault("query-1"),
}
SHORT = ["clickhouse", "view_counts", "ingest"]
# Reads answered (%) below which a fault fails the run: one fault never takes both query
# services or both replicas away.
MIN_READS_ANSWERED = 95.0
FULL = [f for f in FAULTS if f != "none"]


def run_fault(stack, key, args):
    stack.wait_healthy()
    duration = args.before + args.hold + args.after
    load = subprocess.Popen(
        [os.path.join(BIN, "load_test"), "run", "--rate", str(args.rate), "--duration", str(duration),
         "--ingest-url", INGEST_URLS, "--query-url", QUERY_URLS, "--settle", "240", "--videos", "500",
         "--max-error-rate", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(args.before)
    at = time.time()
    what, job, killed, heal = FAULTS[key](stack)
    say(f"{key}: {what}")
    failover = watch_failover(job, killed, at, args.hold) if job else None
    time.sleep(max(0.0, at + args.hold - time.time()))
    say(f"{key}: healing")
    heal(stack)
    out, _ = load.communicate()
    result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        raise RuntimeError(f"load_test printed no result for {key}:\n{out}")
    exact = result["exactness"] or {}
    problems = job_check(stack.database, result["run_id"])
    for problem in problems:
        say(f"{key}: JOB NOT EXACT: {problem}")
    share = lambda part, whole: 100.0 * part / whole if whole else 100.0
    row = {
        "fault": what,
        "acknowledged": result["accepted"],
        "counted": exact.get("counted"),
        "lost": exact.get("lost_events"),
        "doubled": exact.get("doubled_events"),
        "write_2xx": share(result["requests_2xx"], result["requests"]),
        "read_ok": share(result["reads"] - result["reads_failed"], result["reads"]),
        "failover_s": failover,
        "freshness_p99_s": result["freshness_s"]["p99"],
        "unacknowledged": result["failed"],
        "jobs_exact": not problems,
    }
    say(f"{key}: {json.dumps(row)}")
    return row


def table(rows, args):
    head = ("| fault | acknowledged | counted | lost | doubled | jobs: each message once | write requests 2xx "
            "| reads answered | job failover | freshness p99 |\n|---|---|---|---|---|---|---|---|---|---|\n")
    fmt = lambda v, f: "-" if v is None else f.format(v)
    body = "".join(
        f"| {r['fault']} | {r['acknowledged']:,} | {fmt(r['counted'], '{:,}')} | {fmt(r['lost'], '{:,}')} "
        f"| {fmt(r['doubled'], '{:,}')} | {'yes' if r['jobs_exact'] else 'NO'} | {r['write_2xx']:.2f} % | {r['read_ok']:.2f} % "
        f"| {fmt(r['failover_s'], '{:.1f} s')} | {fmt(r['freshness_p99_s'], '{:.1f} s')} |\n" for r in rows)
    return (f"{args.rate:,} events/s through the client over both ingest services; each fault "
            f"{args.before} s in, held {args.hold} s, then healed; {args.after} s more load.\n\n" + head + body)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="three faults, shorter (make test)")
    parser.add_argument("--faults", help=f"comma-separated, of {','.join(FAULTS)}")
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--before", type=int, default=10)
    parser.add_argument("--hold", type=int, default=30)
    parser.add_argument("--after", type=int, default=15)
    args = parser.parse_args()
    if args.short:
        args.rate, args.before, args.hold, args.after = min(args.rate, 2000), 5, 15, 5
    faults = args.faults.split(",") if args.faults else (SHORT if args.short else ["none"] + FULL)
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {','.join(FAULTS)}")
    if any(node_pid(n) is None for n in SERVICE_NODES):
        sys.exit("chaos: the HA stack is not running: make up-ha")
    run = uuid.uuid4().hex[:8]
    stack = Stack(f"chaos-{run}", f"chaos_{run}")
    subprocess.run([os.path.join(ROOT, "scripts", "stop-ha.sh")], check=True)
    say(f"topic chaos-{run}, database chaos_{run}; faults: {', '.join(faults)}")
    stack.start_apps(first=True)
    rows, failed = [], []
    try:
        for key in faults:
            try:
                rows.append(run_fault(stack, key, args))
            except Exception as error:  # noqa: BLE001 - a fault that breaks the stack is a finding
                failed.append(f"{key}: {error}")
                say(f"{key}: FAILED: {error}")
        stack.wait_healthy()
        failed += topic_check(stack.topic, stack.database)
    except RuntimeError as error:
        failed.append(str(error))
    finally:
        subprocess.run([os.path.join(ROOT, "scripts", "stop-ha.sh")], check=False, stdout=subprocess.DEVNULL)
    report = table(rows, args)
    os.makedirs(os.path.join(ROOT, "var"), exist_ok=True)
    with open(os.path.join(ROOT, "var", "chaos-report.md"), "w") as f:
        f.write(report)
    print(report)
    lost = sum(r["lost"] or 0 for r in rows)
    unchecked = [r["fault"] for r in rows if r["lost"] is None]
    failed += [f"{r['fault']}: the jobs wrote something twice or missed it (see above)" for r in rows
               if not r["jobs_exact"]]
    # Every fault leaves a query service and a replica answering: reads must keep working.
    failed += [f"{r['fault']}: only {r['read_ok']:.1f} % of reads answered" for r in rows
               if r["read_ok"] < MIN_READS_ANSWERED]
    doubled = sum(r["doubled"] or 0 for r in rows)
    summary = f"chaos: {len(rows)} of {len(faults)} faults run, lost {lost}, doubled {doubled}"
    if failed or lost or doubled or unchecked:
        print(f"{summary}: FAILED {'; '.join(failed + [f'unchecked: {u}' for u in unchecked])}")
        sys.exit(1)
    try:
        stack.remove()
    except (OSError, subprocess.SubprocessError) as error:
        say(f"could not remove database {stack.database} and topic {stack.topic}: {error}")
    print(f"{summary}: passed")


if __name__ == "__main__":
    main()
