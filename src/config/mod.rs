//! Configuration: the TOML file model (serde, unknown keys refused) and its
//! validation into runtime specs. Templates are compiled and descriptor files
//! loaded here, once; nothing is parsed per request.
//!
//! One file per table: `server.rs`, `defaults.rs`, `source.rs` (with the
//! kinds in `grpc.rs` and `http.rs`, and the resilience keys in
//! `resilience.rs`), `aggregation.rs`. Each adds its part of the `Validator`.

mod aggregation;
mod compose;
mod defaults;
mod grpc;
mod http;
mod metadata;
mod resilience;
mod server;
mod source;
mod store;
mod telemetry;
mod tls;

use std::{collections::BTreeMap, path::Path, sync::Arc};

use serde::Deserialize;

use self::{
    aggregation::AggregationModel, defaults::DefaultsModel, server::ServerModel,
    source::SourceModel, telemetry::TelemetryModel,
};
pub use self::{
    aggregation::{AggregationSpec, Mode},
    compose::{DEFAULT_MAX_ITEMS, DEFAULT_MAX_PARALLEL, ForEach},
    defaults::{DEFAULT_QUEUE_TIMEOUT, Limit},
    grpc::GrpcSpec,
    http::{DEFAULT_MAX_CONNECTIONS, DEFAULT_POOL_IDLE_TIMEOUT, HttpSpec, PoolSpec},
    resilience::{
        BreakerSpec, HealthCheckSpec, HealthTarget, HedgeDelay, HedgeSpec, RetryOn, RetrySpec,
    },
    server::{
        DEFAULT_MAX_RESET_BURST, DEFAULT_MAX_RESETS_PER_SECOND, DEFAULT_STORE_TIMEOUT, ServerSpec,
    },
    source::{DEFAULT_MAX_RESPONSE_BYTES, SourceKind, SourceSpec},
    store::{CacheSpec, DEFAULT_MAX_ENTRIES, KeyMissing, OnStoreError, RateLimitSpec},
    telemetry::TelemetrySpec,
    tls::{ListenerTls, UpstreamTls, provider as tls_provider},
};

/// A config that cannot be used; names the file, the key and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("{origin}: `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    #[serde(default)]
    server: ServerModel,
    #[serde(default)]
    defaults: DefaultsModel,
    #[serde(default)]
    sources: BTreeMap<String, SourceModel>,
    #[serde(default)]
    aggregations: BTreeMap<String, AggregationModel>,
    #[serde(default)]
    telemetry: TelemetryModel,
    #[serde(default)]
    rate_limits: BTreeMap<String, store::RateLimitModel>,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// `[server]`: listeners, caps and timeouts of the gateway itself.
    pub server: ServerSpec,
    /// Every source, sorted by name.
    pub sources: Vec<Arc<SourceSpec>>,
    /// Every aggregation, sorted by name.
    pub aggregations: Vec<AggregationSpec>,
    /// `[telemetry]`: traces.
    pub telemetry: TelemetrySpec,
    /// Every `[rate_limits.NAME]`, sorted by name.
    pub rate_limits: Vec<RateLimitSpec>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            origin: origin.clone(),
            source,
        })?;
        Self::parse(&text, &origin, path.parent().unwrap_or(Path::new(".")))
    }

    /// Validates config text; `origin` names it in errors and `base_dir`
    /// anchors relative paths (`protos`, `descriptor_set`).
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let parse_error = |e| ConfigError::Parse {
            origin: origin.to_owned(),
            source: Box::new(e),
        };
        let model: FileModel = toml::from_str(text).map_err(parse_error)?;
        let raw: toml::Table = toml::from_str(text).map_err(parse_error)?;
        let v = Validator {
            origin,
            base_dir,
            defaults: &model.defaults,
            raw: &raw,
            fingerprint: Default::default(),
        };
        v.check_defaults()?;
        let server = v.server(&model.server)?;
        let telemetry = v.telemetry(&model.telemetry)?;
        let sources: Vec<Arc<SourceSpec>> = model
            .sources
            .into_iter()
            .map(|(name, m)| v.source(name, m).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let aggregations = model
            .aggregations
            .into_iter()
            .map(|(name, m)| v.aggregation(name, m, &sources))
            .collect::<Result<Vec<_>, _>>()?;
        let rate_limits = model
            .rate_limits
            .into_iter()
            .map(|(name, m)| v.rate_limit(name, m, &aggregations))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            rate_limits,
            server,
            sources,
            aggregations,
            telemetry,
        })
    }
}

/// Turns the file model into runtime specs; each table's file adds its
/// methods. Errors name the file and the key.
struct Validator<'a> {
    origin: &'a str,
    base_dir: &'a Path,
    defaults: &'a DefaultsModel,
    /// The file as TOML values, for what the model does not keep.
    raw: &'a toml::Table,
    /// What the source being validated is made of: its table, `[defaults]`,
    /// and every file it reads (descriptors, certificates).
    fingerprint: std::cell::RefCell<std::collections::hash_map::DefaultHasher>,
}

/// The largest count a limit may be (calls, connections): far above what
/// any machine holds, and far below what the semaphores behind the limits
/// can take.
pub const MAX_COUNT: usize = 1 << 30;

impl Validator<'_> {
    /// `n` as the value of a count `key`, which must not exceed [`MAX_COUNT`].
    fn count(&self, key: impl Into<String>, n: usize) -> Result<usize, ConfigError> {
        if n > MAX_COUNT {
            return Err(self.err(key, format!("must be at most {MAX_COUNT}")));
        }
        Ok(n)
    }

    /// Adds what a source depends on to its fingerprint.
    fn depends_on(&self, bytes: &[u8]) {
        use std::hash::Hasher;
        self.fingerprint.borrow_mut().write(bytes);
    }

    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Source and aggregation names.
    fn name(&self, table: &str, name: &str) -> Result<(), ConfigError> {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        ok.then_some(()).ok_or_else(|| {
            self.err(
                format!("{table}.{name}"),
                "a name is made of letters, digits, `_` and `-`",
            )
        })
    }
}

/// TOML to JSON; datetimes and non-finite floats have no JSON form.
fn toml_to_json(value: &toml::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match value {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .ok_or("NaN and infinity have no JSON form")?,
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => return Err(format!("datetime {d} has no JSON form; quote it")),
        toml::Value::Array(items) => {
            J::Array(items.iter().map(toml_to_json).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| Ok((k.clone(), toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests;
