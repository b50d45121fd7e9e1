//! What `aggregator check --probe` asks of each source: can it be reached,
//! does its schema fit the config, does its health check pass. Each probe
//! uses the source's own client, so TLS and server names are as in serving.

use super::{Client, Source};
use crate::config::{HealthTarget, SourceKind};

impl Source {
    /// Dials a connection of its own (TCP, TLS, and HTTP/2 for gRPC).
    pub async fn probe_connect(&self) -> Result<(), String> {
        let dialed = match (&self.client, &self.spec.kind) {
            (Client::Grpc(g), _) => g.connect().await,
            (Client::Http(c), SourceKind::Http(h)) => c.connect(h.url.origin()).await,
            // The client is built from the source's kind.
            (Client::Http(_), SourceKind::Grpc(_)) => Ok(()),
        };
        dialed.map_err(|e| e.to_string())
    }

    /// Where the method's schema comes from, once it is learned (by
    /// reflection unless the source gives descriptors) and the request
    /// template is checked against it.
    pub async fn probe_schema(&self) -> Result<String, String> {
        match (&self.client, &self.spec.kind) {
            (Client::Grpc(g), SourceKind::Grpc(spec)) => {
                let from = if spec.schema.is_some() {
                    "descriptors"
                } else {
                    "reflection"
                };
                let schema = g.schema().await.map_err(|e| e.to_string())?;
                Ok(format!("{from}: {}", schema.input.full_name()))
            }
            _ => Ok("JSON (no schema)".into()),
        }
    }

    /// The verdict of the source's health check; `Ok` when it has none.
    pub async fn probe_health(&self) -> Result<(), String> {
        let Some(check) = &self.spec.health_check else {
            return Ok(());
        };
        match (&self.client, &check.target) {
            (Client::Grpc(g), HealthTarget::Grpc { service }) => g.check_health(service).await,
            (Client::Http(c), HealthTarget::Http(uri)) => c.check_health(uri).await,
            // Validated with the source's kind.
            _ => Ok(()),
        }
    }
}
