//! The gRPC server: `Aggregator`, `grpc.health.v1` and server reflection
//! (v1 and v1alpha) on one listener, with graceful shutdown.
//!
//! Connections are served by hyper directly rather than by tonic's transport
//! server, whose built-in `grpc-timeout` handling answers an expired deadline
//! with CANCELLED; here the deadline is stamped on arrival and enforced by the
//! gateway, which answers DEADLINE_EXCEEDED.
//!
//! From the socket in, each layer is written once, in [`run_with_metrics`]:
//! - [`conn`]: the connection cap, handshake and idle timeouts, the lingering
//!   close; HTTP/2 keepalive pings (hyper);
//! - [`track`]: requests in flight per connection, and the rapid-reset guard
//!   ([`resets`]);
//! - [`stream`]: each HTTP/2 stream's bound on sending its answer;
//! - [`edge`]: gRPC only, the deadline, reading the request within its limits;
//! - then `Aggregator` (`api`), or health and reflection.

pub mod conn;
pub mod edge;
pub mod reload;
pub mod resets;
pub mod stream;
pub mod track;

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use self::conn::{ConnPolicy, Handshake, accept_loop};
pub use self::reload::{Reload, Reloads};
use self::{
    edge::{Edge, EdgeLimits},
    reload::Reloader,
    resets::ResetBudget,
    stream::StreamExecutor,
    track::Track,
};
use crate::{
    api::AggregatorApi,
    config::{Config, ServerSpec},
    gateway::Gateway,
    health::Health,
    pb::AGGREGATOR_DESCRIPTOR,
    telemetry::{metrics::Metrics, traces::Tracing},
};

pub use crate::health::SERVICE_NAME;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error(transparent)]
    Tracing(#[from] crate::telemetry::traces::TracingError),
}

/// Serves the gateway on `listener` until `shutdown` completes, then reports
/// NOT_SERVING, stops accepting and lets in-flight calls finish within the
/// config's drain timeout.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run_with_metrics(listener, None, config, shutdown).await
}

/// [`run`], also serving Prometheus metrics on `metrics` until the gRPC
/// server has stopped.
pub async fn run_with_metrics(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run_with(listener, metrics, config, shutdown, None).await
}

