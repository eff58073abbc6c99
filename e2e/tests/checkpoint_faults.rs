//! The checkpoint under operations faults: plans that land late and out of order while the job
//! is killed again and again. Counts stay exact (docs/exactly-once.md, "Plans in order").

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use videocount_e2e::{TestEnv, sleep_ms};
use videocount_loadgen::{Amount, Spec, produce};

/// A TCP proxy in front of ClickHouse that holds back half of the INSERTs into `table` for a
/// random time, so they land late and out of order. It forwards what it holds even after the
/// client is gone: a killed process's request in flight.
struct DelayingProxy {
    url: String,
    stop: Arc<AtomicBool>,
    delayed: Arc<AtomicU64>,
}

impl DelayingProxy {
    fn start(seed: u64, table: &'static str, max_delay_ms: u64) -> DelayingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let (stop, delayed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (thread_stop, thread_delayed) = (Arc::clone(&stop), Arc::clone(&delayed));
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while !thread_stop.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let server = TcpStream::connect("127.0.0.1:8123").unwrap();
                let (mut client_read, mut server_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut server_read, mut client_write) = (server, client);
                let conn_seed: u64 = rng.random();
                let delayed = Arc::clone(&thread_delayed);
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(conn_seed);
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match client_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if is_insert_into(&buf[..n], table) && rng.random_bool(0.5) {
                            delayed.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(rng.random_range(0..max_delay_ms)));
                        }
                        if server_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server_write.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server_read, &mut client_write);
                });
            }
        });
        DelayingProxy { url, stop, delayed }
    }
}

/// Whether `chunk` holds the head of an `INSERT INTO table` (the query is in the URL).
fn is_insert_into(chunk: &[u8], table: &str) -> bool {
    let head = String::from_utf8_lossy(&chunk[..chunk.len().min(4096)]).replace("%20", " ").replace('+', " ");
    head.starts_with("POST ") && head.contains(&format!("INSERT INTO {table}"))
}

impl Drop for DelayingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

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
    let proxy = DelayingProxy::start(seed, "checkpoint_ranges", 3000);
    let (brokers, topic) = (videocount_e2e::BROKERS.to_string(), env.topic.clone());
    let producer = std::thread::spawn(move || {
        let spec = Spec { videos: 500, seed: 5, ..Spec::default() };
        produce(&brokers, &topic, spec, Amount::Rate { per_second: 20_000, duration: Duration::from_secs(24) })
    });

    let args = ["--workers", "2", "--epoch-ms", "200", "--writer-tasks", "4"];
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
    videocount_e2e::produce_keyed(&env.topic, &views("before", 500));
    env.run_until_caught_up(&[]);
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute"), 500);

    recreate_topic(&env.topic, 2);
    videocount_e2e::produce_keyed(&env.topic, &views("after", 100));
    let output = env.job(&["--until-caught-up"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the job must not skip the new topic's messages: {stderr}");
    assert!(stderr.contains("deleted and recreated"), "{stderr}");
    assert!(stderr.contains("--job-name"), "says what to do: {stderr}");
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute"), 500, "nothing was written");

    // What the message says to do: a new checkpoint counts the topic as it is now.
    env.run_until_caught_up(&["--job-name", "view_counts_2"]);
    assert_eq!(env.scalar("SELECT sum(count) FROM event_counts_minute WHERE video_id = 'after'"), 100);
    env.drop();
}
