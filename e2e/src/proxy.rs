//! A proxy in front of ClickHouse that holds some inserts back: a slow or stuck server as the
//! job sees it, for the checkpoint fault tests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rand::{Rng, SeedableRng};

use crate::{CLICKHOUSE_URL, sleep_ms};

/// A TCP proxy in front of ClickHouse that holds back a `share` of the INSERTs into `table` for
/// a random time drawn from `delay_ms`, so they land late and out of order (or, with a delay
/// longer than the test, never). It forwards what it holds even after the client is gone: a
/// killed process's request in flight.
pub struct DelayingProxy {
    pub url: String,
    stop: Arc<AtomicBool>,
    /// How many requests it held back.
    pub delayed: Arc<AtomicU64>,
}

impl DelayingProxy {
    pub fn start(seed: u64, table: &'static str, share: f64, delay_ms: Range<u64>) -> DelayingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let (stop, delayed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (thread_stop, thread_delayed) = (Arc::clone(&stop), Arc::clone(&delayed));
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while !thread_stop.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    sleep_ms(2);
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(CLICKHOUSE_URL.trim_start_matches("http://")) else {
                    continue;
                };
                let (mut client_read, mut server_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut server_read, mut client_write) = (server, client);
                let conn_seed: u64 = rng.random();
                let (delayed, delay_ms) = (Arc::clone(&thread_delayed), delay_ms.clone());
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(conn_seed);
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match client_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if is_insert_into(&buf[..n], table) && rng.random_bool(share) {
                            delayed.fetch_add(1, Ordering::Relaxed);
                            sleep_ms(rng.random_range(delay_ms.clone()));
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
