//! Prometheus metrics (OpenMetrics text) at `GET /metrics` on the
//! `[server] metrics_listen` address: per source, what request coalescing
//! did, whether its circuit is open and how many requests its bulkhead
//! holds. Read from the live gateway at each scrape; nothing is kept twice.

use std::{convert::Infallible, fmt, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    gateway::Gateway,
    server::{ConnPolicy, accept_loop, stream::StreamExecutor, track::Track},
    upstream::Source,
};

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` until `shutdown`, over HTTP/1 or HTTP/2, with the
/// connection limits of `policy` and `header_read_timeout` for HTTP/1.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    policy: ConnPolicy,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Sources(gateway)));
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
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => {
            let mut response = reply(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            response
        }
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding failed\n".into(),
        ),
    }
}

/// Reads every source's state at scrape time.
struct Sources(Arc<Gateway>);

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sources")
    }
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let sources = self.0.sources();
        type Read = fn(&Source) -> Option<u64>;
        let counters: [(&str, &str, Read); 2] = [
            (
                "aggregator_coalesce_upstream_calls",
                "Shared upstream requests started by request coalescing.",
                |s| s.coalescing().map(|c| c.calls),
            ),
            (
                "aggregator_coalesce_joined_calls",
                "Calls that joined an identical request already in flight.",
                |s| s.coalescing().map(|c| c.coalesced),
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for source in sources {
                if let Some(value) = read(source) {
                    let labels = [("source", &*source.spec.name)];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let gauges: [(&str, &str, Read); 4] = [
            (
                "aggregator_coalesce_keys_in_flight",
                "Distinct coalesced requests in flight now.",
                |s| s.coalescing().map(|c| c.in_flight as u64),
            ),
            (
                "aggregator_coalesce_peak_waiters",
                "The most callers that ever waited on one coalesced request.",
                |s| s.coalescing().map(|c| c.peak_waiters as u64),
            ),
            (
                "aggregator_circuit_open",
                "1 while the source's circuit breaker is open.",
                |s| s.breaker().map(|b| u64::from(b.is_open())),
            ),
            (
                "aggregator_source_requests_in_flight",
                "Requests holding a slot of the source's max_concurrent cap.",
                |s| s.in_flight().map(|n| n as u64),
            ),
        ];
        for (name, help, read) in gauges {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for source in sources {
                if let Some(value) = read(source) {
                    let labels = [("source", &*source.spec.name)];
                    ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
