//! The checkpoint under operations faults: plans that land late and out of order while the job
//! is killed again and again. Counts stay exact (docs/exactly-once.md, "Plans in order").

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{TestEnv, sleep_ms};
use rand::{Rng, SeedableRng};
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
fn plans_landing_late_and_out_of_order_under_kills_lose_nothing() {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = TestEnv::new("lateplans", 4);
    let proxy = DelayingProxy::start(seed, "checkpoint_ranges", 3000);
    let (brokers, topic) = (common::BROKERS.to_string(), env.topic.clone());
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
