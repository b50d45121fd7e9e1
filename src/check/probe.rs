//! `--probe`: each source asked, with its own client, whether it answers.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    config::{Config, SourceKind},
    store::Store,
    telemetry::metrics::Metrics,
    upstream::Source,
};

/// One source's probe.
#[derive(Debug)]
pub struct ProbeRow {
    pub source: Arc<str>,
    pub kind: &'static str,
    /// A connection was made (and TLS negotiated).
    pub reachable: Result<(), String>,
    /// Where its schema comes from, and whether the templates fit it.
    pub schema: Result<String, String>,
    /// Its health check's verdict, when it has one.
    pub health: Option<Result<(), String>>,
    pub latency: Duration,
}

/// Connects to every upstream, learns each gRPC schema (by reflection where
/// no descriptors are given) and checks the request template against it,
/// and runs each health check. Every probe is bounded by `timeout`.
pub async fn probe(config: &Config, timeout: Duration) -> Vec<ProbeRow> {
    let metrics = Metrics::default();
    let probes = config.sources.iter().map(|spec| {
        let metrics = metrics.clone();
        async move {
            let started = Instant::now();
            let kind = match spec.kind {
                SourceKind::Grpc(_) => "grpc",
                SourceKind::Http(_) => "http",
            };
            // Probes call upstreams directly: no cache answers for them.
            let store = Store::memory(metrics.store());
            let source = match Source::new(spec.clone(), metrics.source(&spec.name), &store) {
                Ok(source) => source,
                Err(error) => {
                    return ProbeRow {
                        source: spec.name.clone(),
                        kind,
                        reachable: Err(error.to_string()),
                        schema: Err("not checked".into()),
                        health: None,
                        latency: started.elapsed(),
                    };
                }
            };
            let reachable = within(timeout, "connect", source.probe_connect()).await;
            let schema = within(timeout, "schema", source.probe_schema()).await;
            let health = match spec.health_check {
                None => None,
                Some(_) => Some(within(timeout, "health check", source.probe_health()).await),
            };
            ProbeRow {
                source: spec.name.clone(),
                kind,
                reachable,
                schema,
                health,
                latency: started.elapsed(),
            }
        }
    });
    futures_util::future::join_all(probes).await
}

async fn within<T>(
    timeout: Duration,
    what: &str,
    probe: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, probe)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{what}: no answer within {}",
                humantime::format_duration(timeout)
            ))
        })
}
