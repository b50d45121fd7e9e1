//! `[server]`: the gateway's own listeners, caps and timeouts. The defaults
//! follow grpc-go's and Envoy's where they have one, tightened where theirs
//! is "never" (an idle connection, a handshake that does not come).

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::{
    ConfigError, Validator,
    defaults::Limit,
    tls::{ListenerTls, ListenerTlsModel},
};

/// The rapid-reset budget's defaults: ordinary cancellation (10,000 calls
/// cancelled over 10 s, in bursts) passes; a flood (20,000 HEADERS and
/// RST_STREAM pairs in 2 s) is cut off within its first second.
pub const DEFAULT_MAX_RESETS_PER_SECOND: u32 = 2_000;
pub const DEFAULT_MAX_RESET_BURST: u32 = 5_000;

/// A store operation's budget: a down or paused Redis costs a call no more.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(20);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ServerModel {
    listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    drain_timeout: Duration,
    #[serde(with = "humantime_serde")]
    shutdown_delay: Duration,
    max_concurrent_calls: Option<usize>,
    #[serde(with = "humantime_serde")]
    queue_timeout: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
    max_connections: usize,
    #[serde(with = "humantime_serde")]
    handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    keepalive_timeout: Duration,
    max_concurrent_streams: u32,
    max_request_bytes: usize,
    max_buffered_request_bytes: usize,
    max_answer_bytes: usize,
    max_payload_bytes: usize,
    #[serde(with = "humantime_serde")]
    request_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    send_timeout: Duration,
    max_resets_per_second: u32,
    max_reset_burst: u32,
    tls: Option<ListenerTlsModel>,
    store: Option<String>,
    #[serde(with = "humantime_serde")]
    store_timeout: Duration,
}

impl Default for ServerModel {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            drain_timeout: Duration::from_secs(10),
            shutdown_delay: Duration::ZERO,
            max_concurrent_calls: None,
            queue_timeout: None,
            metrics_listen: None,
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 200,
            max_request_bytes: 4 * 1024 * 1024,
            max_buffered_request_bytes: 256 * 1024 * 1024,
            max_answer_bytes: 4 * 1024 * 1024,
            max_payload_bytes: 1024 * 1024,
            request_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(5),
            max_resets_per_second: DEFAULT_MAX_RESETS_PER_SECOND,
            max_reset_burst: DEFAULT_MAX_RESET_BURST,
            tls: None,
            store: None,
            store_timeout: DEFAULT_STORE_TIMEOUT,
        }
    }
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// Address the gateway serves gRPC on.
    pub listen: SocketAddr,
    /// How long in-flight calls may run after a shutdown signal.
    pub drain_timeout: Duration,
    /// After a shutdown signal, how long to keep accepting and serving with
    /// health NOT_SERVING, so that load balancers stop sending first.
    pub shutdown_delay: Duration,
    /// Gateway-wide cap on concurrent `Aggregate`/`FetchAll` calls.
    pub max_concurrent_calls: Option<Limit>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Client connections open at once, per listener.
    pub max_connections: usize,
    /// How long a new connection has to send its HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// How long an HTTP/1 request head may take (metrics listener).
    pub header_read_timeout: Duration,
    /// A connection with no call in flight this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 pings to each client this often...
    pub keepalive_interval: Duration,
    /// ...and the connection closed when one is not answered in this time.
    pub keepalive_timeout: Duration,
    /// Calls in flight on one client connection.
    pub max_concurrent_streams: u32,
    /// The largest request message accepted.
    pub max_request_bytes: usize,
    /// Bytes of requests being received, all connections together.
    pub max_buffered_request_bytes: usize,
    /// The largest answer sent (what a default gRPC client reads).
    pub max_answer_bytes: usize,
    /// The largest `payload` a call may bring, encoded.
    pub max_payload_bytes: usize,
    /// How long a request may take to arrive when the caller set no deadline.
    pub request_read_timeout: Duration,
    /// How long an answer may take to reach the client once it is ready.
    pub send_timeout: Duration,
    /// Calls a client may cancel per second on one connection...
    pub max_resets_per_second: u32,
    /// ...and at once, before the connection is cut off.
    pub max_reset_burst: u32,
    /// TLS on the gRPC listener (mTLS with a client CA); plaintext without.
    pub tls: Option<ListenerTls>,
    /// The Redis URL that caches and rate limits share; in this process
    /// without it. It may hold a password: never logged.
    pub store: Option<String>,
    /// The budget of one store operation.
    pub store_timeout: Duration,
}

