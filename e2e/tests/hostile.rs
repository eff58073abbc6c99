//! Clients that are slow, silent or careless, against both HTTP services: what they cannot do
//! to a service (issue "The HTTP services and the CLI under hostile and careless clients").

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use videocount_e2e::{TestEnv, metric, post_events, sleep_ms};

/// How long a connection lasts (until the service closes it) when a client sends one byte of
/// a request line every 500 ms and never finishes it; `None` if it was still open at `limit`.
fn slowloris(address: &str, limit: Duration) -> Option<Duration> {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let started = Instant::now();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
    let mut sent = 0;
    while started.elapsed() < limit {
        if stream.write_all(&request[sent % request.len()..sent % request.len() + 1]).is_err() {
            return Some(started.elapsed());
        }
        sent += 1;
        let mut buffer = [0u8; 256];
        match stream.read(&mut buffer) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {} // an error answer (408): the close follows
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// How long a kept-alive connection stays open after one complete request while the client
/// says nothing more; `None` if still open at `limit`.
fn idle_after_request(address: &str, limit: Duration) -> Option<Duration> {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buffer = [0u8; 4096];
    let read = stream.read(&mut buffer).unwrap();
    assert!(buffer[..read].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buffer[..read]));
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    match stream.read(&mut buffer) {
        Ok(0) | Err(_) if started.elapsed() < limit => Some(started.elapsed()),
        _ => None,
    }
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn slow_and_idle_clients_are_disconnected_after_the_header_timeout() {
    let env = TestEnv::new("slowloris", 1);
    let flags = ["--header-timeout-ms", "2000"];
    let ingest = env.ingest(&flags);
    let query = env.query_service(&flags);
    for (name, url) in [("ingest", &ingest.url), ("query", &query.url)] {
        let address = url.trim_start_matches("http://");
        let slow = slowloris(address, Duration::from_secs(15));
        assert!(
            slow.is_some_and(|d| d < Duration::from_secs(6)),
            "{name}: a client sending a byte every 500 ms kept its connection for {slow:?} (header timeout 2 s)"
        );
        let idle = idle_after_request(address, Duration::from_secs(15));
        assert!(
            idle.is_some_and(|d| d < Duration::from_secs(6)),
            "{name}: an idle kept-alive connection stayed open {idle:?} (header timeout 2 s)"
        );
    }
    // Still serving after it.
    sleep_ms(100);
    assert!(ingest.ready() && videocount_e2e::answers_ok(&format!("{}/healthz", query.url)));
    env.drop();
}

/// `(status, content type, body)` of `method url`.
fn answer(method: &str, url: &str) -> (u16, String, String) {
    let http = reqwest::blocking::Client::new();
    let response = http.request(method.parse().unwrap(), url).send().unwrap();
    let status = response.status().as_u16();
    let kind = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, kind, response.text().unwrap())
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn every_error_answer_is_json_unknown_paths_are_404_and_repeated_parameters_400() {
    let env = TestEnv::new("errorsjson", 1);
    let ingest = env.ingest(&[]);
    let query = env.query_service(&[]);
    let long = "a".repeat(300);
    let cases = [
        ("GET", format!("{}/v2/videos/x/views", query.url), 404),
        ("GET", format!("{}/{long}", query.url), 404),
        ("GET", format!("{}/v1/videos/{long}/views", query.url), 404),
        ("DELETE", format!("{}/v1/top", query.url), 405),
        ("POST", format!("{}/healthz", query.url), 405),
        ("GET", format!("{}/v1/events", ingest.url), 405),
        ("GET", format!("{}/nothing", ingest.url), 404),
        // A write takes no query parameters: refused, not ignored.
        ("POST", format!("{}/v1/videos/v1/views?ts=5", ingest.url), 400),
        // A path that is not UTF-8, and one longer than any route (a file service's 500 before).
        ("GET", format!("{}/v1/videos/%FF/views", query.url), 400),
        ("GET", format!("{}/{}", query.url, "a/".repeat(600)), 404),
        // A repeated parameter is refused, not silently the last one.
        ("GET", format!("{}/v1/videos/v1/views?from=0&from=60000", query.url), 400),
    ];
    for (method, url, status) in cases {
        let (got, kind, body) = answer(method, &url);
        assert_eq!(got, status, "{method} {url}: {body}");
        assert!(kind.starts_with("application/json"), "{method} {url}: content type {kind:?}, body {body:?}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(body["error"].is_string() && body["message"].is_string(), "{method} {url}: {body}");
    }
    // A range the UI's file does not have.
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/", query.url))
        .header("range", "bytes=99999999-")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 416);
    assert_eq!(response.headers()["content-type"], "application/json");
    // Every canary failure kind is exported from the start (0 until it happens).
    let (_, _, metrics) = answer("GET", &format!("{}/metrics", query.url));
    for kind in ["write", "read", "timeout", "overcount"] {
        let series = format!("videocount_query_canary_failures_total{{kind=\"{kind}\"}} 0");
        assert!(metrics.contains(&series), "{series} in /metrics");
    }
    // The UI's own files are still served.
    let (status, kind, _) = answer("GET", &format!("{}/", query.url));
    assert_eq!((status, kind.starts_with("text/html")), (200, true));
    env.drop();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn an_ndjson_rejection_names_its_line_number_blank_lines_counted() {
    let env = TestEnv::new("ndjsonindex", 1);
    let ingest = env.ingest(&[]);
    let body = "{\"video_id\":\"v1\"}\n\n\n{\"video_id\":\"not valid!\"}\n";
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/v1/events", ingest.url))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let answer: serde_json::Value = response.json().unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 3, "the bad event is on line 3 (0-based): {answer}");
    env.drop();
}

/// Sends `head` (a request line and headers) and `body_part`, then waits for the answer:
/// `(status, seconds it took)`.
fn raw_request(address: &str, head: &str, body_part: &[u8]) -> (u16, f64) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body_part).unwrap();
    let mut buffer = [0u8; 1024];
    let read = stream.read(&mut buffer).unwrap();
    let text = String::from_utf8_lossy(&buffer[..read]);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, started.elapsed().as_secs_f64())
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn an_oversized_or_incomplete_body_is_refused_saying_nothing_was_written() {
    let env = TestEnv::new("bodylimits", 1);
    let ingest = env.ingest(&["--body-timeout-ms", "1000"]);
    let address = ingest.url.trim_start_matches("http://");
    // A declared length over 4 MiB: 413 before any of the body is sent.
    let head =
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n";
    let (status, _) = raw_request(address, head, b"");
    assert_eq!(status, 413, "a declared length over the limit");
    // 10 of 100 bytes, then nothing: 408 after the body timeout, not 503 "may or may not".
    let head = "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let (status, seconds) = raw_request(address, head, b"[{\"video_");
    assert_eq!(status, 408, "an incomplete body (answered after {seconds:.1} s)");
    assert!(seconds < 10.0, "answered after the 1 s body timeout, not the request deadline: {seconds:.1} s");
    env.drop();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn request_bytes_in_flight_are_bounded() {
    let env = TestEnv::new("inflight", 1);
    let ingest = env.ingest(&["--max-inflight-mb", "4", "--body-timeout-ms", "3000"]);
    let address = ingest.url.trim_start_matches("http://");
    // A client declares 3 MB and sends it slowly: those bytes are held while it does.
    let mut slow = TcpStream::connect(address).unwrap();
    slow.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n\r\n[",
    )
    .unwrap();
    sleep_ms(300);
    // Another 2 MB would pass 4 MiB: refused at once, with Retry-After, nothing buffered.
    let head =
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n";
    let (status, seconds) = raw_request(address, head, b"");
    assert_eq!(status, 503, "over the in-flight bound");
    assert!(seconds < 2.0, "refused at once, not after the body: {seconds:.1} s");
    // Once the slow client is gone (its connection closed: a 400), the bytes are free again.
    drop(slow);
    sleep_ms(3_500);
    assert_eq!(post_events(&ingest.url, r#"[{"video_id":"v1"}]"#).0, 202);
    let (_, _, metrics) = answer("GET", &format!("{}/metrics", ingest.url));
    assert!(metrics.contains("videocount_ingest_requests_overloaded_total 1"), "the refusal is counted");
    env.drop();
}

/// Sends `count` pipelined `GET path` requests and reads nothing for `pause`, then reads all
/// that comes until the connection closes or goes quiet: the bytes read.
fn unread_answers(address: &str, path: &str, count: usize, pause: Duration) -> usize {
    let mut stream = TcpStream::connect(address).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let requests = request.repeat(count);
    // The requests are small: they fit the socket buffers, the answers do not.
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(requests.as_bytes());
    });
    std::thread::sleep(pause);
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buffer = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => total += read,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    sender.join().unwrap();
    total
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_client_that_reads_no_answer_is_disconnected_after_the_write_timeout() {
    let env = TestEnv::new("writetimeout", 1);
    let flags = ["--write-timeout-ms", "1000"];
    let ingest = env.ingest(&flags);
    let query = env.query_service(&flags);
    for (name, url, path) in [("ingest", &ingest.url, "/metrics"), ("query", &query.url, "/openapi.json")] {
        let (_, _, one) = answer("GET", &format!("{url}{path}"));
        // 40 MB of answers, far more than the socket buffers hold (several MB on loopback): the
        // service's writes wait for the client, which reads nothing for 4 s.
        let count = (40 << 20) / one.len();
        let all = one.len() * count;
        let read = unread_answers(url.trim_start_matches("http://"), path, count, Duration::from_secs(4));
        assert!(
            read < all / 2,
            "{name}: a client that read nothing for 4 s (write timeout 1 s) still got {read} of {all} bytes"
        );
    }
    assert!(ingest.ready() && videocount_e2e::answers_ok(&format!("{}/healthz", query.url)));
    env.drop();
}

/// The status of a raw request (`head` ends with the blank line).
fn raw_status(address: &str, head: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = stream.write_all(head);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    (text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn requests_without_host_or_with_huge_headers_are_refused() {
    let env = TestEnv::new("framing", 1);
    let ingest = env.ingest(&[]);
    let query = env.query_service(&[]);
    for (name, url) in [("ingest", &ingest.url), ("query", &query.url)] {
        let address = url.trim_start_matches("http://");
        let (status, text) = raw_status(address, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(status, 400, "{name}: HTTP/1.1 without Host: {text}");
        assert!(text.contains("\"missing host\"") && text.contains("application/json"), "{name}: {text}");
        let (status, text) = raw_status(address, b"GET /healthz HTTP/1.0\r\n\r\n");
        assert_eq!(status, 200, "{name}: HTTP/1.0 needs no Host: {text}");
        let (status, text) = raw_status(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n");
        assert_eq!(status, 400, "{name}: two Host headers: {text}");
        // Malformed framing: conflicting lengths, a length that is no number, not HTTP at all.
        for head in [
            &b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n[{}]]]"[..],
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"\x00\x01\x02 hello\r\n\r\n",
            b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(raw_status(address, head).0, 400, "{name}: {}", String::from_utf8_lossy(head));
        }
        // A 100 KiB header: over the 64 KiB a request's head may take.
        let head = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100 << 10));
        let (status, _) = raw_status(address, head.as_bytes());
        assert_eq!(status, 431, "{name}: a 100 KiB header");
        // Kept-alive answers say when the idle connection closes (header timeout 10 s).
        let (_, text) = raw_status(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(text.to_ascii_lowercase().contains("keep-alive: timeout=9"), "{name}: {text}");
    }
    env.drop();
}

/// The ingest service's peak resident memory (`VmHWM`), bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_body_of_one_byte_chunks_takes_the_memory_of_its_bytes() {
    let env = TestEnv::new("chunks", 1);
    let ingest = env.ingest(&[]);
    let address = ingest.url.trim_start_matches("http://").to_owned();
    let before = peak_memory(ingest.process.0.id());
    // 8 clients at once, each 1 MiB of JSON in one-byte chunks (6 MiB on the wire).
    // Long ids: fewer events than the 10,000 a request may carry.
    let event = format!(r#"{{"video_id":"{}","event_type":"view","viewer_id":"{}"}},"#, "c".repeat(64), "u".repeat(64));
    let event = event.as_bytes();
    let mut payload = b"[".to_vec();
    while payload.len() < (1 << 20) - 64 {
        payload.extend_from_slice(event);
    }
    payload.extend_from_slice(br#"{"video_id":"chunky"}]"#);
    let mut wire =
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for byte in &payload {
        wire.extend_from_slice(b"1\r\n");
        wire.push(*byte);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let wire = std::sync::Arc::new(wire);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (address, wire) = (address.clone(), std::sync::Arc::clone(&wire));
            std::thread::spawn(move || raw_status(&address, &wire).0)
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), 202);
    }
    let grew = peak_memory(ingest.process.0.id()).saturating_sub(before);
    // 8 MiB of events (and the messages made of them): not 8 x 6 MiB of wire and a buffer
    // entry per byte.
    assert!(grew < 160 << 20, "peak memory grew by {} MiB", grew >> 20);
    env.drop();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_refusal_before_the_body_is_read_reaches_a_client_still_sending_it() {
    let env = TestEnv::new("earlyanswer", 1);
    let ingest = env.ingest(&["--auth-token", "secret"]);
    let http = reqwest::blocking::Client::new();
    let event = format!(r#"{{"video_id":"{}","viewer_id":"{}"}}"#, "v".repeat(64), "u".repeat(64));
    let body = format!("[{}]", vec![event; 9_000].join(","));
    assert!(body.len() > 1 << 20 && body.len() < 4 << 20);
    for (path, token, status) in
        [("/v1/events", "wrong", 401), ("/v1/events?ts=5", "secret", 400), ("/v1/events", "secret", 202)]
    {
        for _ in 0..5 {
            let response = http
                .post(format!("{}{path}", ingest.url))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body.clone())
                .send();
            let got = response.map(|r| r.status().as_u16()).map_err(|e| format!("{e:?}"));
            assert_eq!(got, Ok(status), "{path} with token {token}");
        }
    }
    env.drop();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_stats_function_the_type_does_not_keep_is_an_error_naming_those_it_keeps() {
    let env = TestEnv::new("notkept", 1);
    let ts = now_ms() - 3_600_000;
    let mut messages: Vec<(String, String)> =
        (0..5).map(|i| ("k1".to_owned(), format!(r#"{{"video_id":"k1","viewer_id":"u{i}","ts":{ts}}}"#))).collect();
    // An event may name a function its type does not keep: then that function has data.
    messages.push(("k2".into(), format!(r#"{{"video_id":"k2","function":"p50","value":3,"ts":{ts}}}"#)));
    videocount_e2e::produce_keyed(&env.topic, &messages);
    TestEnv::run_command_until_caught_up(env.stats_job(&[]));
    let query = env.query_service(&[]);
    let range = format!("from={}&to={}", ts - 60_000, ts + 60_000);
    let stat = |video: &str, event_type: &str, function: &str| {
        let (status, _, body) =
            answer("GET", &format!("{}/v1/videos/{video}/events/{event_type}/stats/{function}?{range}", query.url));
        (status, serde_json::from_str::<serde_json::Value>(&body).unwrap())
    };
    let (status, body) = stat("k1", "view", "p50");
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "function not kept");
    assert!(body["message"].as_str().unwrap().contains("applies count, uniq"), "{body}");
    assert_eq!(stat("k1", "watch_time", "uniq").0, 404);
    // Views keep count, which feeds the same aggregate as max: its states hold no kept values.
    assert_eq!(stat("k1", "view", "max").0, 404, "max of views");
    assert_eq!(stat("k1", "view", "uniq").1["value"], 5.0, "a kept function");
    assert_eq!(stat("k1", "watch_time", "avg").1["value"], serde_json::Value::Null, "kept, and no data");
    let named = stat("k2", "view", "p50").1["value"].as_f64();
    assert!(named.is_some_and(|p50| (p50 - 3.0).abs() < 0.1), "named by an event: {named:?}");
    let (from, to) = ((ts - 60_000).to_string(), (ts + 60_000).to_string());
    let (code, _, err) = env.videocount(&["stats", "k1", "view", "p50", "--from", &from, "--to", &to]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.matches("is not kept").count(), 1, "said once: {err}");
    env.drop();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn cli_errors_say_their_cause_once() {
    let env = TestEnv::new("clierrors", 1);
    let output = std::process::Command::new(videocount_e2e::tool("videocount"))
        .args(["--database", "videocount_no_such_database", "views", "v1", "--from", "2026-11-01T00:00:00Z"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("videocount_no_such_database").count(), 1, "{err}");
    let output = std::process::Command::new(videocount_e2e::tool("videocount"))
        .args(["--clickhouse-url", "http://127.0.0.1:9", "views", "v1", "--from", "2026-11-01T00:00:00Z"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("unavailable").count(), 1, "{err}");
    env.drop();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn the_freshness_canary_is_not_fooled_by_views_written_to_its_video() {
    let env = TestEnv::new("canaryspoof", 1);
    let _job = env.spawn(&["--epoch-ms", "100"]);
    let ingest = env.ingest(&[]);
    let canary = ["--ingest-url", &ingest.url, "--canary-interval-ms", "200"];
    // The default canary video is not published.
    let hidden = env.query_service(&canary);
    videocount_e2e::wait_until("a canary sample", Duration::from_secs(60), || {
        metric(&hidden.url, "videocount_query_canary_freshness_seconds_count").is_some_and(|n| n >= 1.0)
    });
    let (_, _, live) = answer("GET", &format!("{}/v1/live", hidden.url));
    assert!(!live.contains("videocount-canary-"), "the live panel names the canary's video: {live}");
    drop(hidden);
    // One whose video is known (as the old live panel published it): views written to it are
    // seen as a count above the canary's own, never as fresh samples.
    let query = env.query_service(&[&canary[..], &["--canary-video", "known-canary"]].concat());
    videocount_e2e::wait_until("a canary sample", Duration::from_secs(60), || {
        metric(&query.url, "videocount_query_canary_freshness_seconds_count").is_some_and(|n| n >= 1.0)
    });
    let overcount = "videocount_query_canary_failures_total{kind=\"overcount\"}";
    let started = Instant::now();
    while metric(&query.url, overcount).unwrap_or(0.0) < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(30), "no overcount seen in 30 s");
        let spoof = format!(r#"[{{"video_id":"known-canary","ts":{}}}]"#, now_ms());
        assert_eq!(post_events(&ingest.url, spoof).0, 202);
        sleep_ms(300);
    }
    env.drop();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn connections_beyond_the_limit_wait_and_are_served_when_one_closes() {
    let env = TestEnv::new("maxconns", 1);
    let query = env.query_service(&["--max-connections", "3", "--header-timeout-ms", "3000"]);
    let address = query.url.trim_start_matches("http://");
    // Three silent clients take every connection.
    let silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(address).unwrap()).collect();
    sleep_ms(200);
    // A fourth waits in the backlog: no answer while they hold theirs ...
    let mut waiting = TcpStream::connect(address).unwrap();
    waiting.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    waiting.set_read_timeout(Some(Duration::from_millis(1_000))).unwrap();
    let mut buffer = [0u8; 512];
    assert!(waiting.read(&mut buffer).is_err(), "answered beyond --max-connections");
    // ... and is answered once the header timeout has closed them.
    waiting.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let read = waiting.read(&mut buffer).unwrap();
    assert!(buffer[..read].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buffer[..read]));
    drop(silent);
    env.drop();
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn an_array_of_millions_of_tiny_items_is_refused_without_building_it() {
    let env = TestEnv::new("tinyitems", 1);
    let ingest = env.ingest(&[]);
    let before = peak_memory(ingest.process.0.id());
    // 4 MiB of `0,`: two million items, 200 times the 10,000 a request may carry.
    let body = format!("[{}0]", "0,".repeat((4 << 20) / 2 - 2));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (url, body) = (ingest.url.clone(), body.clone());
            std::thread::spawn(move || post_events(&url, body))
        })
        .collect();
    for client in clients {
        let (status, text) = client.join().unwrap();
        assert_eq!(status, 413, "{text}");
        assert!(text.contains("too many events"), "{text}");
    }
    let grew = peak_memory(ingest.process.0.id()).saturating_sub(before);
    // The bodies (24 MiB) and 10,000 items each: not 16 bytes per item and a copy.
    assert!(grew < 80 << 20, "peak memory grew by {} MiB", grew >> 20);
    env.drop();
}
