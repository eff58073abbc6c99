//! The checkpoint under operations faults: plans that land late and out of order while the job
//! is killed again and again; a topic recreated; retention that deleted what an interrupted
//! epoch needs; a restart under other flags. Counts stay exact, or the job refuses to start and
//! says why (docs/exactly-once.md).

use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use videocount_e2e::{BROKERS, DelayingProxy, Hold, TestEnv, sleep_ms, wait_until};
use videocount_loadgen::{Amount, Spec, produce};

/// Half of the plan inserts are held back up to 3 s while the job (200 ms epochs, several
/// writer tasks) is killed every 1 to 4 s and events keep arriving; then a clean run. Before
/// plans were written in order and late plans of dead processes set aside, about a tenth of
/// the events were never counted (a later plan landed, the earlier one did not, and the
/// restart resumed after the later one) and epoch numbers were planned twice.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn plans_landing_late_and_out_of_order_under_kills_lose_nothing() {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = TestEnv::new("lateplans", 4);
    let proxy = DelayingProxy::start(seed, "checkpoint_ranges", 0.5, 0..3000);
    let (brokers, topic) = (videocount_e2e::BROKERS.to_string(), env.topic.clone());
    let producer = std::thread::spawn(move || {
        let spec = Spec { videos: 500, seed: 5, ..Spec::default() };
        produce(&brokers, &topic, spec, Amount::Rate { per_second: 20_000, duration: Duration::from_secs(24) })
    });

    let args = ["--workers", "2", "--epoch-ms", "200", "--writer-tasks", "4", "--checkpoint-snapshot-secs", "1"];
    for _ in 0..8 {
        let mut job = TestEnv::spawn_command(env.job_via(&proxy.url, &args));
        sleep_ms(rng.random_range(1000..4000));
        job.0.kill().unwrap(); // SIGKILL
        job.0.wait().unwrap();
    }
    let expected = producer.join().unwrap().unwrap();
    assert!(proxy.delayed.load(Ordering::Relaxed) > 0, "the proxy held plans back");
    // Plans still held by the proxy land while the last run reads the checkpoint and plans.
    env.run_until_caught_up(&args);
    sleep_ms(3500);
    env.assert_exact(&expected);
    drop(proxy);
    env.drop();
}

/// A plan landing while a start reads the checkpoint: the start must either count it (and say
/// so in the base epoch it records) or leave it to be set aside, never both. The proxy holds half
/// of the plan inserts up to 3 s and every read of the resume offsets 1.5 s, so late plans land
/// inside a start's reading. Before, a start counted such a plan (re-ran it) while recording a
/// base epoch that voided it for later starts, which counted its offsets again.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_plan_landing_while_a_start_reads_the_checkpoint_counts_once() {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = TestEnv::new("midload", 2);
    let rules = vec![
        Hold::inserts("checkpoint_ranges", 0.5, 0..3000),
        Hold {
            needle: "max(end_offset) AS end_offset FROM checkpoint_ranges".into(),
            share: 1.0,
            delay_ms: 1500..1501,
        },
    ];
    let proxy = DelayingProxy::with_rules(seed, rules);
    let (brokers, topic) = (BROKERS.to_string(), env.topic.clone());
    let producer = std::thread::spawn(move || {
        let spec = Spec { videos: 200, seed: 9, ..Spec::default() };
        produce(&brokers, &topic, spec, Amount::Rate { per_second: 10_000, duration: Duration::from_secs(24) })
    });
    let args = ["--epoch-ms", "100", "--writer-tasks", "4"];
    for _ in 0..8 {
        let mut job = TestEnv::spawn_command(env.job_via(&proxy.url, &args));
        sleep_ms(rng.random_range(2000..4000));
        job.0.kill().unwrap(); // SIGKILL
        job.0.wait().unwrap();
    }
    let expected = producer.join().unwrap().unwrap();
    env.run_until_caught_up(&args);
    sleep_ms(3500);
    env.assert_exact(&expected);
    drop(proxy);
    env.drop();
}