impl Validator<'_> {
    pub(super) fn server(&self, model: &ServerModel) -> Result<ServerSpec, ConfigError> {
        let max_concurrent_calls =
            self.limit("server", model.max_concurrent_calls, model.queue_timeout)?;
        let zero_durations = [
            ("handshake_timeout", model.handshake_timeout),
            ("header_read_timeout", model.header_read_timeout),
            ("idle_timeout", model.idle_timeout),
            ("keepalive_interval", model.keepalive_interval),
            ("keepalive_timeout", model.keepalive_timeout),
            ("request_read_timeout", model.request_read_timeout),
            ("send_timeout", model.send_timeout),
            ("store_timeout", model.store_timeout),
        ];
        let zero_counts = [
            ("max_connections", model.max_connections as u64),
            (
                "max_concurrent_streams",
                u64::from(model.max_concurrent_streams),
            ),
            ("max_request_bytes", model.max_request_bytes as u64),
            (
                "max_buffered_request_bytes",
                model.max_buffered_request_bytes as u64,
            ),
            ("max_answer_bytes", model.max_answer_bytes as u64),
            ("max_payload_bytes", model.max_payload_bytes as u64),
            (
                "max_resets_per_second",
                u64::from(model.max_resets_per_second),
            ),
            ("max_reset_burst", u64::from(model.max_reset_burst)),
        ];
        let zero = zero_durations
            .iter()
            .find(|(_, d)| d.is_zero())
            .map(|(k, _)| *k)
            .or_else(|| zero_counts.iter().find(|(_, n)| *n == 0).map(|(k, _)| *k));
        if let Some(key) = zero {
            return Err(self.err(format!("server.{key}"), "must be greater than zero"));
        }
        self.count("server.max_connections", model.max_connections)?;
        if let Some(url) = &model.store {
            // Checked here so that a typo is a startup error; connecting
            // waits for the first call.
            redis::Client::open(url.as_str())
                .map_err(|e| self.err("server.store", format!("cannot be used: {e}")))?;
        }
        Ok(ServerSpec {
            listen: model.listen,
            drain_timeout: model.drain_timeout,
            shutdown_delay: model.shutdown_delay,
            max_concurrent_calls,
            metrics_listen: model.metrics_listen,
            max_connections: model.max_connections,
            handshake_timeout: model.handshake_timeout,
            header_read_timeout: model.header_read_timeout,
            idle_timeout: model.idle_timeout,
            keepalive_interval: model.keepalive_interval,
            keepalive_timeout: model.keepalive_timeout,
            max_concurrent_streams: model.max_concurrent_streams,
            max_request_bytes: model.max_request_bytes,
            max_buffered_request_bytes: model
                .max_buffered_request_bytes
                .min(tokio::sync::Semaphore::MAX_PERMITS),
            max_answer_bytes: model.max_answer_bytes,
            max_payload_bytes: model.max_payload_bytes,
            request_read_timeout: model.request_read_timeout,
            send_timeout: model.send_timeout,
            max_resets_per_second: model.max_resets_per_second,
            max_reset_burst: model.max_reset_burst,
            tls: self.listener_tls(model.tls.as_ref())?,
            store: model.store.clone(),
            store_timeout: model.store_timeout,
        })
    }
}