/// [`run_with_metrics`], putting in force each config sent on `reloads`.
pub async fn run_with(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
    reloads: Option<Reloads>,
) -> Result<(), ServeError> {
    let server = &config.server;
    let registry = Metrics::default();
    let tracing = Tracing::start(&config.telemetry, registry.trace_export_failures())?;
    let gateway = Gateway::build(&config, &registry, tracing.clone(), None)?;
    let gateway = Arc::new(ArcSwap::from_pointee(gateway));
    let stop_metrics = CancellationToken::new();
    if let Some(metrics) = metrics {
        tokio::spawn(crate::telemetry::metrics::serve(
            metrics,
            registry.clone(),
            gateway.clone(),
            metrics_policy(server),
            server.header_read_timeout,
            stop_metrics.clone().cancelled_owned(),
        ));
    }
    let _stop_metrics = stop_metrics.drop_guard();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Arc::new(tokio::sync::Mutex::new(
        Health::start(reporter, &gateway.load()).await,
    ));
    let reloading = reloads.map(|reloads| {
        let reloader = Reloader {
            current: gateway.clone(),
            metrics: registry.clone(),
            tracing: tracing.clone(),
            health: health.clone(),
            server: server.clone(),
            telemetry: config.telemetry.clone(),
        };
        tokio::spawn(reloader.run(reloads)).abort_handle()
    });
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(AGGREGATOR_DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // So grpcurl and other reflection clients can decode error details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let others = Routes::new(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .prepare();
    let limits = EdgeLimits {
        max_request_bytes: server.max_request_bytes,
        buffered: Arc::new(tokio::sync::Semaphore::new(
            server.max_buffered_request_bytes,
        )),
        request_read_timeout: server.request_read_timeout,
        send_timeout: server.send_timeout,
    };
    let service = Edge::new(AggregatorApi::new(gateway), others, limits);

    let shutdown_delay = server.shutdown_delay;
    let announce_stop = async {
        shutdown.await;
        // From here on a reload is refused (see `Reloader::apply`).
        health.lock().await.shut_down().await;
        if !shutdown_delay.is_zero() {
            // Still accepting and serving, while load balancers see the
            // NOT_SERVING and stop sending.
            tracing::info!(
                ?shutdown_delay,
                "shutting down: health is NOT_SERVING, still serving"
            );
            tokio::time::sleep(shutdown_delay).await;
        }
        tracing::info!("shutting down: no longer accepting, draining in-flight calls");
    };
    let h2 = H2Limits {
        max_concurrent_streams: Some(server.max_concurrent_streams),
        keepalive: Some((server.keepalive_interval, server.keepalive_timeout)),
        ..H2Limits::default()
    };
    serve_h2(
        listener,
        service,
        h2,
        grpc_policy(server),
        announce_stop,
        server.drain_timeout,
    )
    .await;
    if let Some(reloading) = &reloading {
        reloading.abort();
    }
    if let Some(tracing) = tracing {
        // Sends the spans still queued; blocks, so not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    }
    Ok(())
}

fn grpc_policy(server: &ServerSpec) -> ConnPolicy {
    ConnPolicy {
        max_connections: Some(server.max_connections),
        handshake_timeout: Some(server.handshake_timeout),
        handshake: Handshake::Http2,
        idle_timeout: Some(server.idle_timeout),
        resets: Some(ResetBudget {
            per_second: server.max_resets_per_second,
            burst: server.max_reset_burst,
        }),
        tls: server.tls.as_ref().map(|t| t.config.clone()),
    }
}

/// Metrics are scraped over HTTP/1 or HTTP/2: the client must start within
/// the handshake timeout; `header_read_timeout` bounds the rest of a request
/// head.
fn metrics_policy(server: &ServerSpec) -> ConnPolicy {
    ConnPolicy {
        handshake: Handshake::AnyByte,
        resets: None,
        // Scrapers speak plain HTTP on the metrics listener.
        tls: None,
        ..grpc_policy(server)
    }
}

/// HTTP/2 server settings that differ between the gateway and a server that
/// takes one connection carrying thousands of calls (the demo upstreams).
/// `None` keeps hyper's default (200 streams per connection, 1 MiB window,
/// no keepalive pings).
#[derive(Clone, Copy, Debug, Default)]
pub struct H2Limits {
    pub max_concurrent_streams: Option<u32>,
    /// Also sizes h2's budget of small DATA frames not yet read (half the
    /// window): a burst of more unread small frames than that is answered
    /// with GOAWAY(ENHANCE_YOUR_CALM).
    pub connection_window: Option<u32>,
    /// Ping interval, and how long a ping may go unanswered before the
    /// connection is closed.
    pub keepalive: Option<(Duration, Duration)>,
}

/// Streams a client may reset before the server has even accepted them
/// (h2's own guard, 20 by default, GOAWAYs a connection over that): high
/// enough for a burst of ordinary cancellations arriving in one read; the
/// rate of resets is what [`ResetBudget`] limits.
const MAX_PENDING_ACCEPT_RESETS: usize = 1024;

/// Serves a tower service over HTTP/2 (gRPC) on every accepted connection.
pub async fn serve_h2<S, B>(
    listener: TcpListener,
    service: S,
    limits: H2Limits,
    policy: ConnPolicy,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut h2 = hyper::server::conn::http2::Builder::new(StreamExecutor);
    h2.timer(TokioTimer::new())
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS);
    if let Some(max) = limits.max_concurrent_streams {
        h2.max_concurrent_streams(max);
    }
    if let Some(window) = limits.connection_window {
        h2.initial_connection_window_size(window);
    }
    if let Some((interval, timeout)) = limits.keepalive {
        h2.keep_alive_interval(interval).keep_alive_timeout(timeout);
    }
    accept_loop(
        listener,
        policy,
        move |io, state| {
            h2.serve_connection(
                TokioIo::new(io),
                TowerToHyperService::new(Track::new(service.clone(), state)),
            )
        },
        shutdown,
        drain,
    )
    .await;
}
