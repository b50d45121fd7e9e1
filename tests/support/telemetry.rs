//! The gateway's telemetry as its consumers see it: a Prometheus scrape and
//! an OTLP trace receiver.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use aggregator::server::ConnPolicy;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use super::{listen, spawn_h2};

/// `GET /metrics` at `addr`, with `Accept: accept` when given: the content
/// type and the body.
pub async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    use http_body_util::BodyExt;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::get(format!("http://{addr}/metrics"));
    if let Some(accept) = accept {
        request = request.header(http::header::ACCEPT, accept);
    }
    let response = client
        .request(request.body(Full::default()).unwrap())
        .await
        .unwrap();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (content_type, String::from_utf8(body.to_vec()).unwrap())
}

/// The value of the sample `name{labels}` (labels exactly as written), if any.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// An OTLP/gRPC trace receiver (the collector's own service, from the
/// `opentelemetry-proto` types) that keeps every span it is sent.
pub struct Collector {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
    stop: CancellationToken,
}

impl Collector {
    pub async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let (listener, addr) = listen().await;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let service = Routes::new(TraceServiceServer::new(Receiver(spans.clone()))).prepare();
        let stop = spawn_h2(listener, service, ConnPolicy::default());
        Self { addr, spans, stop }
    }

    pub fn spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.spans.lock().unwrap().clone()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Receiver(Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Receiver
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}
