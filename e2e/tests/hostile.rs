//! Clients that are slow, silent or careless, against both HTTP services: what they cannot do
//! to a service (issue "The HTTP services and the CLI under hostile and careless clients").

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use videocount_e2e::{TestEnv, sleep_ms};

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
    // Every canary failure kind is exported from the start (0 until it happens).
    let (_, _, metrics) = answer("GET", &format!("{}/metrics", query.url));
    for kind in ["write", "read", "timeout"] {
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
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/v1/events", ingest.url))
        .header("content-type", "application/json")
        .body(r#"[{"video_id":"v1"}]"#)
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let (_, _, metrics) = answer("GET", &format!("{}/metrics", ingest.url));
    assert!(metrics.contains("videocount_ingest_requests_overloaded_total 1"), "the refusal is counted");
    env.drop();
}
