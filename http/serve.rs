//! Serving a router with the limits a service facing the Internet needs, which `axum::serve`
//! does not set:
//! - a client must send a request's headers within `header_timeout` (also between requests on
//!   a kept-alive connection, so an idle connection is closed after it, and each answer says so
//!   in `Keep-Alive: timeout=`), so slow or silent clients (slowloris) hold a connection for
//!   `header_timeout` at most, token or not;
//! - a client that stops reading an answer holds its connection for `write_timeout` at most;
//! - a request's head (request line and headers) is at most [`MAX_HEAD_BYTES`];
//! - an HTTP/1.1 request without exactly one `Host` is refused (RFC 9112 section 3.2);
//! - at most `max_connections` are open at once (further clients wait in the listen backlog).
//!
//! HTTP/1.1 only (hyper), shut down gracefully: on the signal, no new connections, requests in
//! flight answered, for up to 30 s.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tracing::{debug, info, warn};

/// The connection limits of [`serve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Time a client has to send a request's headers, and to start the next one on a kept-alive
    /// connection.
    pub header_timeout: Duration,
    /// Connections open at once at most.
    pub max_connections: usize,
    /// Time an answer's bytes may wait for a client that does not read them.
    pub write_timeout: Duration,
}

/// The flags of [`ServeLimits`], flattened into each service's own.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// A client has this long to send a request's headers, and to start its next request on a
    /// kept-alive connection; then the connection is closed.
    #[arg(long, env = "VIDEOCOUNT_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Connections open at once at most; further clients wait in the listen backlog.
    #[arg(long, env = "VIDEOCOUNT_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// A client that reads none of an answer for this long (its connection's send buffer full)
    /// is disconnected.
    #[arg(long, env = "VIDEOCOUNT_WRITE_TIMEOUT_MS", default_value_t = 30_000)]
    pub write_timeout_ms: u64,
}

impl ServeArgs {
    pub fn limits(&self) -> anyhow::Result<ServeLimits> {
        anyhow::ensure!(
            self.header_timeout_ms > 0 && self.max_connections > 0 && self.write_timeout_ms > 0,
            "--header-timeout-ms, --max-connections and --write-timeout-ms must be above 0"
        );
        Ok(ServeLimits {
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            max_connections: self.max_connections,
            write_timeout: Duration::from_millis(self.write_timeout_ms),
        })
    }
}

/// How long a graceful shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(30);

/// A request's line and headers together are at most this long; longer ones get hyper's 431
/// (or 414 for a long request line) and the connection closes. hyper's own minimum is 8 KiB.
pub const MAX_HEAD_BYTES: usize = 64 << 10;

/// File descriptors kept for what is not a client connection: ClickHouse and Kafka sockets,
/// files, the listener.
const RESERVED_FDS: u64 = 512;

/// `max_connections`, within the process's file-descriptor limit: the soft limit is raised to
/// the hard one, and the connections lowered (with a warning) when even that leaves too few for
/// the service's own sockets. Past the limit, `accept` and the service's own connections to
/// ClickHouse and Kafka would fail instead.
fn connection_limit(max_connections: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            warn!(%error, "cannot read or raise the file-descriptor limit");
            return max_connections.max(1);
        }
    };
    let fits = limit.saturating_sub(RESERVED_FDS).max(1);
    if max_connections as u64 > fits {
        warn!(
            max_connections,
            file_descriptor_limit = limit,
            lowered_to = fits,
            "--max-connections does not fit the file-descriptor limit (ulimit -n) with {RESERVED_FDS} kept for the \
             service's own sockets; raise the limit or lower --max-connections"
        );
        return fits as usize;
    }
    max_connections.max(1)
}

/// Middleware of every connection: refuses an HTTP/1.1 request without exactly one `Host`, and tells
/// kept-alive clients when an idle connection will be closed.
async fn connection_rules(
    keep_alive: Option<HeaderValue>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if request.version() == Version::HTTP_11 && hosts != 1 {
        return crate::ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing host",
            "host",
            format!("an HTTP/1.1 request carries exactly one Host header (RFC 9112, section 3.2), not {hosts}"),
        )
        .into_response();
    }
    let mut response = next.run(request).await;
    if let Some(keep_alive) = keep_alive {
        response.headers_mut().insert(header::HeaderName::from_static("keep-alive"), keep_alive);
    }
    response
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // One second under the real timeout, so that a client does not reuse a connection the
    // service is closing at that moment (none under 2 s: the header counts whole seconds).
    let idle = limits.header_timeout.as_secs().saturating_sub(1);
    let keep_alive = (idle >= 1).then(|| HeaderValue::from_str(&format!("timeout={idle}")).expect("an ASCII value"));
    let app =
        app.layer(axum::middleware::from_fn(move |request, next| connection_rules(keep_alive.clone(), request, next)));
    let permits = Arc::new(Semaphore::new(connection_limit(limits.max_connections)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.write_timeout));
        let service = app.clone().map_request(|request: hyper::Request<Incoming>| request.map(Body::new));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(Box::pin(stream)), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%peer, %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    info!("no new connections; answering the requests in flight");
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        warn!(seconds = DRAIN.as_secs(), "requests still in flight after the drain; closing");
    }
    Ok(())
}
