//! `GET /metrics` on the `[server] metrics_listen` address, in OpenMetrics
//! text when the scraper's `Accept` asks for it, else in the classic text
//! format.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::{Metrics, format, process::Process, state::Sources};
use crate::{
    gateway::Gateway,
    server::{ConnPolicy, accept_loop, stream::StreamExecutor, track::Track},
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` until `shutdown`, over HTTP/1 or HTTP/2, with the
/// connection limits of `policy` and `header_read_timeout` for HTTP/1.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    gateway: Arc<ArcSwap<Gateway>>,
    policy: ConnPolicy,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(Sources(gateway)));
    registry.register_collector(Box::new(Process));
    let registry = Arc::new(registry);
    let service = tower::service_fn(move |req: Request<Incoming>| {
        let registry = registry.clone();
        async move { Ok::<_, Infallible>(respond(&req, &registry)) }
    });
    // Pings find dead scrapers; the idle timeout closes live ones that left.
    let keepalive = policy
        .idle_timeout
        .map(|idle| idle.min(Duration::from_secs(60)));
    let mut server = auto::Builder::new(StreamExecutor);
    server
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    server
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(keepalive);
    accept_loop(
        listener,
        policy,
        move |io, state| {
            server
                .serve_connection(
                    TokioIo::new(io),
                    TowerToHyperService::new(Track::new(service.clone(), state)),
                )
                .into_owned()
        },
        shutdown,
        Duration::ZERO,
    )
    .await;
}

fn respond(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "metrics are at /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => {
            let (body, content_type) = match openmetrics {
                true => (body, OPENMETRICS),
                false => (format::classic(&body), CLASSIC),
            };
            let mut response = reply(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type),
            );
            response
        }
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding failed\n".into(),
        ),
    }
}
