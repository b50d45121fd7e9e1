//! `[server]`: the gateway's own listeners, caps and timeouts.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::{ConfigError, Validator, defaults::Limit};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerModel {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default = "default_drain", with = "humantime_serde")]
    drain_timeout: Duration,
    max_concurrent_calls: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    queue_timeout: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
}

impl Default for ServerModel {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            drain_timeout: default_drain(),
            max_concurrent_calls: None,
            queue_timeout: None,
            metrics_listen: None,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// Address the gateway serves gRPC on.
    pub listen: SocketAddr,
    /// How long in-flight calls may run after a shutdown signal.
    pub drain_timeout: Duration,
    /// Gateway-wide cap on concurrent `Aggregate`/`FetchAll` calls.
    pub max_concurrent_calls: Option<Limit>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

impl Validator<'_> {
    pub(super) fn server(&self, model: &ServerModel) -> Result<ServerSpec, ConfigError> {
        let max_concurrent_calls =
            self.limit("server", model.max_concurrent_calls, model.queue_timeout)?;
        Ok(ServerSpec {
            listen: model.listen,
            drain_timeout: model.drain_timeout,
            max_concurrent_calls,
            metrics_listen: model.metrics_listen,
        })
    }
}
