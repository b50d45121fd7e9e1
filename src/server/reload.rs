//! Hot reload: a new config is parsed, validated and built into a whole new
//! gateway before anything changes; then it is put in force at once. Calls
//! take the gateway in force when they arrive and keep it to the end, so
//! in-flight calls finish under the config they started with. Sources whose
//! definition did not change are carried over with their connections,
//! breakers, budgets and coalescing state. A config that fails to load or
//! build changes nothing: the old one keeps serving and the error is logged
//! (file and key). What the listeners were made from needs a restart; the
//! reload says which keys it left unchanged.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{
    config::{Config, ConfigError, ServerSpec, TelemetrySpec},
    gateway::Gateway,
    health::Health,
    telemetry::{metrics::Metrics, traces::Tracing},
};

/// A config to put in force (or the error loading it), and where to say how
/// it went.
pub struct Reload {
    pub config: Result<Config, ConfigError>,
    pub done: Option<oneshot::Sender<Result<(), String>>>,
}

/// Sends reloads to a running server.
pub type Reloads = mpsc::Receiver<Reload>;

pub(super) struct Reloader {
    pub current: Arc<ArcSwap<Gateway>>,
    pub metrics: Metrics,
    pub tracing: Option<Tracing>,
    pub health: Arc<Mutex<Health>>,
    /// What the running listeners were made from.
    pub server: ServerSpec,
    pub telemetry: TelemetrySpec,
}

impl Reloader {
    pub async fn run(self, mut reloads: Reloads) {
        while let Some(Reload { config, done }) = reloads.recv().await {
            let outcome = self.apply(config).await;
            self.metrics.reloaded(outcome.is_ok());
            if let Some(done) = done {
                let _ = done.send(outcome);
            }
        }
    }

    async fn apply(&self, config: Result<Config, ConfigError>) -> Result<(), String> {
        let failed = |error: String| {
            tracing::error!(%error, "config reload failed: the config in force is kept");
            error
        };
        let config = config.map_err(|error| failed(error.to_string()))?;
        let old = self.current.load_full();
        // A bug in building must not end reloading (the receiver would go).
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Gateway::build(&config, &self.metrics, self.tracing.clone(), Some(&old))
        }));
        let gateway = match built {
            Ok(Ok(gateway)) => gateway,
            Ok(Err(error)) => return Err(failed(error.to_string())),
            Err(_) => return Err(failed("building the new config panicked".to_owned())),
        };
        let kept = gateway.kept_from(&old);
        // Under the health lock, so that shutdown, which takes it first,
        // either sees this config in force or keeps it from coming.
        let mut health = self.health.lock().await;
        if health.is_stopping() {
            tracing::warn!("config reload not applied: shutting down");
            return Err("shutting down".to_owned());
        }
        self.current.store(Arc::new(gateway));
        health.follow(&self.current.load()).await;
        drop(health);
        let unchanged = self.needs_restart(&config);
        if !unchanged.is_empty() {
            tracing::warn!(
                keys = %unchanged.join(", "),
                "config reloaded, but these need a restart and keep their old values"
            );
        }
        tracing::info!(
            sources = config.sources.len(),
            aggregations = config.aggregations.len(),
            sources_kept = kept,
            "config reloaded"
        );
        Ok(())
    }

    /// The keys the running listeners (and the trace exporter) were built
    /// from that the new config changes.
    fn needs_restart(&self, config: &Config) -> Vec<&'static str> {
        let (old, new) = (&self.server, &config.server);
        // Each key is the field's name, so the two cannot drift apart.
        macro_rules! changed {
            ($($field:ident),*) => {
                [$((concat!("server.", stringify!($field)), old.$field != new.$field)),*]
            };
        }
        let tls = |t: &Option<crate::config::ListenerTls>| t.as_ref().map(|t| t.fingerprint);
        let special = [
            ("server.tls", tls(&old.tls) != tls(&new.tls)),
            ("telemetry", self.telemetry != config.telemetry),
        ];
        changed!(
            listen,
            metrics_listen,
            max_connections,
            handshake_timeout,
            header_read_timeout,
            idle_timeout,
            keepalive_interval,
            keepalive_timeout,
            max_concurrent_streams,
            max_request_bytes,
            max_buffered_request_bytes,
            request_read_timeout,
            send_timeout,
            max_resets_per_second,
            max_reset_burst,
            drain_timeout,
            shutdown_delay
        )
        .into_iter()
        .chain(special)
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}
