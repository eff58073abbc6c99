//! kill -9 at random moments while events keep arriving: after restarts, every event is
//! counted exactly once in every table.

use std::time::Duration;

use rand::Rng;
use videocount_e2e::{TestEnv, sleep_ms};
use videocount_loadgen::{Amount, Spec, produce};

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn three_kills_lose_nothing_and_count_nothing_twice() {
    let env = TestEnv::new("crash", 6);
    let (brokers, topic) = (videocount_e2e::BROKERS.to_string(), env.topic.clone());
    // 2.2M messages arrive, as fast as the producer goes, while the job runs and is killed.
    let producer = std::thread::spawn(move || {
        let spec = Spec { videos: 3000, seed: 11, ..Spec::default() };
        produce(&brokers, &topic, spec, Amount::Count(2_200_000))
    });

    let mut rng = rand::rng();
    // Short epochs: more epochs in flight when the kill lands; a checkpoint snapshot every
    // second, so restarts resume from snapshots too.
    let args = ["--workers", "2", "--epoch-ms", "200", "--checkpoint-snapshot-secs", "1"];
    for kill in 0..3 {
        let mut job = env.spawn(&args);
        sleep_ms(rng.random_range(1500..4000));
        assert!(job.0.try_wait().unwrap().is_none(), "job {kill} died on its own");
        job.0.kill().unwrap(); // SIGKILL
        job.0.wait().unwrap();
    }
    let expected = producer.join().unwrap().unwrap();
    assert!(expected.events >= 2_000_000, "produced {} events", expected.events);

    env.run_until_caught_up(&args);
    env.assert_exact(&expected);
    assert!(env.scalar("SELECT count() FROM checkpoint_snapshots") > 0, "the runs wrote snapshots");
    env.drop();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn sigterm_flushes_and_records_offsets() {
    let env = TestEnv::new("sigterm", 2);
    let spec = Spec { videos: 100, seed: 3, ..Spec::default() };
    let expected = produce(videocount_e2e::BROKERS, &env.topic, spec.clone(), Amount::Count(50_000)).unwrap();
    let mut job = env.spawn(&["--workers", "2"]);
    // Wait until everything produced so far is counted, then stop the job politely.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while env.scalar("SELECT count() FROM events_raw") < expected.events {
        assert!(std::time::Instant::now() < deadline, "job did not count the events");
        sleep_ms(200);
    }
    let pid = job.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = job.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "job did not stop after SIGTERM");
        sleep_ms(100);
    };
    assert!(status.success(), "job exited with {status}");

    // More events later: a restart continues from the recorded offsets.
    let mut expected = expected;
    expected
        .merge(produce(videocount_e2e::BROKERS, &env.topic, Spec { seed: 4, ..spec }, Amount::Count(20_000)).unwrap());
    env.run_until_caught_up(&["--workers", "1"]);
    env.assert_exact(&expected);
    env.drop();
}
