#!/usr/bin/env bash
# The test part of `make test`: every test binary runs even when one fails (--no-fail-fast),
# then the schema on current ClickHouse (chdb), then the short chaos run, then one line of totals, so a failure never
# hides the tests after it. Exits non-zero when anything failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p var
log=var/test.log
started=$SECONDS

# The end-to-end tests (e2e/) run the binaries of the other crates (view_counts, event_stats,
# videocount, ingest, query). They and the other tests that need the live services are marked
# #[ignore = "needs ..."], so a plain `cargo test` without `make up` lists them as ignored;
# here they run (--include-ignored), and the totals line must say 0 ignored.
cargo build --profile tests --workspace --bins || exit 1
# The replicated stack (make up-ha) for e2e/tests/replicas.rs and the chaos run; one that ran
# before stays up afterwards.
ha_was_up=$(curl -fsS --max-time 2 http://127.0.0.1:8221/ping 2>/dev/null)
services/up-ha.sh || exit 1
cargo test --profile tests --workspace --no-fail-fast -- --include-ignored --test-threads=1 2>&1 | tee "$log"
cargo_status=${PIPESTATUS[0]}
make --no-print-directory chdb-test 2>&1 | tee var/chdb-test.log
chdb_status=${PIPESTATUS[0]}
# The short chaos run on the replicated stack: a ClickHouse replica, the active view_counts and
# an ingest killed under load; lost must be 0.
CHAOS_BIN="$PWD/target/tests" scripts/chaos.py --short 2>&1 | tee var/chaos-test.log
chaos_status=${PIPESTATUS[0]}
[ -n "$ha_was_up" ] || services/down.sh ha >/dev/null

# `test result: ok. 12 passed; 0 failed; 1 ignored; ...` once per test binary and doctest run.
read -r binaries passed failed ignored < <(awk '
    /^test result: / { n++; for (i = 1; i <= NF; i++) {
        if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
    END { printf "%d %d %d %d\n", n, p, f, g }' "$log")
# pytest: `5 passed, 1 failed in 3.2s`
chdb=$(grep -Eo '[0-9]+ (passed|failed|error)[^=]* in [0-9.]+s' var/chdb-test.log | tail -n 1)
chaos=$(grep -Eo '^chaos: [0-9]+ of [0-9]+ faults run, lost [0-9]+, doubled [0-9]+' var/chaos-test.log | tail -n 1 | cut -c8-)
# Under `failures:` each failed test on its own indented line; with --no-fail-fast cargo ends
# with the failed targets as `-p crate --test name`.
failing=$(grep -E '^    ([a-z_0-9:]+|`-p .*`)$' "$log" | sed 's/^ *//' | sort -u | paste -sd ' ' -)

elapsed=$((SECONDS - started))
summary="make test: cargo ${passed} passed, ${failed} failed, ${ignored} ignored in ${binaries} test runs; chdb ${chdb:-did not run}; chaos ${chaos:-did not run}; $((elapsed / 60))m $((elapsed % 60))s"
if [ "$cargo_status" -ne 0 ] || [ "$chdb_status" -ne 0 ] || [ "$chaos_status" -ne 0 ]; then
    [ -n "$failing" ] && echo "failing: $failing"
    echo "$summary: FAILED (cargo exit $cargo_status, chdb exit $chdb_status, chaos exit $chaos_status)"
    exit 1
fi
echo "$summary: all passed"
