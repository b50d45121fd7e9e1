//! The gRPC server: `Aggregator`, `grpc.health.v1` and server reflection
//! (v1 and v1alpha) on one listener, with graceful shutdown.
//!
//! Connections are served by hyper directly rather than by tonic's transport
//! server, whose built-in `grpc-timeout` handling answers an expired deadline
//! with CANCELLED; here the deadline is stamped on arrival and enforced by the
//! gateway, which answers DEADLINE_EXCEEDED.

use std::{
    convert::Infallible,
    future::Future,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::{GracefulConnection, GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, service::Routes};

use crate::{
    api::AggregatorApi,
    config::Config,
    deadline::{Deadline, parse_grpc_timeout},
    gateway::Gateway,
    health::Health,
    pb::{AGGREGATOR_DESCRIPTOR, aggregator::v1::aggregator_server::AggregatorServer},
};

pub use crate::health::SERVICE_NAME;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
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
    let gateway = Arc::new(Gateway::new(&config));
    let stop_metrics = CancellationToken::new();
    if let Some(metrics) = metrics {
        tokio::spawn(crate::metrics::serve(
            metrics,
            gateway.clone(),
            stop_metrics.clone().cancelled_owned(),
        ));
    }
    let _stop_metrics = stop_metrics.drop_guard();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::start(reporter, &gateway).await;
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
    let service = tower::ServiceBuilder::new()
        .map_request(stamp_deadline)
        .service(Services {
            aggregator: AggregatorServer::new(AggregatorApi::new(gateway)),
            others,
        });

    let announce_stop = async {
        shutdown.await;
        health.shut_down().await;
        tracing::info!("shutting down: health is NOT_SERVING, draining in-flight calls");
    };
    serve_h2(
        listener,
        service,
        H2Limits::default(),
        announce_stop,
        config.server.drain_timeout,
    )
    .await;
    Ok(())
}

/// Sends the hot service's calls straight to it and the rest (health,
/// reflection) through tonic's router, which boxes each call's future once
/// more and matches the path against a route table.
#[derive(Clone)]
struct Services {
    aggregator: AggregatorServer<AggregatorApi>,
    others: Routes,
}

const AGGREGATOR_PREFIX: &str = "/aggregator.v1.Aggregator/";

impl tower::Service<Request<Incoming>> for Services {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<
        <AggregatorServer<AggregatorApi> as tower::Service<Request<Incoming>>>::Future,
        <Routes as tower::Service<Request<Incoming>>>::Future,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready: tonic services hold no capacity.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        if request.uri().path().starts_with(AGGREGATOR_PREFIX) {
            Either::Left(self.aggregator.call(request))
        } else {
            Either::Right(self.others.call(request))
        }
    }
}

/// The edge of every call: the caller's `grpc-timeout` becomes a deadline
/// measured from arrival. A malformed value is ignored, as gRPC servers do.
fn stamp_deadline<B>(mut request: Request<B>) -> Request<B> {
    if let Some(timeout) = request
        .headers()
        .get("grpc-timeout")
        .and_then(|v| parse_grpc_timeout(v.as_bytes()))
    {
        request.extensions_mut().insert(Deadline::after(timeout));
    }
    request
}

/// HTTP/2 server settings that differ between the gateway and a server that
/// takes one connection carrying thousands of calls (the demo upstreams).
/// `None` keeps hyper's default (200 streams per connection, 1 MiB window).
#[derive(Clone, Copy, Debug, Default)]
pub struct H2Limits {
    pub max_concurrent_streams: Option<u32>,
    /// Also sizes h2's budget of small DATA frames not yet read (half the
    /// window): a burst of more unread small frames than that is answered
    /// with GOAWAY(ENHANCE_YOUR_CALM).
    pub connection_window: Option<u32>,
}

/// Serves a tower service over HTTP/2 (gRPC) on every accepted connection.
pub async fn serve_h2<S>(
    listener: TcpListener,
    service: S,
    limits: H2Limits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new());
    if let Some(max) = limits.max_concurrent_streams {
        h2.max_concurrent_streams(max);
    }
    if let Some(window) = limits.connection_window {
        h2.initial_connection_window_size(window);
    }
    accept_loop(
        listener,
        move |stream| {
            h2.serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
        },
        shutdown,
        drain,
    )
    .await;
}

/// Accepts connections until `shutdown`, then closes the listener and waits
/// up to `drain` for open connections to finish before aborting them.
pub async fn accept_loop<C>(
    listener: TcpListener,
    mut serve: impl FnMut(TcpStream) -> C,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) where
    C: GracefulConnection + Send + 'static,
    C::Output: Send,
    C::Error: std::fmt::Debug,
{
    let graceful = GracefulShutdown::new();
    let abort = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = graceful.watch(serve(stream));
                    let abort = abort.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            result = conn => {
                                if let Err(error) = result {
                                    tracing::debug!(?error, "connection closed with an error");
                                }
                            }
                            () = abort.cancelled() => {}
                        }
                    });
                }
                Err(error) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("all connections drained"),
        () = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "drain timeout elapsed; closing remaining connections");
            abort.cancel();
        }
    }
}