/// Deletes `topic` and creates it again with `partitions` (retrying while Kafka still deletes it).
fn recreate_topic(topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let admin: AdminClient<DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", videocount_e2e::BROKERS).create().unwrap();
        admin.delete_topics(&[topic], &AdminOptions::new()).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
            let created = admin.create_topics([&new], &AdminOptions::new()).await.unwrap();
            if created.iter().all(Result::is_ok) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "could not create {topic} again: {created:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

fn views(video: &str, n: usize) -> Vec<(String, String)> {
    (0..n).map(|_| (video.to_owned(), format!(r#"{{"video_id":"{video}","event_type":"view"}}"#))).collect()
}

/// A topic deleted and created again under the same name starts its offsets at 0 again: the
/// checkpoint's offsets lie beyond its end. Before, the job treated every new message below
/// them as already counted, showed no lag and exited 0 with `--until-caught-up`; now it refuses
/// to start and says what happened and what to do.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_recreated_topic_is_refused_not_skipped() {
    let env = TestEnv::new("recreated", 2);
    // Two runs, so the old job's rows carry two generations (a new job numbering its epochs from
    // generation 1 again would lie below the second), and a third that read only a message it
    // dead-lettered: its generation has a commit and no changelog row.
    for _ in 0..2 {
        videocount_e2e::produce_keyed(&env.topic, &views("before", 250));
        env.run_until_caught_up(&[]);
    }
    videocount_e2e::produce_keyed(&env.topic, &[("before".to_owned(), "not json".to_owned())]);
    env.run_until_caught_up(&[]);
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute"), 500);
    assert_eq!(env.scalar("SELECT count() FROM dead_letters"), 1);

    recreate_topic(&env.topic, 2);
    videocount_e2e::produce_keyed(&env.topic, &views("after", 100));
    let output = env.job(&["--until-caught-up"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the job must not skip the new topic's messages: {stderr}");
    assert!(stderr.contains("deleted and recreated"), "{stderr}");
    assert!(stderr.contains("--job-name"), "says what to do: {stderr}");
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute"), 500, "nothing was written");

    // A query service of the new checkpoint. Until that job commits, the count tables hold the
    // old job's counts only, and their changelog rows and markers are not the new job's: memory
    // must not take them for its own (before, it subtracted them: 0 views instead of 500).
    let service = env.query_service(&["--job-name", "view_counts_2", "--memory-poll-ms", "100"]);
    let views_of = |video: &str| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        service.ok(&env.runtime, &format!("/v1/videos/{video}/views?from={}&to={now}", now - 86_400_000))
    };
    let steady = |video: &str, views: u64| {
        for _ in 0..20 {
            let answer = views_of(video);
            assert_eq!(answer["value"].as_u64(), Some(views), "{video}: {answer}");
            sleep_ms(100);
        }
    };
    steady("before", 500);

    // What the message says to do: a new checkpoint counts the topic as it is now.
    env.run_until_caught_up(&["--job-name", "view_counts_2"]);
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute WHERE video_id = 'after'"), 100);
    // Its epochs are numbered above the old job's, whose changelog rows the service reads by
    // epoch alone (before, the new job started at generation 1, below the old job's second: a
    // load subtracted the second run's rows as if the new job had yet to apply them, 250 views).
    let newest = |job: &str| env.scalar(&format!("SELECT max(epoch) FROM checkpoint_commits WHERE job = '{job}'"));
    let first_new = env.scalar("SELECT min(epoch) FROM checkpoint_commits WHERE job = 'view_counts_2'");
    assert!(first_new > newest("view_counts"), "new job's first epoch {first_new} is above the old job's");
    wait_until("the new job's counts from memory", Duration::from_secs(10), || {
        let answer = views_of("after");
        answer["source"] == "memory" && answer["value"] == 100
    });
    wait_until("the old job's counts from memory", Duration::from_secs(10), || {
        views_of("before")["source"] == "memory"
    });
    steady("before", 500);
    steady("after", 100);
    env.drop();
}

/// Runs the job with `args` through a ClickHouse that never answers the commits, and kills it
/// once epochs were planned and their blocks landed: epochs left pending, to be re-run.
fn leave_epochs_pending(env: &TestEnv, args: &[&str]) {
    let proxy = DelayingProxy::start(1, "checkpoint_commits", 1.0, 3_600_000..3_600_001);
    let mut job = TestEnv::spawn_command(env.job_via(&proxy.url, args));
    wait_until("an epoch planned and its counts written", Duration::from_secs(60), || {
        env.scalar("SELECT count() FROM checkpoint_ranges") > 0
            && env.scalar("SELECT count() FROM event_counts_minute") > 0
    });
    sleep_ms(500);
    job.0.kill().unwrap(); // SIGKILL
    job.0.wait().unwrap();
    assert_eq!(env.scalar("SELECT count() FROM checkpoint_commits"), 0, "nothing committed");
}

/// A restart that would re-run interrupted epochs under other parse limits would write other
/// blocks (other events become dead letters), so what had landed would count twice. Before,
/// `view_counts` recorded no settings and re-ran them (exit 0); now it refuses, names the
/// settings, and the flags the epochs ran with finish them exactly.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_restart_under_other_parse_flags_does_not_re_run_interrupted_epochs() {
    let env = TestEnv::new("settings", 2);
    let spec = Spec { videos: 100, seed: 31, ..Spec::default() };
    let expected = produce(BROKERS, &env.topic, spec, Amount::Count(20_000)).unwrap();
    let args = ["--epoch-ms", "200", "--max-epochs-in-flight", "2"];
    leave_epochs_pending(&env, &args);

    let output = env.job(&[&args[..], &["--until-caught-up", "--max-age-secs", "60"]].concat()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "interrupted epochs must not be re-run under other flags: {stderr}");
    assert!(stderr.contains("interrupted under other settings") && stderr.contains("--max-age-secs 60"), "{stderr}");

    env.run_until_caught_up(&args);
    env.assert_exact(&expected);
    env.drop();
}

/// Deletes the messages of `partition` below `offset` (what retention does).
fn delete_records(topic: &str, partition: i32, offset: i64) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let admin: AdminClient<DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", BROKERS).create().unwrap();
        let mut offsets = rdkafka::TopicPartitionList::new();
        offsets.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset)).unwrap();
        let deleted = admin.delete_records(&offsets, &AdminOptions::new()).await.unwrap();
        for element in deleted.elements() {
            element.error().expect("records deleted");
        }
    });
}

