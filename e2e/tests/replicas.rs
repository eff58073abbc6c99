//! Reads on the replicated stack (`make up-ha`) never come from a ClickHouse replica that is
//! behind without a check: a job's start syncs the replica it reads its checkpoint from, and
//! the query service moves its reads off a lagging replica.
//!
//! Replica 2's fetches are stopped (`SYSTEM STOP FETCHES`) for the test's tables, so that it
//! misses what replica 1 took, as a replica that was down or slow would.

use std::path::Path;
use std::time::Duration;

use videocount_e2e::{Server, TestEnv, answers_ok, sleep_ms, wait_until};
use videocount_loadgen::{Amount, Expected, Spec, produce};

const REPLICA_1: &str = "http://127.0.0.1:8221";
const REPLICA_2: &str = "http://127.0.0.1:8222";

fn sql(url: &str, query: &str) -> String {
    let response = reqwest::blocking::Client::new().post(url).body(query.to_owned()).send().unwrap();
    let status = response.status();
    let text = response.text().unwrap();
    assert!(status.is_success(), "{query} on {url}: {text}");
    text.trim().to_owned()
}

/// `SYSTEM STOP FETCHES` or `START FETCHES` (`what`) on every table of the test's database on `url`.
fn fetches(env: &TestEnv, url: &str, what: &str) {
    let tables = sql(url, &format!("SELECT name FROM system.tables WHERE database = '{}'", env.database));
    for table in tables.lines() {
        sql(url, &format!("SYSTEM {what} FETCHES {}.{table}", env.database));
    }
}

fn counted_on(env: &TestEnv, url: &str) -> u64 {
    let query = format!("SELECT sum(count) FROM {}.event_counts_minute", env.database);
    sql(url, &query).parse().unwrap_or(0)
}

fn produce_more(env: &TestEnv, expected: &mut Expected, seed: u64, events: u64) {
    let spec = Spec { videos: 200, seed, ..Spec::default() };
    expected.merge(produce(env.brokers, &env.topic, spec, Amount::Count(events)).unwrap());
}

#[test]
#[ignore = "needs the replicated stack: make up-ha, then make test"]
fn a_start_reads_its_checkpoint_only_once_its_replica_has_caught_up() {
    let env = TestEnv::new_ha("replicasync", 4);
    let mut expected = Expected::default();
    fetches(&env, REPLICA_2, "STOP");
    produce_more(&env, &mut expected, 1, 20_000);
    // The first run writes through replica 1 only; replica 2 takes none of it.
    TestEnv::run_command_until_caught_up(env.job_via(REPLICA_1, &["--epoch-ms", "200"]));
    assert_eq!(counted_on(&env, REPLICA_1), expected.events);
    assert_eq!(counted_on(&env, REPLICA_2), 0, "replica 2 is behind");

    // The restart reads replica 2 first: its checkpoint there is empty until it fetches.
    produce_more(&env, &mut expected, 2, 10_000);
    let resume = std::thread::spawn({
        let database = env.database.clone();
        move || {
            sleep_ms(5_000);
            let tables = sql(REPLICA_2, &format!("SELECT name FROM system.tables WHERE database = '{database}'"));
            for table in tables.lines() {
                sql(REPLICA_2, &format!("SYSTEM START FETCHES {database}.{table}"));
            }
        }
    });
    let urls = format!("{REPLICA_2},{REPLICA_1}");
    TestEnv::run_command_until_caught_up(env.job_via(&urls, &["--epoch-ms", "200"]));
    resume.join().unwrap();
    for url in [REPLICA_1, REPLICA_2] {
        sql(url, &format!("SYSTEM SYNC REPLICA {}.event_counts_minute", env.database));
        assert_eq!(counted_on(&env, url), expected.events, "counted once, on {url}");
    }
    env.assert_exact(&expected);
    env.drop();
}

