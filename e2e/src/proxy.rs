//! A proxy in front of ClickHouse that holds some inserts back: a slow or stuck server as the
//! job sees it, for the checkpoint fault tests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rand::{Rng, SeedableRng};

use crate::{CLICKHOUSE_URL, sleep_ms};

/// What the proxy holds back: a `share` of the requests whose head contains `needle` (an
/// `INSERT INTO table`, a piece of a query), each for a random time drawn from `delay_ms`.
#[derive(Clone, Debug)]
pub struct Hold {
    pub needle: String,
    pub share: f64,
    pub delay_ms: Range<u64>,
}

impl Hold {
    /// A share of the inserts into `table`.
    pub fn inserts(table: &str, share: f64, delay_ms: Range<u64>) -> Hold {
        Hold { needle: format!("INSERT INTO {table}"), share, delay_ms }
    }
}

/// A TCP proxy in front of ClickHouse that holds back requests as its [`Hold`] rules say, so
/// they land late and out of order (or, with a delay longer than the test, never). It forwards
/// what it holds even after the client is gone: a killed process's request in flight; unless
/// told to [`DelayingProxy::discard_held`].
pub struct DelayingProxy {
    pub url: String,
    stop: Arc<AtomicBool>,
    /// Requests held now and later are dropped instead of forwarded.
    discard: Arc<AtomicBool>,
    /// How many requests it held back.
    pub delayed: Arc<AtomicU64>,
}

impl DelayingProxy {
    pub fn start(seed: u64, table: &'static str, share: f64, delay_ms: Range<u64>) -> DelayingProxy {
        DelayingProxy::with_rules(seed, vec![Hold::inserts(table, share, delay_ms)])
    }

    pub fn with_rules(seed: u64, rules: Vec<Hold>) -> DelayingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let (stop, delayed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let discard = Arc::new(AtomicBool::new(false));
        let (thread_stop, thread_delayed, thread_discard) =
            (Arc::clone(&stop), Arc::clone(&delayed), Arc::clone(&discard));
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
                let (delayed, discard, rules) =
                    (Arc::clone(&thread_delayed), Arc::clone(&thread_discard), rules.clone());
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(conn_seed);
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match client_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let head = request_head(&buf[..n]);
                        for rule in rules.iter().filter(|rule| head.contains(&rule.needle)) {
                            if rng.random_bool(rule.share) {
                                delayed.fetch_add(1, Ordering::Relaxed);
                                sleep_ms(rng.random_range(rule.delay_ms.clone()));
                                if discard.load(Ordering::Relaxed) {
                                    // Never sent: the server sees a connection closed before
                                    // the request, and does nothing.
                                    return;
                                }
                            }
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
        DelayingProxy { url, stop, discard, delayed }
    }

    /// Drops every request held now or later instead of forwarding it: requests of a killed
    /// process that never reached the server. Returns after half a second, once a request let
    /// through just before has landed.
    pub fn discard_held(&self) {
        self.discard.store(true, Ordering::Relaxed);
        sleep_ms(500);
    }
}

/// The head of a request as text, URL-decoded enough to find SQL in it (an insert's query is in
/// the URL, a SELECT's in the body that follows the headers); empty unless it starts a POST.
fn request_head(chunk: &[u8]) -> String {
    let head = String::from_utf8_lossy(&chunk[..chunk.len().min(4096)]).replace("%20", " ").replace('+', " ");
    if head.starts_with("POST ") { head } else { String::new() }
}

impl Drop for DelayingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
