//! The client against a scripted fake service, on a paused tokio clock: batching, retries with
//! backoff and full jitter, final answers, the circuit breaker and load balancing. Times are the
//! paused clock's, so the assertions on them are exact, not timing-dependent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::time::Instant;
use url::Url;
use videocount_client::{
    BoxFuture, BreakerConfig, BreakerState, Client, ClientConfig, ClientError, Event, Reply, RetryPolicy, Transport,
    TransportError,
};

/// One request the fake service received.
#[derive(Clone, Debug)]
struct Call {
    at: Instant,
    endpoint: String,
    videos: Vec<String>,
}

type Answer = (Duration, Result<Reply, TransportError>);
type Script = Box<dyn FnMut(&Call, &[Call]) -> Answer + Send>;

/// A service whose answers a closure decides, given the call and all calls before it.
struct Fake {
    script: Mutex<Script>,
    calls: Mutex<Vec<Call>>,
    not_ready: Mutex<Vec<String>>,
}

impl Fake {
    fn new(script: impl FnMut(&Call, &[Call]) -> Answer + Send + 'static) -> Arc<Fake> {
        Arc::new(Fake { script: Mutex::new(Box::new(script)), calls: Mutex::default(), not_ready: Mutex::default() })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Call times per video (each test sends each video once).
    fn times_by_video(&self) -> BTreeMap<String, Vec<Instant>> {
        let mut times: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
        for call in self.calls() {
            for video in call.videos {
                times.entry(video).or_default().push(call.at);
            }
        }
        times
    }
}

impl Transport for Fake {
    fn post_events(&self, endpoint: &Url, body: Bytes) -> BoxFuture<Result<Reply, TransportError>> {
        let events: Vec<Value> = serde_json::from_slice(&body).expect("the client sends a JSON array");
        let call = Call {
            at: Instant::now(),
            endpoint: endpoint.to_string(),
            videos: events.iter().map(|e| e["video_id"].as_str().unwrap().to_owned()).collect(),
        };
        let mut calls = self.calls.lock().unwrap();
        let (delay, answer) = (self.script.lock().unwrap())(&call, &calls);
        calls.push(call);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            answer
        })
    }

    fn ready(&self, endpoint: &Url) -> BoxFuture<bool> {
        let ready = !self.not_ready.lock().unwrap().contains(&endpoint.to_string());
        Box::pin(async move { ready })
    }
}

fn reply(status: u16, body: Value) -> Answer {
    (Duration::ZERO, Ok(Reply { status, retry_after: None, body: Bytes::from(body.to_string()) }))
}

fn accepted() -> Answer {
    reply(202, json!({"accepted": 1, "rejected": []}))
}

fn unavailable() -> Answer {
    reply(503, json!({"error": "kafka unavailable"}))
}

fn settings(endpoints: &[&str]) -> ClientConfig {
    let mut config = ClientConfig::new(endpoints.iter().copied());
    config.batch_size = 1;
    config.linger = Duration::ZERO;
    config.max_in_flight = 1000;
    config.health_interval = None;
    config.retry = RetryPolicy {
        base: Duration::from_millis(100),
        max_delay: Duration::from_millis(1600),
        max_elapsed: Some(Duration::from_secs(600)),
    };
    config.breaker = BreakerConfig { failures_to_open: 1_000_000, open_for: Duration::from_secs(10) };
    config
}