/// Retention that deleted part of an interrupted epoch's range: re-run over what is left, the
/// epoch would write other blocks and its counts that had landed would count twice. Before, the
/// source moved to the log start with a warning and the job exited 0 having counted part of
/// the epoch twice; now it refuses to start and says what happened and what to do. Offsets never
/// read that retention deleted are refused the same way.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn retention_that_deleted_an_interrupted_epochs_messages_is_refused() {
    let env = TestEnv::new("retention", 1);
    let spec = Spec { videos: 100, seed: 32, ..Spec::default() };
    produce(BROKERS, &env.topic, spec, Amount::Count(20_000)).unwrap();
    let args = ["--epoch-ms", "200", "--max-epochs-in-flight", "2"];
    leave_epochs_pending(&env, &args);
    let (start, end) = (
        env.scalar("SELECT min(start_offset) FROM checkpoint_ranges"),
        env.scalar("SELECT max(end_offset) FROM checkpoint_ranges"),
    );
    assert!(end > start + 1, "a pending range to cut: {start}..{end}");
    let counted = env.scalar("SELECT sum(count) FROM event_counts_minute");
    delete_records(&env.topic, 0, ((start + end) / 2) as i64);

    let output = env.job(&[&args[..], &["--until-caught-up"]].concat()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a truncated epoch must not be re-run: {stderr}");
    assert!(stderr.contains("retention deleted offsets") && stderr.contains("--database"), "{stderr}");
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute"), counted, "nothing more was written");
    env.drop();
}

/// The job's consumer group carries the checkpoint's offsets, so kafka-consumer-groups and the
/// exporters operators already run see its lag. Before, the group never had an offset.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn the_consumer_group_shows_the_committed_offsets() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let env = TestEnv::new("group", 2);
    let spec = Spec { videos: 50, seed: 33, ..Spec::default() };
    produce(BROKERS, &env.topic, spec, Amount::Count(5_000)).unwrap();
    env.run_until_caught_up(&["--job-name", &env.database]);

    let group: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", format!("videocount-{}", env.database))
        .create()
        .unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    partitions.add_partition(&env.topic, 0);
    partitions.add_partition(&env.topic, 1);
    let committed = group.committed_offsets(partitions, Duration::from_secs(10)).unwrap();
    let mut total = 0;
    for element in committed.elements() {
        let (_, high) = group.fetch_watermarks(&env.topic, element.partition(), Duration::from_secs(10)).unwrap();
        assert_eq!(element.offset(), rdkafka::Offset::Offset(high), "partition {}", element.partition());
        total += high;
    }
    assert_eq!(total, 5_000);
    env.drop();
}

/// Two topics counted into one database: the count tables carry no topic, so two topics'
/// blocks for quiet epochs can be byte-identical and ClickHouse drops one as a repeat. Before,
/// the second topic's job ran; now it is refused and told to use a database of its own.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_second_topic_in_one_database_is_refused() {
    let first = TestEnv::new("owner", 1);
    let second = TestEnv::new("intruder", 1);
    videocount_e2e::produce_keyed(&first.topic, &views("a", 10));
    videocount_e2e::produce_keyed(&second.topic, &views("b", 10));
    first.run_until_caught_up(&[]);

    let output = second.job_on(&first.database, &["--until-caught-up"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "two topics in one database: {stderr}");
    assert!(stderr.contains(&first.topic) && stderr.contains("--database"), "{stderr}");
    assert_eq!(first.scalar("SELECT sum(count) FROM event_counts_minute"), 10, "nothing of the second topic written");
    // The first topic's jobs go on: view_counts again, and event_stats beside it.
    first.run_until_caught_up(&[]);
    TestEnv::run_command_until_caught_up(first.stats_job(&[]));
    first.drop();
    second.drop();
}