#[test]
#[ignore = "needs the replicated stack: make up-ha, then make test"]
fn the_query_service_moves_its_reads_off_a_replica_that_is_behind() {
    let env = TestEnv::new_ha("replicalag", 2);
    let mut expected = Expected::default();
    fetches(&env, REPLICA_2, "STOP");
    produce_more(&env, &mut expected, 3, 5_000);
    TestEnv::run_command_until_caught_up(env.job_via(REPLICA_1, &["--epoch-ms", "200"]));

    // Replica 2 first: it answers, but has nothing.
    let urls = format!("{REPLICA_2},{REPLICA_1}");
    let service = env.query_service_via(&urls, &["--max-replica-delay-secs", "2", "--no-memory"]);
    let ((video, _, _), _) = expected.minutes.iter().find(|((_, kind, _), _)| kind == "view").unwrap();
    let views: u64 = expected.minutes.iter().filter(|((v, k, _), _)| v == video && k == "view").map(|(_, n)| n).sum();
    let first = expected.minutes.keys().map(|k| k.2).min().unwrap() as u64 * 1000;
    let last = expected.minutes.keys().map(|k| k.2).max().unwrap() as u64 * 1000 + 60_000;
    let url = format!("{}/v1/videos/{video}/views?from={first}&to={last}", service.url);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let read = || {
        let response = http.get(&url).send().unwrap();
        let delay = response.headers().get("x-videocount-replica-delay").map(|v| v.to_str().unwrap().to_owned());
        let body: serde_json::Value = response.json().unwrap();
        (body["value"].as_u64(), delay)
    };
    wait_until("the query service reads from the replica that has the counts", Duration::from_secs(30), || {
        read().0 == Some(views)
    });
    let (_, delay) = read();
    let delay: u64 = delay.expect("every answer says how far behind its replica is").parse().unwrap();
    assert!(delay <= 2, "reads moved to a replica at most 2 s behind, not {delay}");
    fetches(&env, REPLICA_2, "START");
    drop(service);
    env.drop();
}

/// The views of every video of `expected` over a range holding all of its minutes, as
/// (video, count).
fn views_of(expected: &Expected) -> (Vec<(String, u64)>, u64, u64) {
    let mut views = std::collections::BTreeMap::<String, u64>::new();
    for ((video, kind, _), n) in &expected.minutes {
        if kind == "view" {
            *views.entry(video.clone()).or_insert(0) += n;
        }
    }
    let first = expected.minutes.keys().map(|k| k.2).min().unwrap() as u64 * 1000;
    let last = expected.minutes.keys().map(|k| k.2).max().unwrap() as u64 * 1000 + 60_000;
    (views.into_iter().collect(), first, last)
}