async fn send_all(client: &Client, videos: impl IntoIterator<Item = String>) -> Vec<Result<(), ClientError>> {
    let acks: Vec<_> = videos.into_iter().map(|v| client.count_view(&v).unwrap()).collect();
    let mut results = Vec::new();
    for ack in acks {
        results.push(ack.await);
    }
    results
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_with_full_jitter() {
    // Every batch fails 6 times (503), then is accepted.
    let fake = Fake::new(|call, before| {
        let tries = before.iter().filter(|c| c.videos == call.videos).count();
        if tries < 6 { unavailable() } else { accepted() }
    });
    let client = Client::with_transport(settings(&["http://a"]), fake.clone()).unwrap();
    let results = send_all(&client, (0..400).map(|i| format!("v{i}"))).await;
    assert!(results.iter().all(Result::is_ok), "every event acknowledged in the end");

    let times = fake.times_by_video();
    assert_eq!(times.len(), 400);
    let mut gaps_by_retry: Vec<Vec<f64>> = vec![Vec::new(); 6];
    for calls in times.values() {
        assert_eq!(calls.len(), 7, "six failures and one success, no more");
        for (k, pair) in calls.windows(2).enumerate() {
            let gap = (pair[1] - pair[0]).as_secs_f64();
            let ceiling = (0.1 * f64::from(1u32 << k)).min(1.6);
            assert!(gap <= ceiling + 1e-9, "retry {} waited {gap} s, over its ceiling {ceiling} s", k + 1);
            gaps_by_retry[k].push(gap / ceiling);
        }
    }
    for (k, gaps) in gaps_by_retry.iter().enumerate() {
        // Full jitter: uniform over [0, ceiling], so the mean is near half and some waits are
        // near zero and some near the ceiling (400 samples).
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let (low, high) = gaps.iter().fold((1.0f64, 0.0f64), |(lo, hi), g| (lo.min(*g), hi.max(*g)));
        assert!((0.4..0.6).contains(&mean), "retry {}: mean wait {mean} of the ceiling, not uniform", k + 1);
        assert!(low < 0.05 && high > 0.95, "retry {}: waits span {low}..{high} of the ceiling", k + 1);
    }
    client.close().await;
}

#[tokio::test(start_paused = true)]
async fn final_answers_are_not_retried() {
    let fake = Fake::new(|call, _| match call.videos[0].as_str() {
        "bad" => reply(
            400,
            json!({"error": "every event was rejected", "rejected": [
                {"index": 0, "reason": "invalid value", "field": "value", "message": "expected a finite number"}
            ]}),
        ),
        "big" => reply(413, json!({"error": "body too large", "message": "a request body is at most 4194304 bytes"})),
        "auth" => reply(401, json!({"error": "unauthorized", "message": "a valid bearer token is required"})),
        _ => accepted(),
    });
    let client = Client::with_transport(settings(&["http://a"]), fake.clone()).unwrap();
    let results = send_all(&client, ["bad", "big", "auth", "fine"].map(String::from)).await;
    assert_eq!(
        results[0],
        Err(ClientError::Rejected {
            reason: "invalid value".into(),
            field: Some("value".into()),
            message: "expected a finite number".into()
        })
    );
    assert!(matches!(&results[1], Err(ClientError::Status { status: 413, message }) if message.contains("4194304")));
    assert!(matches!(&results[2], Err(ClientError::Status { status: 401, .. })));
    assert_eq!(results[3], Ok(()));
    assert_eq!(fake.calls().len(), 4, "one call each: 400, 413 and 401 are final");
}

#[tokio::test(start_paused = true)]
async fn a_503_naming_failed_items_retries_only_those() {
    let fake = Fake::new(|_, before| {
        if before.is_empty() {
            reply(
                503,
                json!({"error": "kafka unavailable", "accepted": 2, "failed": [1, 3], "rejected": [
                    {"index": 2, "reason": "invalid video_id", "field": "video_id", "message": "too long"}
                ]}),
            )
        } else {
            accepted()
        }
    });
    let mut config = settings(&["http://a"]);
    config.batch_size = 5;
    config.linger = Duration::from_secs(1);
    let client = Client::with_transport(config, fake.clone()).unwrap();
    let results = send_all(&client, (0..5).map(|i| format!("v{i}"))).await;
    assert_eq!(results[0], Ok(()));
    assert_eq!(results[1], Ok(()));
    assert!(matches!(&results[2], Err(ClientError::Rejected { reason, .. }) if reason == "invalid video_id"));
    assert_eq!(results[3], Ok(()));
    assert_eq!(results[4], Ok(()));
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].videos, ["v0", "v1", "v2", "v3", "v4"]);
    assert_eq!(calls[1].videos, ["v1", "v3"], "only the items Kafka did not take are sent again");
}

#[tokio::test(start_paused = true)]
async fn the_breaker_stops_calls_then_lets_one_probe_through() {
    let start = Instant::now();
    // Failing for the first 25 s, then healthy.
    let fake =
        Fake::new(move |call, _| if call.at - start < Duration::from_secs(25) { unavailable() } else { accepted() });
    let mut config = settings(&["http://a"]);
    config.breaker = BreakerConfig { failures_to_open: 3, open_for: Duration::from_secs(10) };
    let client = Client::with_transport(config, fake.clone()).unwrap();
    let results = send_all(&client, ["v".to_owned()]).await;
    assert_eq!(results, [Ok(())]);

    let at: Vec<Instant> = fake.calls().iter().map(|c| c.at).collect();
    let times: Vec<f64> = at.iter().map(|t| (*t - start).as_secs_f64()).collect();
    assert!(times[2] < 1.0, "three quick tries open the breaker: {times:?}");
    for pair in at[2..].windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_secs(10), "no call while the breaker is open: {times:?}");
    }
    assert!(times.len() <= 6, "one probe per open period: {times:?}");
    assert!(*times.last().unwrap() >= 25.0);
    assert_eq!(client.breaker_states(), [BreakerState::Closed], "the successful probe closed it");
}

