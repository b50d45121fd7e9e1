//! Upstream sources: how one source's request is rendered and sent.
//!
//! Rendering ([`Source::prepare`]) is separate from sending ([`Source::call`])
//! so that every parameter is checked before any upstream is contacted.

pub mod codec;
pub mod grpc;
pub mod http;
pub mod schema;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;

use crate::{
    bulkhead::Bulkhead,
    config::{SourceKind, SourceSpec},
    deadline::Deadline,
    error::SourceError,
    template::{Params, RenderError},
};

/// A configured source with its live client.
pub struct Source {
    pub spec: Arc<SourceSpec>,
    /// Placeholders its requests need.
    pub params: Vec<Arc<str>>,
    client: Client,
    /// The cap on this source's requests in flight, if configured.
    bulkhead: Option<Bulkhead>,
}

enum Client {
    Grpc(grpc::GrpcUpstream),
    Http(http::HttpClient),
}

/// A rendered request, ready to send.
pub enum Prepared {
    Grpc(serde_json::Value),
    Http(Box<::http::Request<Full<Bytes>>>),
}

impl Source {
    /// Builds the client; gRPC channels connect lazily, so a down upstream
    /// does not stop the gateway from starting.
    pub fn new(spec: Arc<SourceSpec>, http: &http::HttpClient) -> Self {
        let client = match &spec.kind {
            SourceKind::Grpc(g) => Client::Grpc(grpc::GrpcUpstream::new(spec.clone(), g)),
            SourceKind::Http(_) => Client::Http(http.clone()),
        };
        Self {
            params: spec.params(),
            bulkhead: spec.max_concurrent.map(Bulkhead::new),
            spec,
            client,
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.spec.name
    }

    pub fn prepare(&self, params: &Params) -> Result<Prepared, RenderError> {
        Ok(match &self.spec.kind {
            SourceKind::Grpc(g) => Prepared::Grpc(g.request.render(params)?),
            SourceKind::Http(h) => Prepared::Http(Box::new(http::prepare(h, params)?)),
        })
    }

    /// Sends the request; the source's own timeout, if shorter, bounds it
    /// (dropping the future aborts the request on the wire).
    pub async fn call(
        &self,
        prepared: Prepared,
        deadline: Deadline,
    ) -> Result<serde_json::Value, SourceError> {
        let own = self.spec.timeout.filter(|t| *t < deadline.remaining());
        let deadline = own.map_or(deadline, |t| deadline.cap(t));
        let send = async {
            // Waiting for a slot counts against the source's time; the slot
            // is held until the response is read or the call is dropped.
            let _slot = match &self.bulkhead {
                Some(b) => Some(b.enter(deadline).await.map_err(SourceError::Overloaded)?),
                None => None,
            };
            match (&self.client, prepared) {
                (Client::Grpc(g), Prepared::Grpc(json)) => g.call(json, deadline).await,
                (Client::Http(c), Prepared::Http(req)) => {
                    http::call(c, *req, self.spec.max_response_bytes).await
                }
                _ => unreachable!("prepared by the same source"),
            }
        };
        let result = match own {
            None => send.await,
            Some(t) => tokio::time::timeout_at(deadline.instant(), send)
                .await
                .unwrap_or(Err(SourceError::Timeout(t))),
        };
        match (own, result) {
            // A gRPC channel enforces the budget it forwards, so its failure
            // may win the race against our timer: it is still this timeout.
            (Some(t), Err(_)) if deadline.is_expired() => Err(SourceError::Timeout(t)),
            (_, result) => result,
        }
    }
}
