//! One request to an upstream, seen from outside: counted in the source's
//! metrics however it ends, and (with tracing on) a client span whose
//! context travels to the upstream; without tracing, the caller's trace
//! context travels verbatim.

use http::StatusCode;
use opentelemetry::KeyValue;
use tokio::time::Instant;

use super::{Answer, Client, Prepared, Source, prepared::Request};
use crate::{
    config::SourceKind, deadline::Deadline, error::SourceError, telemetry::metrics::SourceMetrics,
};

impl Source {
    /// Request number `attempt` of a call.
    pub(super) async fn send(
        &self,
        prepared: Prepared,
        deadline: Deadline,
        attempt: u32,
    ) -> Result<Answer, SourceError> {
        let mut sending = Sending {
            metrics: &self.metrics,
            started: Instant::now(),
            deadline,
            done: false,
        };
        let result = self.send_once(prepared, deadline, attempt).await;
        sending.done = true;
        let code = result
            .as_ref()
            .err()
            .map_or(tonic::Code::Ok, SourceError::code);
        self.metrics
            .request(code, sending.started.elapsed().as_secs_f64());
        result
    }

    async fn send_once(
        &self,
        prepared: Prepared,
        deadline: Deadline,
        attempt: u32,
    ) -> Result<Answer, SourceError> {
        let Prepared { request, trace } = prepared;
        match (&self.client, request) {
            (Client::Grpc(g), Request::Grpc(mut request)) => {
                let span = trace.begin(&mut request.metadata, || self.describe("grpc", attempt));
                let result = g.call(request, deadline).await.map(Answer::from);
                if let Some(span) = span {
                    let code = result
                        .as_ref()
                        .err()
                        .map_or(tonic::Code::Ok, SourceError::code);
                    span.end(
                        vec![KeyValue::new("rpc.grpc.status_code", code as i64)],
                        result.is_err(),
                    );
                }
                result
            }
            (Client::Http(c), Request::Http(mut request)) => {
                let span = trace.begin(request.headers_mut(), || self.describe("http", attempt));
                let result = c
                    .call(*request, deadline, self.spec.max_response_bytes)
                    .await;
                if let Some(span) = span {
                    let status: Option<StatusCode> = match &result {
                        Ok((_, status)) => Some(*status),
                        Err(SourceError::Http { status, .. }) => Some(*status),
                        Err(_) => None,
                    };
                    let attributes = status
                        .map(|s| KeyValue::new("http.response.status_code", i64::from(s.as_u16())))
                        .into_iter()
                        .collect();
                    span.end(attributes, result.is_err());
                }
                result.map(|(answer, _)| answer)
            }
            // A source prepares its own requests: a mismatch is a bug, told
            // as one rather than a panic.
            _ => Err(SourceError::Schema(
                "a request prepared for another kind of source".into(),
            )),
        }
    }

    /// A client span's name and attributes; made only for a traced request.
    fn describe(&self, system: &'static str, attempt: u32) -> (String, Vec<KeyValue>) {
        let method = match &self.spec.kind {
            SourceKind::Grpc(g) => format!("{}/{}", g.service, g.method),
            SourceKind::Http(h) => h.method.to_string(),
        };
        let method_key = match system {
            "grpc" => "rpc.method",
            _ => "http.request.method",
        };
        let attributes = vec![
            KeyValue::new("aggregator.source", self.spec.name.to_string()),
            KeyValue::new("rpc.system", system),
            KeyValue::new(method_key, method.clone()),
            KeyValue::new("aggregator.attempt", i64::from(attempt)),
        ];
        (method, attributes)
    }
}

/// A request on its way; one dropped unanswered (a hedge that lost, a
/// caller that left, the deadline) is counted as such.
struct Sending<'a> {
    metrics: &'a SourceMetrics,
    started: Instant,
    deadline: Deadline,
    done: bool,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        if !self.done {
            let code = match self.deadline.is_expired() {
                true => tonic::Code::DeadlineExceeded,
                false => tonic::Code::Cancelled,
            };
            self.metrics
                .request(code, self.started.elapsed().as_secs_f64());
        }
    }
}