/// A service that answers `status` with `Retry-After: retry_after` once, then accepts.
fn once_then_accepted(status: u16, retry_after: Duration) -> Arc<Fake> {
    Fake::new(move |_, before| {
        if before.is_empty() {
            (Duration::ZERO, Ok(Reply { status, retry_after: Some(retry_after), body: Bytes::from_static(b"{}") }))
        } else {
            accepted()
        }
    })
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_waited_for() {
    let fake = once_then_accepted(503, Duration::from_secs(3));
    let client = Client::with_transport(settings(&["http://a"]), fake.clone()).unwrap();
    assert_eq!(send_all(&client, ["v".to_owned()]).await, [Ok(())]);
    let calls = fake.calls();
    assert!(calls[1].at - calls[0].at >= Duration::from_secs(1), "Retry-After beyond max_delay is capped at it");

    let fake = once_then_accepted(429, Duration::from_secs(1));
    let mut config = settings(&["http://a"]);
    config.retry.max_delay = Duration::from_secs(30);
    let client = Client::with_transport(config, fake.clone()).unwrap();
    assert_eq!(send_all(&client, ["v".to_owned()]).await, [Ok(())]);
    let calls = fake.calls();
    assert!(calls[1].at - calls[0].at >= Duration::from_secs(1), "429 waits its Retry-After");
}

#[tokio::test(start_paused = true)]
async fn connection_errors_and_timeouts_are_retried_until_max_elapsed() {
    let fake = Fake::new(|call, _| match call.videos[0].as_str() {
        "slow" => (Duration::from_secs(3600), Ok(Reply { status: 202, retry_after: None, body: Bytes::new() })),
        _ => (Duration::ZERO, Err(TransportError("connection refused".into()))),
    });
    let mut config = settings(&["http://a"]);
    config.request_timeout = Duration::from_secs(2);
    config.retry.max_elapsed = Some(Duration::from_secs(20));
    let client = Client::with_transport(config, fake.clone()).unwrap();
    let started = Instant::now();
    let results = send_all(&client, ["refused".to_owned(), "slow".to_owned()]).await;
    assert!(started.elapsed() >= Duration::from_secs(20));
    for (result, what) in results.iter().zip(["connection refused", "no answer from http://a/ within 2s"]) {
        match result {
            Err(ClientError::GaveUp { attempts, last, .. }) => {
                assert!(*attempts > 3, "retried: {attempts}");
                assert!(last.contains(what), "{last}");
            }
            other => panic!("expected GaveUp, got {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn batches_fill_by_size_linger_and_flush() {
    let fake = Fake::new(|_, _| accepted());
    let mut config = settings(&["http://a"]);
    config.batch_size = 10;
    config.linger = Duration::from_secs(1);
    let client = Client::with_transport(config, fake.clone()).unwrap();
    let started = Instant::now();
    let results = send_all(&client, (0..25).map(|i| format!("v{i}"))).await;
    assert!(results.iter().all(Result::is_ok));
    let calls = fake.calls();
    let sizes: Vec<usize> = calls.iter().map(|c| c.videos.len()).collect();
    assert_eq!(sizes, [10, 10, 5]);
    assert!(calls[1].at - started < Duration::from_millis(1), "full batches leave at once");
    assert_eq!(calls[2].at - started, Duration::from_secs(1), "the rest leaves after the linger");
    client.close().await;

    let fake = Fake::new(|_, _| accepted());
    let mut config = settings(&["http://a"]);
    config.batch_size = 10;
    config.linger = Duration::from_secs(3600);
    let client = Client::with_transport(config, fake.clone()).unwrap();
    let acks: Vec<_> = (0..3).map(|i| client.count_view(&format!("f{i}")).unwrap()).collect();
    let started = Instant::now();
    client.flush().await;
    assert_eq!(started.elapsed(), Duration::ZERO, "flush sends at once");
    assert_eq!(fake.calls().len(), 1);
    for ack in acks {
        assert_eq!(ack.await, Ok(()));
    }
    let last = client.count_event("g", "like").unwrap();
    client.close().await;
    assert_eq!(last.await, Ok(()), "close sends what is buffered");
    assert_eq!(fake.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_full_buffer_is_an_error_not_a_drop() {
    let fake =
        Fake::new(|_, _| (Duration::from_secs(60), Ok(Reply { status: 202, retry_after: None, body: Bytes::new() })));
    let mut config = settings(&["http://a"]);
    config.max_buffered = 5;
    config.request_timeout = Duration::from_secs(120);
    let client = Client::with_transport(config, fake.clone()).unwrap();
    let acks: Vec<_> = (0..5).map(|i| client.count_view(&format!("v{i}")).unwrap()).collect();
    assert_eq!(client.count_view("v5").unwrap_err(), ClientError::BufferFull { limit: 5 });
    for ack in acks {
        assert_eq!(ack.await, Ok(()));
    }
    assert!(client.count_view("v6").is_ok(), "room again once the others are acknowledged");
}

#[tokio::test(start_paused = true)]
async fn load_spreads_over_the_healthy_addresses() {
    let fake = Fake::new(|call, _| {
        if call.endpoint.starts_with("http://c") {
            (Duration::ZERO, Err(TransportError("connection refused".into())))
        } else {
            accepted()
        }
    });
    let mut two = settings(&["http://a", "http://b"]);
    two.health_interval = Some(Duration::from_secs(5));
    let client = Client::with_transport(two, fake.clone()).unwrap();
    send_all(&client, (0..100).map(|i| format!("x{i}"))).await;
    let per_endpoint = |calls: &[Call]| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        calls.iter().for_each(|c| *counts.entry(c.endpoint.clone()).or_default() += 1);
        counts
    };
    let counts = per_endpoint(&fake.calls());
    assert_eq!(counts["http://a/"], 50, "round-robin: {counts:?}");
    assert_eq!(counts["http://b/"], 50, "round-robin: {counts:?}");

    fake.not_ready.lock().unwrap().push("http://b/".into());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = fake.calls().len();
    send_all(&client, (0..100).map(|i| format!("y{i}"))).await;
    let counts = per_endpoint(&fake.calls()[before..]);
    assert_eq!(counts.get("http://b/"), None, "no calls to an address that is not ready: {counts:?}");

    // An address that refuses connections: its breaker opens and the other one takes over.
    let mut config = settings(&["http://a", "http://c"]);
    config.breaker = BreakerConfig { failures_to_open: 3, open_for: Duration::from_secs(30) };
    let fake_c = fake.clone();
    let before = fake_c.calls().len();
    let client = Client::with_transport(config, fake_c.clone()).unwrap();
    let results = send_all(&client, (0..100).map(|i| format!("z{i}"))).await;
    assert!(results.iter().all(Result::is_ok), "everything delivered through a");
    let counts = per_endpoint(&fake_c.calls()[before..]);
    assert_eq!(counts["http://a/"], 100);
    assert_eq!(counts["http://c/"], 3, "three failures open c's breaker: {counts:?}");
    assert_eq!(client.breaker_states(), [BreakerState::Closed, BreakerState::Open]);
}

#[tokio::test(start_paused = true)]
async fn process_events_answers_per_event_in_order() {
    let fake = Fake::new(|call, _| {
        let rejected: Vec<Value> = call
            .videos
            .iter()
            .enumerate()
            .filter(|(_, v)| v.starts_with("bad"))
            .map(|(i, _)| json!({"index": i, "reason": "invalid video_id", "field": "video_id", "message": "no"}))
            .collect();
        reply(202, json!({"accepted": call.videos.len() - rejected.len(), "rejected": rejected}))
    });
    let mut config = settings(&["http://a"]);
    config.batch_size = 3;
    config.linger = Duration::from_secs(3600);
    let client = Client::with_transport(config, fake.clone()).unwrap();
    let events = ["a", "bad1", "b", "c", "bad2", "d", "e"].map(|v| Event::view(v).value(1.0)).to_vec();
    let results = client.process_events(events).await;
    let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(ok, [true, false, true, true, false, true, true]);
    assert_eq!(fake.calls().iter().map(|c| c.videos.len()).collect::<Vec<_>>(), [3, 3, 1]);
}
