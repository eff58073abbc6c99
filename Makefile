# videocount: every command a user or CI needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

KAFKA_BROKERS ?= 127.0.0.1:9092
CLICKHOUSE_URL ?= http://127.0.0.1:8123
CLICKHOUSE_DATABASE ?= video_counts
TOPIC ?= video-events
PARTITIONS ?= 8
WORKERS ?= 2
RATE ?= 2000
DURATION ?= 30
export KAFKA_BROKERS CLICKHOUSE_URL CLICKHOUSE_DATABASE

RELEASE := target/release
BINARIES := $(RELEASE)/view_counts $(RELEASE)/event_stats $(RELEASE)/videocount $(RELEASE)/loadgen $(RELEASE)/ingest $(RELEASE)/query $(RELEASE)/load_test
PYTHON ?= python3

.PHONY: help up up-ha down-ha down topic schema build ui run-job stop-job replay chaos-test test lint unit-test chdb-test bench bench-ingest bench-query bench-replay load-test stress-test clean

help: ## This list.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

up: ## Install what is missing, start Kafka, ClickHouse and ZooKeeper, wait until they answer.
	@services/up.sh

up-ha: ## The replicated stack beside it: 3 ZooKeeper, 3 Kafka brokers (RF 3, min ISR 2), 2 ClickHouse replicas (var/ha/).
	@services/up-ha.sh

down-ha: ## Stop only the HA stack and what runs on it (data stays in var/ha/).
	@scripts/stop-ha.sh
	@services/down.sh ha

down: ## Stop the services, the HA stack's too (data stays in var/).
	@scripts/stop-ha.sh
	@services/down.sh

topic: up ## Create topic TOPIC with PARTITIONS partitions (if missing).
	@services/kafka/topic.sh "$(TOPIC)" "$(PARTITIONS)"

build: ## Build every binary in release mode.
	cargo build --release --workspace --bins

ui: ## Bundle the browser UI into ui/dist (npm ci, esbuild; the query service serves it).
	@services/ui.sh

schema: up build ## Apply sql/schema.sql to CLICKHOUSE_DATABASE (idempotent).
	@$(RELEASE)/videocount --database "$(CLICKHOUSE_DATABASE)" schema

run-job: build ui ## Start view_counts, event_stats, ingest and query on TOPIC, feed them demo traffic, print the UI address. HA=1: on make up-ha, two of each.
ifeq ($(HA),1)
	@services/up-ha.sh
	@scripts/run-ha.sh
else
	@services/up.sh
	@services/kafka/topic.sh "$(TOPIC)" "$(PARTITIONS)" >/dev/null
	@$(RELEASE)/videocount --database "$(CLICKHOUSE_DATABASE)" schema
	@scripts/run-job.sh
endif

load-test: up build ui ## Start the stack if needed; RATE events/s (2000) for DURATION s (30) via the client; check every event via the read API.
	@services/kafka/topic.sh "$(TOPIC)" "$(PARTITIONS)" >/dev/null
	@$(RELEASE)/videocount --database "$(CLICKHOUSE_DATABASE)" schema
	@RATE="$(RATE)" DURATION="$(DURATION)" scripts/load-test.sh

stress-test: up build ui ## Raise the rate until p99, errors or freshness break; which resource ran out; the job alone on a full topic.
	@services/kafka/topic.sh "$(TOPIC)" "$(PARTITIONS)" >/dev/null
	@$(RELEASE)/videocount --database "$(CLICKHOUSE_DATABASE)" schema
	@scripts/stress-test.sh

stop-job: ## Stop what run-job started (each job flushes and records offsets first), HA=1's too.
	@scripts/stop-job.sh
	@scripts/stop-ha.sh

replay: up build ## Recompute all counts from events_raw (JOB_NAME, default view_counts) into fresh tables and swap them in (stops the stack first and starts it again after).
	@TOPIC="$(TOPIC)" CLICKHOUSE_DATABASE="$(CLICKHOUSE_DATABASE)" JOB_NAME="$(JOB_NAME)" scripts/replay.sh

lint: ## cargo fmt --check and clippy with warnings as errors.
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings

test: up lint ui ## Every test (unit, integration against the real services, the UI in Chromium, schema on current ClickHouse), all run even if one fails; a line of totals.
	@scripts/test.sh

chdb-test: up ## sql/schema.sql on current ClickHouse (chdb), with the local ZooKeeper.
	@$(PYTHON) -c 'import chdb, pytest' 2>/dev/null || $(PYTHON) -m pip install -q chdb pytest
	$(PYTHON) -m pytest -q tests/chdb

chaos-test: build ## On make up-ha, under 5,000 events/s: kill -9 a broker, a ClickHouse replica, the ZooKeeper leader, each active job, an ingest, a query; SIGSTOP a job past its lease. Lost must be 0.
	@services/up-ha.sh
	@scripts/chaos.py $(CHAOS_ARGS)

bench: up build ## Catch-up throughput on 10M events: 1 and 2 workers, with and without events_raw, vs ClickHouse's Kafka engine (BENCH_ONLY=ids: the cost of event ids; BENCH_ONLY=trending: the top lists on and off, their memory, /v1/top; BENCH_ONLY=builds BENCH_BASELINE_BIN=dir: view_counts of another build against this one).
	@scripts/bench.sh

bench-ingest: up build ## The ingest service on loopback: events/s in batches, requests/s of single events, p50/p99.
	@scripts/bench-ingest.sh

bench-replay: up build ## videocount replay over a year of events_raw (20M events; BENCH_REPLAY_EVENTS), vs the same GROUP BYs as plain SQL.
	@scripts/bench-replay.sh

bench-query: up build ## The query service over a loaded year of 10,000 videos: p50/p99/p999 and requests/s, 100 clients, vs plain SQL.
	@scripts/bench-query.sh

clean: ## Remove build output (not var/).
	cargo clean