/// Memory on a replica: the job writes through replica 1, the query service reads replica 2
/// (it knows both URLs). Replica 2 stops fetching the changelog (`count_changes`) while events
/// arrive: the commits, the count tables and the markers reach it, the changes do not. Memory
/// must not apply a commit before its changes (it syncs the replica first, and stops answering
/// while it cannot: ClickHouse answers), and once fetches resume it answers every key from
/// memory, exactly.
#[test]
#[ignore = "needs the replicated stack: make up-ha, then make test"]
fn memory_on_a_replica_applies_no_commit_before_its_changes_arrive() {
    let env = TestEnv::new_ha("replicamem", 2);
    let mut expected = Expected::default();
    produce_more(&env, &mut expected, 5, 3_000);
    let _job = TestEnv::spawn_command(env.job_via(REPLICA_1, &["--epoch-ms", "200"]));
    wait_until("replica 2 has the first events", Duration::from_secs(60), || {
        counted_on(&env, REPLICA_2) == expected.events
    });
    let urls = format!("{REPLICA_2},{REPLICA_1}");
    let service = env.query_service_via(&urls, &["--memory-poll-ms", "100"]);
    let answers = |expected: &Expected| -> Vec<(String, u64, serde_json::Value)> {
        let (views, from, to) = views_of(expected);
        views
            .into_iter()
            .map(|(video, n)| {
                let path = format!("/v1/videos/{video}/events/view/count?from={from}&to={to}");
                (video, n, service.ok(&env.runtime, &path))
            })
            .collect()
    };
    let all_from_memory = |expected: &Expected| {
        answers(expected).iter().all(|(_, n, answer)| answer["source"] == "memory" && answer["value"] == *n)
    };
    wait_until("every key answered from memory, exactly", Duration::from_secs(60), || all_from_memory(&expected));

    // Replica 2 stops fetching the changelog; more events arrive and are committed.
    sql(REPLICA_2, &format!("SYSTEM STOP FETCHES {}.count_changes", env.database));
    produce_more(&env, &mut expected, 6, 3_000);
    let commits = |url| sql(url, &format!("SELECT max(epoch) FROM {}.checkpoint_commits", env.database));
    let changes = |url| sql(url, &format!("SELECT max(epoch) FROM {}.count_changes", env.database));
    // The counts reach replica 2 before the commit that covers them (the job commits an epoch
    // after all its writes): until that commit is there, memory rightly answers as of the one
    // before. Once it is, memory must not apply it without its changes.
    wait_until("replica 2 has the new counts and their commit", Duration::from_secs(60), || {
        counted_on(&env, REPLICA_2) == expected.events
            && commits(REPLICA_2).parse::<u64>().unwrap_or(0) >= changes(REPLICA_1).parse::<u64>().unwrap_or(u64::MAX)
    });
    // Polls that saw the older commit answer for up to three polls and half a second.
    sleep_ms(1_500);
    for (video, n, answer) in answers(&expected) {
        assert_eq!(
            answer["value"],
            n,
            "{video} while replica 2 misses the changelog: {answer}; commits {} on 1, {} on 2; changes {} on 1, {} on 2",
            commits(REPLICA_1),
            commits(REPLICA_2),
            changes(REPLICA_1),
            changes(REPLICA_2)
        );
    }

    sql(REPLICA_2, &format!("SYSTEM START FETCHES {}.count_changes", env.database));
    produce_more(&env, &mut expected, 7, 1_000);
    wait_until("replica 2 has every event", Duration::from_secs(60), || counted_on(&env, REPLICA_2) == expected.events);
    wait_until("every key answered from memory again, exactly", Duration::from_secs(60), || all_from_memory(&expected));
    drop(service);
    env.drop();
}

/// Stats from memory on a replica: `event_stats` writes through replica 1 and compacts every
/// second whatever minute ended; the query service reads replica 2 (a load there that sees an
/// emptied state without its compacted row reads again). Every
/// video's view count, distinct viewers and watch-time median are answered from memory as
/// replica 1 answers them, and both replicas hold the compacted rows.
#[test]
#[ignore = "needs the replicated stack: make up-ha, then make test"]
fn stats_memory_on_a_replica_answers_as_clickhouse_through_compactions() {
    let env = TestEnv::new_ha("replicastats", 2);
    let mut expected = Expected::default();
    produce_more(&env, &mut expected, 8, 3_000);
    let compacting = ["--epoch-ms", "200", "--compact-every-secs", "1", "--compact-grace-secs", "0"];
    let _job = TestEnv::spawn_command(env.stats_job_via(REPLICA_1, &compacting));
    let memory =
        env.query_service_via(&format!("{REPLICA_2},{REPLICA_1}"), &["--memory-poll-ms", "100", "--no-warm-up"]);
    let plain = env.query_service_via(REPLICA_1, &["--no-memory"]);
    // Keys load while the job writes and compacts.
    produce_more(&env, &mut expected, 9, 3_000);
    let (views, from, to) = views_of(&expected);
    let questions: Vec<String> = views
        .iter()
        .take(40)
        .flat_map(|(video, _)| {
            ["view/stats/count", "view/stats/uniq", "watch_time/stats/p50"]
                .map(|what| format!("/v1/videos/{video}/events/{what}?from={from}&to={to}"))
        })
        .collect();
    // Every question each round (not up to the first that disagrees): a key memory does not hold
    // loads when asked for, so they all load at once instead of one per round.
    let agree = || {
        let agreeing = questions.iter().filter(|path| {
            let (answer, replica_1) = (memory.ok(&env.runtime, path), plain.ok(&env.runtime, path));
            answer["source"] == "memory" && answer["value"] == replica_1["value"]
        });
        agreeing.count() == questions.len()
    };
    wait_until("every answer from memory on replica 2, as replica 1 answers it", Duration::from_secs(90), agree);
    let compacted =
        |url: &str| sql(url, &format!("SELECT count() FROM {}.stats_minute WHERE compacted = 1", env.database));
    wait_until("both replicas hold the same compacted rows", Duration::from_secs(30), || {
        let (on_1, on_2) = (compacted(REPLICA_1), compacted(REPLICA_2));
        on_1 != "0" && on_1 == on_2
    });
    drop(memory);
    env.drop();
}

