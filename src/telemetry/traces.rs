//! Traces, exported over OTLP/gRPC in batches when `[telemetry]
//! otlp_endpoint` is set: each call is a server span (a child of the
//! caller's `traceparent`), each request sent to an upstream (every attempt,
//! retries and hedges included) a client span under it, which the upstream
//! receives as its parent. A collector that is down costs dropped spans, a
//! log line when exports start failing (and one when they work again) and
//! `aggregator_trace_export_failures_total`; never a call.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter},
};
use prometheus_client::metrics::counter::Counter;

use crate::config::TelemetrySpec;

/// The tracer of a gateway with tracing on.
#[derive(Clone)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tracing")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: {0}")]
pub struct TracingError(String);

impl Tracing {
    /// Starts the exporter; `None` when no collector is configured. Must run
    /// inside a tokio runtime (the OTLP channel spawns its worker there).
    pub fn start(spec: &TelemetrySpec, failures: Counter) -> Result<Option<Self>, TracingError> {
        let Some(endpoint) = &spec.otlp_endpoint else {
            return Ok(None);
        };
        let otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| TracingError(e.to_string()))?;
        let exporter = Exporter {
            otlp,
            failures,
            failing: Arc::new(AtomicBool::new(false)),
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                spec.sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(spec.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("aggregator");
        Ok(Some(Self { provider, tracer }))
    }

    /// Sends what is left and stops (blocks: call off the runtime's threads).
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::debug!(%error, "trace exporter shutdown");
        }
    }

    /// A call's server span, a child of the caller's trace context.
    pub fn call_span(
        &self,
        method: &'static str,
        aggregation: &str,
        metadata: &HeaderMap,
    ) -> CallSpan {
        let parent = TraceContextPropagator::new().extract(&Headers(metadata));
        let span = self
            .tracer
            .span_builder(format!("aggregator.v1.Aggregator/{method}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", "aggregator.v1.Aggregator"),
                KeyValue::new("rpc.method", method),
                KeyValue::new("aggregator.aggregation", aggregation.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        CallSpan {
            context: parent.with_span(span),
            tracer: self.tracer.clone(),
        }
    }
}

/// A call's span, shared by the requests it sends.
#[derive(Clone)]
pub struct CallSpan {
    context: Context,
    tracer: SdkTracer,
}

impl fmt::Debug for CallSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallSpan")
            .field("trace_id", &self.trace_id())
            .finish()
    }
}

impl CallSpan {
    pub fn trace_id(&self) -> String {
        self.context.span().span_context().trace_id().to_string()
    }

    /// How one source of the call came out, as an event on the call's span.
    pub fn source(
        &self,
        source: &str,
        code: tonic::Code,
        attempts: u32,
        coalesced: bool,
        skipped: bool,
    ) {
        self.context.span().add_event(
            "source",
            vec![
                KeyValue::new("aggregator.source", source.to_owned()),
                KeyValue::new("rpc.grpc.status_code", code as i64),
                KeyValue::new("aggregator.attempts", i64::from(attempts)),
                KeyValue::new("aggregator.coalesced", coalesced),
                KeyValue::new("aggregator.skipped", skipped),
            ],
        );
    }

    /// The call's end.
    pub fn end(&self, code: tonic::Code, request_id: &str) {
        let span = self.context.span();
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        span.set_attribute(KeyValue::new(
            "aggregator.request_id",
            request_id.to_owned(),
        ));
        if code != tonic::Code::Ok {
            span.set_status(Status::error(crate::error::code_name(code)));
        }
        span.end();
    }

    /// A client span for one request; its context goes to the upstream in
    /// `headers` (as `traceparent` and `tracestate`).
    pub fn request(
        &self,
        name: String,
        attributes: Vec<KeyValue>,
        headers: &mut HeaderMap,
    ) -> RequestSpan {
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.context);
        let child = Context::new().with_remote_span_context(span.span_context().clone());
        TraceContextPropagator::new().inject_context(&child, &mut HeadersMut(headers));
        if !span.is_recording() {
            span.end();
        }
        RequestSpan(span)
    }
}

/// One request's span; ends with the request.
pub struct RequestSpan(opentelemetry_sdk::trace::Span);

impl RequestSpan {
    pub fn end(mut self, attributes: Vec<KeyValue>, failed: bool) {
        for attribute in attributes {
            self.0.set_attribute(attribute);
        }
        if failed {
            self.0.set_status(Status::error("failed"));
        }
        self.0.end();
    }
}

/// The trace id of a W3C `traceparent`, when well-formed.
pub fn trace_id_of(metadata: &HeaderMap) -> Option<String> {
    let parent = TraceContextPropagator::new().extract(&Headers(metadata));
    let span = parent.span();
    let context = span.span_context();
    context.is_valid().then(|| context.trace_id().to_string())
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(key), HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

/// The OTLP exporter, counting and reporting its failures.
struct Exporter {
    otlp: opentelemetry_otlp::SpanExporter,
    failures: Counter,
    failing: Arc<AtomicBool>,
}

impl fmt::Debug for Exporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Exporter")
    }
}

impl SpanExporter for Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.otlp.export(batch).await;
        match &result {
            Err(error) => {
                self.failures.inc();
                if !self.failing.swap(true, Relaxed) {
                    tracing::warn!(%error, "trace export failed; spans are dropped until the collector answers");
                }
            }
            Ok(()) => {
                if self.failing.swap(false, Relaxed) {
                    tracing::info!("trace export works again");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.otlp.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.otlp.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.otlp.set_resource(resource);
    }
}
