//! An OTLP/gRPC trace receiver for the benchmark: takes every export, keeps
//! only the count of spans, and prints it when stopped (SIGTERM), so a run
//! with tracing on measures the gateway's real export path, not a refused one.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::TcpListenerStream;

struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .map(|scope| scope.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    // The same shape as the gateway's JSON ready line, for bench.py.
    eprintln!(
        r#"{{"message":"otlp sink ready","addr":"{}"}}"#,
        listener.local_addr()?
    );
    let spans = Arc::new(AtomicU64::new(0));
    let mut terminate = signal(SignalKind::terminate())?;
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink(spans.clone())))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            terminate.recv().await;
        })
        .await?;
    eprintln!(
        r#"{{"message":"otlp sink stopped","spans":{}}}"#,
        spans.load(Ordering::Relaxed)
    );
    Ok(())
}