/// A configuration that could re-run more blocks after a crash than a table remembers for
/// deduplication: the repeated blocks beyond the window would count twice. Before, only
/// event_stats checked (its own tables, against a fixed number); now every job checks every
/// table it writes against the window the table has.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn re_runs_beyond_the_dedup_window_are_refused() {
    let env = TestEnv::new("window", 1);
    videocount_e2e::produce_keyed(&env.topic, &views("v", 10));
    let output = env.job(&["--until-caught-up", "--workers", "4", "--max-epochs-in-flight", "300"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "4 workers x 301 epochs of blocks exceed a 1000-block window: {stderr}");
    assert!(
        stderr.contains("replicated_deduplication_window") && stderr.contains("--max-epochs-in-flight"),
        "{stderr}"
    );
    env.run_until_caught_up(&["--workers", "4"]);
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute"), 10);
    env.drop();
}

/// Adds partitions to `topic` until it has `count`.
fn add_partitions(topic: &str, count: usize) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let admin: AdminClient<DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", BROKERS).create().unwrap();
        let added = admin.create_partitions([&NewPartitions::new(topic, count)], &AdminOptions::new()).await.unwrap();
        assert!(added.iter().all(Result::is_ok), "{added:?}");
    });
}

/// Produces `n` views of `video` into `partition`.
fn produce_to(topic: &str, partition: i32, video: &str, n: usize) {
    use rdkafka::producer::{BaseRecord, Producer};
    let producer = videocount_loadgen::producer(BROKERS).unwrap();
    let payload = format!(r#"{{"video_id":"{video}","event_type":"view"}}"#);
    for _ in 0..n {
        producer
            .send(BaseRecord::to(topic).partition(partition).key(video).payload(&payload))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Partitions added to the topic while the job runs are read from the next epoch on, and a
/// crash after that restarts exactly. Before, their events waited unseen until a restart.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn partitions_added_while_running_are_counted() {
    let env = TestEnv::new("newparts", 2);
    let total = |env: &TestEnv| env.scalar("SELECT sum(count) FROM event_counts_minute");
    let args = ["--epoch-ms", "200", "--workers", "2"];
    let mut job = TestEnv::spawn_command(env.job(&args));
    produce_to(&env.topic, 0, "old0", 300);
    produce_to(&env.topic, 1, "old1", 300);
    wait_until("the first partitions counted", Duration::from_secs(60), || total(&env) == 600);

    add_partitions(&env.topic, 5);
    for partition in 2..5 {
        produce_to(&env.topic, partition, &format!("new{partition}"), 200);
    }
    wait_until("the new partitions counted while running", Duration::from_secs(30), || total(&env) == 1200);

    job.0.kill().unwrap(); // SIGKILL
    job.0.wait().unwrap();
    for partition in 0..5 {
        produce_to(&env.topic, partition, &format!("after{partition}"), 100);
    }
    env.run_until_caught_up(&args);
    assert_eq!(total(&env), 1700);
    let per_video = env.counts("event_counts_minute", "0");
    for partition in 2..5 {
        let key = (format!("new{partition}"), "view".to_owned(), 0);
        assert_eq!(per_video.get(&key), Some(&200), "partition {partition} counted once");
    }
    env.drop();
}

/// After a recreated topic is counted under a new --job-name, `videocount replay` of the old
/// job (its default name) would rebuild the count tables from the old job's raw events only and
/// drop the new job's counts. With the new job's raw log off, nothing else told: before, the
/// replay swapped the tables in and the 100 new views were gone; now it refuses.
#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_replay_of_the_old_job_keeps_the_new_jobs_counts() {
    let env = TestEnv::new("recreatedreplay", 2);
    videocount_e2e::produce_keyed(&env.topic, &views("before", 300));
    env.run_until_caught_up(&[]);
    recreate_topic(&env.topic, 2);
    videocount_e2e::produce_keyed(&env.topic, &views("after", 100));
    env.run_until_caught_up(&["--job-name", "view_counts_2", "--no-events-raw"]);
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute WHERE video_id = 'after'"), 100);

    let (code, stdout, stderr) = env.videocount(&["replay", "--topic", &env.topic]);
    assert_ne!(code, 0, "the replay must not drop the new job's counts: {stdout}");
    assert!(stderr.contains("another job") && stderr.contains("--job-name"), "it says why: {stderr}");
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute WHERE video_id = 'after'"), 100);
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute WHERE video_id = 'before'"), 300);
    env.drop();
}
