//! A source's request rendered for one call: from the caller's params and
//! metadata, with the metadata the source forwards, before anything is sent,
//! so that every input is checked before any upstream is contacted.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Client, Source, grpc, http as http_upstream, schema};
use crate::{
    config::SourceKind,
    telemetry::traces::{CallSpan, RequestSpan},
    template::{Inputs, RenderError, render_header},
};

/// W3C trace context: always passed on, never part of a request's identity.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A rendered request, ready to send.
pub struct Prepared {
    pub(super) request: Request,
    /// The caller's trace context, added to each request as it is sent.
    pub(super) trace: TraceContext,
}

pub(super) enum Request {
    Grpc(grpc::GrpcRequest),
    Http(Box<::http::Request<Bytes>>),
}

/// The caller's `traceparent` and `tracestate`, verbatim; with tracing on,
/// the call's span, under which each request gets its own.
#[derive(Debug, Clone, Default)]
pub struct TraceContext {
    traceparent: Option<HeaderValue>,
    tracestate: Option<HeaderValue>,
    span: Option<(CallSpan, Arc<str>)>,
}

impl TraceContext {
    pub fn from_metadata(metadata: &HeaderMap) -> Self {
        Self {
            traceparent: metadata.get(TRACEPARENT).cloned(),
            tracestate: metadata.get(TRACESTATE).cloned(),
            span: None,
        }
    }

    /// Puts the trace context in a request's `headers`: the caller's, or
    /// with tracing on a new client span's (named and described by
    /// `describe`), which is returned to be ended with the request.
    pub(super) fn begin(
        &self,
        headers: &mut HeaderMap,
        describe: impl FnOnce() -> (String, Vec<opentelemetry::KeyValue>),
    ) -> Option<RequestSpan> {
        if let Some((span, aggregation)) = &self.span {
            let (name, mut attributes) = describe();
            attributes.push(opentelemetry::KeyValue::new(
                "aggregator.aggregation",
                aggregation.to_string(),
            ));
            return Some(span.request(name, attributes, headers));
        }
        if let Some(value) = &self.traceparent {
            headers.insert(TRACEPARENT, value.clone());
        }
        if let Some(value) = &self.tracestate {
            headers.insert(TRACESTATE, value.clone());
        }
        None
    }
}

impl Source {
    /// Renders the request for `inputs`; nothing is sent.
    pub fn prepare(&self, inputs: &Inputs) -> Result<Prepared, RenderError> {
        let forward = &self.spec.forward_metadata;
        let request = match &self.spec.kind {
            SourceKind::Grpc(g) => {
                let json = g.request.render_with(inputs)?;
                let mut metadata = HeaderMap::new();
                for (name, template) in &g.metadata {
                    metadata.append(name, render_header(template, inputs)?);
                }
                forwarded(forward, inputs.metadata, &mut metadata);
                let schema = match &self.client {
                    Client::Grpc(c) => c.known_schema(),
                    Client::Http(_) => None,
                };
                // The JSON text is the coalescing key either way, so calls
                // made before and after the schema is learned still share.
                let key = json.to_string();
                let body = match schema {
                    Some(schema) => grpc::GrpcBody::Encoded(schema::encode_request(
                        &schema.input,
                        json,
                        &g.request,
                        inputs,
                    )?),
                    None => grpc::GrpcBody::Json(json),
                };
                Request::Grpc(grpc::GrpcRequest {
                    key,
                    body,
                    metadata,
                })
            }
            SourceKind::Http(h) => {
                let mut request = http_upstream::prepare(h, inputs)?;
                forwarded(forward, inputs.metadata, request.headers_mut());
                Request::Http(Box::new(request))
            }
        };
        Ok(Prepared {
            request,
            trace: TraceContext::from_metadata(inputs.metadata),
        })
    }
}

/// Copies the caller's values of each forwarded name (all of them, in order).
fn forwarded(names: &[HeaderName], metadata: &HeaderMap, into: &mut HeaderMap) {
    for name in names {
        for value in metadata.get_all(name) {
            into.append(name, value.clone());
        }
    }
}

impl Prepared {
    /// Sends its requests under the call's span.
    pub fn traced(mut self, span: Option<&CallSpan>, aggregation: &Arc<str>) -> Self {
        self.trace.span = span.map(|s| (s.clone(), aggregation.clone()));
        self
    }

    /// The request as bytes, whole: calls with equal keys are identical
    /// (method, URL or gRPC message, headers or metadata, body), so callers
    /// with different credentials never share. The trace context is left
    /// out: every call has its own, and sharing is the point.
    pub(super) fn key(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(256);
        let headers = |key: &mut Vec<u8>, map: &HeaderMap| {
            for (name, value) in map {
                key.push(b'\n');
                key.extend_from_slice(name.as_str().as_bytes());
                key.push(b':');
                key.extend_from_slice(value.as_bytes());
            }
        };
        match &self.request {
            Request::Grpc(request) => {
                key.extend_from_slice(request.key.as_bytes());
                headers(&mut key, &request.metadata);
            }
            Request::Http(request) => {
                key.extend_from_slice(request.method().as_str().as_bytes());
                key.push(b' ');
                key.extend_from_slice(request.uri().to_string().as_bytes());
                headers(&mut key, request.headers());
                key.extend_from_slice(b"\n\n");
                key.extend_from_slice(request.body());
            }
        }
        key
    }
}

impl Prepared {
    /// Without the caller's span: for a request no caller waits for.
    pub fn detached(mut self) -> Self {
        self.trace.span = None;
        self
    }
}

impl Clone for Prepared {
    /// For a retry; `http::Request` itself is not `Clone` (extensions).
    fn clone(&self) -> Self {
        let request = match &self.request {
            Request::Grpc(request) => Request::Grpc(request.clone()),
            Request::Http(request) => {
                let mut copy = ::http::Request::new(request.body().clone());
                *copy.method_mut() = request.method().clone();
                *copy.uri_mut() = request.uri().clone();
                *copy.version_mut() = request.version();
                *copy.headers_mut() = request.headers().clone();
                Request::Http(Box::new(copy))
            }
        };
        Self {
            request,
            trace: self.trace.clone(),
        }
    }
}