/// Starts replica 1 again if the test fails with it down: once with `flags/force_restore_data`,
/// which lets it put the unregistered parts aside whatever their share, so the tests and the
/// chaos run after this one find the stack whole.
struct HealOnFailure<'a>(&'a Server);

impl Drop for HealOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() && !answers_ok(&format!("{REPLICA_1}/ping")) {
            let flags = self.0.data_path().join("flags");
            std::fs::create_dir_all(&flags).ok();
            std::fs::write(flags.join("force_restore_data"), "").ok();
            self.0.restart();
        }
    }
}

/// Copies a part's directory (its files; a part has no subdirectories).
fn copy_part(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for file in std::fs::read_dir(from).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
    }
}

/// A replica killed between writing an insert's part and registering it in ZooKeeper keeps a
/// part ZooKeeper never heard of. By default ClickHouse refuses to start while such parts hold
/// more than half of a table's rows, which a young table's first blocks do: the chaos run's
/// kill -9 of replica 1 once left it down for good. Every table of the schema now lets the
/// replica put those parts aside (their inserts were never acknowledged). The kill is made
/// certain here: each table gets three such parts, more rows than it has registered.
#[test]
#[ignore = "needs the replicated stack: make up-ha, then make test"]
fn a_replica_killed_during_inserts_starts_again() {
    let env = TestEnv::new_ha("replicakill", 1);
    let database = &env.database;
    let tables = sql(REPLICA_1, &format!("SELECT name FROM system.tables WHERE database = '{database}' ORDER BY name"));
    let tables: Vec<&str> = tables.lines().collect();
    assert_eq!(tables.len(), 17, "{tables:?}");
    let count = |table: &str| sql(REPLICA_1, &format!("SELECT count() FROM {database}.{table}"));
    let mut registered = Vec::new();
    for table in &tables {
        // One row of default values, registered in ZooKeeper like every acknowledged insert.
        sql(REPLICA_1, &format!("INSERT INTO {database}.{table} FORMAT JSONEachRow {{}}"));
        registered.push(count(table));
    }

    let server = Server::ha_clickhouse(1);
    let heal = HealOnFailure(&server);
    server.kill();
    let data = server.data_path().join("data").join(database);
    for table in &tables {
        let dir = data.join(table);
        let part = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .find(|name| name.ends_with("_0_0_0"))
            .unwrap_or_else(|| panic!("{table}: no part of the insert in {}", dir.display()));
        let partition = part.trim_end_matches("_0_0_0");
        for block in [900, 901, 902] {
            copy_part(&dir.join(&part), &dir.join(format!("{partition}_{block}_{block}_0")));
        }
    }
    server.restart();
    wait_until(
        "replica 1 answers after the kill (its log: var/ha/clickhouse-1/log/error.log)",
        Duration::from_secs(120),
        || answers_ok(&format!("{REPLICA_1}/ping")),
    );
    for (table, registered) in tables.iter().zip(&registered) {
        assert_eq!(&count(table), registered, "{table}: the registered rows only");
        let aside = std::fs::read_dir(data.join(table).join("detached")).unwrap().count();
        assert_eq!(aside, 3, "{table}: the unregistered parts put aside");
    }
    drop(heal);
    env.drop();
}
