//! Configuration: the TOML file model (serde, unknown keys refused) and its
//! validation into runtime specs. Templates are compiled and descriptor files
//! loaded here, once; nothing is parsed per request.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http::{HeaderName, Method, Uri, uri::PathAndQuery};
use serde::Deserialize;

use crate::{
    template::{JsonTemplate, StrTemplate, TemplateError, UrlTemplate},
    upstream::schema::{self, MethodSchema},
};

/// Default cap on an upstream response body.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Default wait for a free slot under a concurrency cap.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_millis(10);

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

// ---- the file model ----

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerModel {
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

/// `[defaults]`: the keys every source inherits unless it sets them itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsModel {
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    max_response_bytes: Option<usize>,
    max_concurrent: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    queue_timeout: Option<Duration>,
    retry: Option<RetryModel>,
    coalesce: Option<bool>,
    breaker: Option<BreakerModel>,
    hedge: Option<HedgeModel>,
}

/// `hedge = { ... }` of a source or of `[defaults]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HedgeModel {
    /// A duration, or `"p95"`.
    delay: String,
    #[serde(default, with = "humantime_serde")]
    min_delay: Option<Duration>,
}

/// `health_check = { ... }` of a source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheckModel {
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    interval: Duration,
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    timeout: Duration,
    /// HTTP: the path to GET on the source's host.
    path: Option<String>,
    /// gRPC: the service name to ask `grpc.health.v1` about.
    service: Option<String>,
}

fn default_check_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}

/// `breaker = { ... }` of a source or of `[defaults]`; also the breaker a
/// health-checked source gets when it names none.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct BreakerModel {
    failures: u32,
    failure_ratio: Option<f64>,
    min_calls: u32,
    #[serde(with = "humantime_serde")]
    window: Duration,
    #[serde(with = "humantime_serde")]
    cool_down: Duration,
    #[serde(with = "humantime_serde")]
    max_cool_down: Duration,
}

impl Default for BreakerModel {
    fn default() -> Self {
        Self {
            failures: 5,
            failure_ratio: None,
            min_calls: 20,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(5),
            max_cool_down: Duration::from_secs(60),
        }
    }
}

/// `retry = { ... }` of a source or of `[defaults]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryModel {
    attempts: u32,
    #[serde(default = "default_backoff", with = "humantime_serde")]
    backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    max_backoff: Duration,
    on: Option<Vec<String>>,
    #[serde(default = "default_budget")]
    budget: f32,
    #[serde(default = "default_min_per_second")]
    min_per_second: u32,
}

fn default_backoff() -> Duration {
    Duration::from_millis(25)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(1)
}

fn default_budget() -> f32 {
    0.2
}

fn default_min_per_second() -> u32 {
    10
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}

fn default_aggregation_timeout() -> Duration {
    Duration::from_secs(10)
}

/// One `[sources.NAME]` table. Flat rather than an enum tagged by `kind`:
/// serde buffers tagged enums, and toml then loses the key and line of an
/// error inside the table. Keys of the other kind are refused in validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceModel {
    kind: SourceKindModel,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    max_response_bytes: Option<usize>,
    max_concurrent: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    queue_timeout: Option<Duration>,
    fallback: Option<toml::Value>,
    retry: Option<RetryModel>,
    idempotent: Option<bool>,
    coalesce: Option<bool>,
    breaker: Option<BreakerModel>,
    health_check: Option<HealthCheckModel>,
    hedge: Option<HedgeModel>,
    /// gRPC: `package.Service/Method`; HTTP: the request method.
    method: Option<String>,
    // gRPC only
    endpoint: Option<String>,
    request: Option<toml::Table>,
    protos: Option<Vec<PathBuf>>,
    import_paths: Option<Vec<PathBuf>>,
    descriptor_set: Option<PathBuf>,
    // HTTP only
    url: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    body: Option<toml::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SourceKindModel {
    Grpc,
    Http,
}

impl SourceModel {
    /// The first key set that belongs to the other kind of source.
    fn foreign_key(&self) -> Option<&'static str> {
        let set = |present: bool, key: &'static str| present.then_some(key);
        match self.kind {
            SourceKindModel::Grpc => set(self.url.is_some(), "url")
                .or(set(self.headers.is_some(), "headers"))
                .or(set(self.body.is_some(), "body")),
            SourceKindModel::Http => set(self.endpoint.is_some(), "endpoint")
                .or(set(self.request.is_some(), "request"))
                .or(set(self.protos.is_some(), "protos"))
                .or(set(self.import_paths.is_some(), "import_paths"))
                .or(set(self.descriptor_set.is_some(), "descriptor_set")),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AggregationModel {
    sources: Vec<String>,
    #[serde(default)]
    optional: Vec<String>,
    #[serde(default)]
    mode: Mode,
    #[serde(default = "default_aggregation_timeout", with = "humantime_serde")]
    timeout: Duration,
}

// ---- runtime specs ----

/// How failures of sources affect a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The first failure of a required source cancels the rest and fails the call.
    #[default]
    FailFast,
    /// Every source runs to completion; failures are reported per source.
    BestEffort,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Address the gateway serves gRPC on.
    pub listen: SocketAddr,
    /// How long in-flight calls may run after a shutdown signal.
    pub drain_timeout: Duration,
    /// Gateway-wide cap on concurrent `Aggregate`/`FetchAll` calls.
    pub max_concurrent_calls: Option<Limit>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Every source, sorted by name.
    pub sources: Vec<Arc<SourceSpec>>,
    /// Every aggregation, sorted by name.
    pub aggregations: Vec<AggregationSpec>,
}

#[derive(Debug)]
pub struct SourceSpec {
    pub name: Arc<str>,
    /// The source's own bound on one call, if shorter than the call's deadline.
    pub timeout: Option<Duration>,
    /// Largest response body accepted from the upstream.
    pub max_response_bytes: usize,
    /// Cap on this source's concurrent upstream requests.
    pub max_concurrent: Option<Limit>,
    /// Served in place of the data when the source fails and the call goes on.
    pub fallback: Option<serde_json::Value>,
    /// Retries; only ever set on a source that is safe to repeat.
    pub retry: Option<RetrySpec>,
    /// Whether identical concurrent calls share one upstream request.
    pub coalesce: bool,
    /// Set whenever `health_check` is (the checks feed it).
    pub breaker: Option<BreakerSpec>,
    pub health_check: Option<HealthCheckSpec>,
    /// Hedged requests; only ever set on a source that is safe to repeat.
    pub hedge: Option<HedgeSpec>,
    pub kind: SourceKind,
}

/// When to send a second, identical request.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgeSpec {
    pub delay: HedgeDelay,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    Fixed(Duration),
    /// The source's observed p95 latency, at least `min`.
    P95 {
        min: Duration,
    },
}

/// An active health check: its verdicts open and close the source's circuit.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckSpec {
    pub interval: Duration,
    pub timeout: Duration,
    pub target: HealthTarget,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HealthTarget {
    /// GET this URL; any 2xx is healthy.
    Http(Uri),
    /// `grpc.health.v1.Health/Check` for this service; SERVING is healthy.
    Grpc { service: String },
}

/// When a source's circuit opens and how long it stays open.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSpec {
    /// Consecutive failures that open it.
    pub failures: u32,
    /// Or this fraction of failed calls over `window`...
    pub failure_ratio: Option<f64>,
    /// ...once the window holds at least this many calls.
    pub min_calls: u32,
    pub window: Duration,
    /// How long it stays open before a probe; doubles per failed probe.
    pub cool_down: Duration,
    pub max_cool_down: Duration,
}

/// When and how often a failed request is sent again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySpec {
    /// Requests in all, the first included.
    pub attempts: u32,
    /// Cap of the first backoff; doubles per retry up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub on: RetryOn,
    /// Retries allowed as a fraction of recent requests.
    pub budget: f32,
    /// Retries allowed per second regardless of `budget`.
    pub min_per_second: u32,
}

/// The failures a source retries: a subset of those safe to repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn(u8);

impl RetryOn {
    /// The names of `on = [...]`, each a failure that leaves nothing done
    /// upstream or that the upstream declares transient.
    pub const NAMES: [&'static str; 7] = [
        "connect",
        "unavailable",
        "resource_exhausted",
        "429",
        "502",
        "503",
        "504",
    ];
    pub const ALL: Self = Self((1 << Self::NAMES.len()) - 1);

    pub fn parse(names: &[String]) -> Result<Self, String> {
        names.iter().try_fold(Self(0), |set, name| {
            Self::NAMES
                .iter()
                .position(|n| n == name)
                .map(|i| Self(set.0 | 1 << i))
                .ok_or_else(|| {
                    format!(
                        "`{name}` is not a failure safe to retry; expected some of {}",
                        Self::NAMES.join(", ")
                    )
                })
        })
    }

    pub fn contains(self, name: &str) -> bool {
        Self::NAMES
            .iter()
            .position(|n| *n == name)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }
}

/// A concurrency cap and how long a call may wait for a free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max: usize,
    pub queue_timeout: Duration,
}

#[derive(Debug)]
pub enum SourceKind {
    Grpc(GrpcSpec),
    Http(HttpSpec),
}

#[derive(Debug)]
pub struct GrpcSpec {
    pub endpoint: Uri,
    /// Fully qualified service name, e.g. `demo.v1.Profiles`.
    pub service: String,
    pub method: String,
    /// `/service/method`, the HTTP/2 path of the call.
    pub path: PathAndQuery,
    pub request: JsonTemplate,
    /// Known at load when `protos` or `descriptor_set` is given; else learned
    /// from the upstream's reflection on first use.
    pub schema: Option<MethodSchema>,
}

#[derive(Debug)]
pub struct HttpSpec {
    pub method: Method,
    pub url: UrlTemplate,
    pub headers: Vec<(HeaderName, StrTemplate)>,
    pub body: Option<JsonTemplate>,
}

impl SourceSpec {
    /// The placeholder names this source's requests need, deduplicated.
    pub fn params(&self) -> Vec<Arc<str>> {
        let all: Vec<&Arc<str>> = match &self.kind {
            SourceKind::Grpc(g) => g.request.params().collect(),
            SourceKind::Http(h) => h
                .url
                .params()
                .chain(h.headers.iter().flat_map(|(_, t)| t.params()))
                .chain(h.body.iter().flat_map(JsonTemplate::params))
                .collect(),
        };
        let mut out: Vec<Arc<str>> = Vec::new();
        for p in all {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        out
    }
}

#[derive(Debug)]
pub struct AggregationSpec {
    pub name: Arc<str>,
    /// Sources in configured order, each with whether it is optional.
    pub members: Vec<(Arc<SourceSpec>, bool)>,
    pub mode: Mode,
    /// Cap on the whole call; a shorter caller deadline wins.
    pub timeout: Duration,
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
        let model: FileModel = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            source: Box::new(e),
        })?;
        let v = Validator {
            origin,
            base_dir,
            defaults: &model.defaults,
        };
        v.check_defaults()?;
        let max_concurrent_calls = v.limit(
            "server",
            model.server.max_concurrent_calls,
            model.server.queue_timeout,
        )?;
        let sources: Vec<Arc<SourceSpec>> = model
            .sources
            .into_iter()
            .map(|(name, m)| v.source(name, m).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let aggregations = model
            .aggregations
            .into_iter()
            .map(|(name, m)| v.aggregation(name, m, &sources))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            listen: model.server.listen,
            drain_timeout: model.server.drain_timeout,
            max_concurrent_calls,
            metrics_listen: model.server.metrics_listen,
            sources,
            aggregations,
        })
    }
}

struct Validator<'a> {
    origin: &'a str,
    base_dir: &'a Path,
    defaults: &'a DefaultsModel,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// A source's `field` table: its own, else `[defaults]`'s, with the key
    /// that errors in it name.
    fn inherit<'m, T>(
        name: &str,
        field: &str,
        own: &'m Option<T>,
        inherited: &'m Option<T>,
    ) -> Option<(&'m T, String)> {
        match (own, inherited) {
            (Some(own), _) => Some((own, format!("sources.{name}.{field}"))),
            (None, Some(inherited)) => Some((inherited, format!("defaults.{field}"))),
            (None, None) => None,
        }
    }

    /// [`Self::inherit`] for a mechanism that sends a request again (retry,
    /// hedge): only for sources safe to repeat (gRPC, and HTTP
    /// GET/HEAD/PUT/DELETE, unless `idempotent` says otherwise). Inherited by
    /// another source it is dropped; written on it, refused.
    fn repeating<'m, T>(
        &self,
        name: &str,
        field: &str,
        model: &SourceModel,
        own: &'m Option<T>,
        inherited: &'m Option<T>,
    ) -> Result<Option<(&'m T, String)>, ConfigError> {
        let Some(found) = Self::inherit(name, field, own, inherited) else {
            return Ok(None);
        };
        if safe_to_repeat(model) {
            return Ok(Some(found));
        }
        match own {
            Some(_) => {
                let method = model.method.as_deref().unwrap_or("GET");
                Err(self.err(
                    found.1,
                    format!("{method} is not safe to repeat; set `idempotent = true` if it is"),
                ))
            }
            None => Ok(None),
        }
    }

    /// A source's retry policy.
    fn retry(&self, name: &str, model: &SourceModel) -> Result<Option<RetrySpec>, ConfigError> {
        let retries = self.repeating(name, "retry", model, &model.retry, &self.defaults.retry)?;
        let Some((retry, table)) = retries else {
            return Ok(None);
        };
        let err = |field: &str, message: &str| self.err(format!("{table}.{field}"), message);
        if retry.attempts < 1 {
            return Err(err(
                "attempts",
                "must be at least 1 (the first request counts)",
            ));
        }
        if retry.backoff > retry.max_backoff {
            return Err(err("backoff", "must not exceed `max_backoff`"));
        }
        if !(0.0..=10.0).contains(&retry.budget) {
            return Err(err(
                "budget",
                "expected a fraction of requests, 0.0 to 10.0",
            ));
        }
        let on = match &retry.on {
            Some(names) => RetryOn::parse(names).map_err(|m| err("on", &m))?,
            None => RetryOn::ALL,
        };
        Ok(Some(RetrySpec {
            attempts: retry.attempts,
            backoff: retry.backoff,
            max_backoff: retry.max_backoff,
            on,
            budget: retry.budget,
            min_per_second: retry.min_per_second,
        }))
    }

    /// A source's hedging; like retries, only where safe to repeat.
    fn hedge(&self, name: &str, model: &SourceModel) -> Result<Option<HedgeSpec>, ConfigError> {
        let hedges = self.repeating(name, "hedge", model, &model.hedge, &self.defaults.hedge)?;
        let Some((hedge, table)) = hedges else {
            return Ok(None);
        };
        let delay = match hedge.delay.as_str() {
            "p95" => HedgeDelay::P95 {
                min: hedge.min_delay.unwrap_or(Duration::from_millis(1)),
            },
            text => {
                if hedge.min_delay.is_some() {
                    return Err(self.err(
                        format!("{table}.min_delay"),
                        "only applies to `delay = \"p95\"`",
                    ));
                }
                HedgeDelay::Fixed(humantime::parse_duration(text).map_err(|e| {
                    self.err(
                        format!("{table}.delay"),
                        format!("expected a duration such as \"50ms\" or \"p95\": {e}"),
                    )
                })?)
            }
        };
        Ok(Some(HedgeSpec { delay }))
    }

    fn health_check(
        &self,
        name: &str,
        model: &SourceModel,
    ) -> Result<Option<HealthCheckSpec>, ConfigError> {
        let Some(check) = &model.health_check else {
            return Ok(None);
        };
        let err = |field: &str, message: &str| {
            self.err(format!("sources.{name}.health_check.{field}"), message)
        };
        if check.interval.is_zero() || check.timeout.is_zero() {
            let field = if check.interval.is_zero() {
                "interval"
            } else {
                "timeout"
            };
            return Err(err(field, "must be greater than zero"));
        }
        let target = match model.kind {
            SourceKindModel::Http => {
                if check.service.is_some() {
                    return Err(err(
                        "service",
                        "is for gRPC sources; HTTP sources give `path`",
                    ));
                }
                let path = check.path.as_deref().ok_or_else(|| {
                    err(
                        "path",
                        "missing; expected the path to GET, e.g. \"/healthz\"",
                    )
                })?;
                let url = model.url.as_deref().unwrap_or_default();
                let origin = UrlTemplate::parse(url)
                    .map(|u| u.origin().to_owned())
                    .unwrap_or_default();
                let uri = format!("{origin}{path}")
                    .parse::<Uri>()
                    .ok()
                    .filter(|_| path.starts_with('/'))
                    .ok_or_else(|| err("path", "expected an absolute path such as \"/healthz\""))?;
                HealthTarget::Http(uri)
            }
            SourceKindModel::Grpc => {
                if check.path.is_some() {
                    return Err(err(
                        "path",
                        "is for HTTP sources; gRPC sources give `service`",
                    ));
                }
                let service = check.service.clone().unwrap_or_else(|| {
                    let method = model.method.as_deref().unwrap_or_default();
                    method
                        .split_once('/')
                        .map(|(s, _)| s.to_owned())
                        .unwrap_or_default()
                });
                HealthTarget::Grpc { service }
            }
        };
        Ok(Some(HealthCheckSpec {
            interval: check.interval,
            timeout: check.timeout,
            target,
        }))
    }

    /// A source's circuit breaker: its own or `[defaults]`'s, else the
    /// default one when `health_check` needs a circuit to open.
    fn breaker(&self, name: &str, model: &SourceModel) -> Result<Option<BreakerSpec>, ConfigError> {
        let default = BreakerModel::default();
        let (b, table) =
            match Self::inherit(name, "breaker", &model.breaker, &self.defaults.breaker) {
                Some(found) => found,
                None if model.health_check.is_some() => {
                    (&default, format!("sources.{name}.breaker"))
                }
                None => return Ok(None),
            };
        let err = |field: &str, message: &str| self.err(format!("{table}.{field}"), message);
        if b.failures < 1 {
            return Err(err("failures", "must be at least 1"));
        }
        if b.failure_ratio.is_some_and(|r| !(r > 0.0 && r <= 1.0)) {
            return Err(err(
                "failure_ratio",
                "expected a fraction above 0 and at most 1",
            ));
        }
        if b.window.is_zero() || b.cool_down.is_zero() {
            let field = if b.window.is_zero() {
                "window"
            } else {
                "cool_down"
            };
            return Err(err(field, "must be greater than zero"));
        }
        if b.cool_down > b.max_cool_down {
            return Err(err("cool_down", "must not exceed `max_cool_down`"));
        }
        Ok(Some(BreakerSpec {
            failures: b.failures,
            failure_ratio: b.failure_ratio,
            min_calls: b.min_calls.max(1),
            window: b.window,
            cool_down: b.cool_down,
            max_cool_down: b.max_cool_down,
        }))
    }

    /// Zero values in `[defaults]` are named there, not in each source.
    fn check_defaults(&self) -> Result<(), ConfigError> {
        let d = self.defaults;
        let zero = [
            ("timeout", d.timeout == Some(Duration::ZERO)),
            ("max_response_bytes", d.max_response_bytes == Some(0)),
            ("max_concurrent", d.max_concurrent == Some(0)),
        ];
        match zero.into_iter().find(|(_, z)| *z) {
            Some((field, _)) => {
                Err(self.err(format!("defaults.{field}"), "must be greater than zero"))
            }
            None => Ok(()),
        }
    }

    /// `max_concurrent` (or `max_concurrent_calls`) and `queue_timeout` of
    /// `table`, already merged with any defaults.
    fn limit(
        &self,
        table: &str,
        max: Option<usize>,
        queue_timeout: Option<Duration>,
    ) -> Result<Option<Limit>, ConfigError> {
        let max_key = if table == "server" {
            "max_concurrent_calls"
        } else {
            "max_concurrent"
        };
        match (max, queue_timeout) {
            (Some(0), _) => Err(self.err(format!("{table}.{max_key}"), "must be at least 1")),
            (Some(max), queue_timeout) => Ok(Some(Limit {
                max,
                queue_timeout: queue_timeout.unwrap_or(DEFAULT_QUEUE_TIMEOUT),
            })),
            (None, _) => Ok(None),
        }
    }

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

    fn source(&self, name: String, model: SourceModel) -> Result<SourceSpec, ConfigError> {
        self.name("sources", &name)?;
        let key = |field: &str| format!("sources.{name}.{field}");
        let template_err = |field: &str, e: TemplateError| self.err(key(field), e.to_string());
        if let Some(foreign) = model.foreign_key() {
            let kind = match model.kind {
                SourceKindModel::Grpc => "grpc",
                SourceKindModel::Http => "http",
            };
            return Err(self.err(key(foreign), format!("not a key of {kind} sources")));
        }
        let required = |value: Option<String>, field: &str, expected: &str| {
            value.ok_or_else(|| self.err(key(field), format!("missing; expected {expected}")))
        };
        let d = self.defaults;
        let timeout = model.timeout.or(d.timeout);
        let max_response_bytes = model.max_response_bytes.or(d.max_response_bytes);
        let max_concurrent = self.limit(
            &format!("sources.{name}"),
            model.max_concurrent.or(d.max_concurrent),
            model.queue_timeout.or(d.queue_timeout),
        )?;
        let retry = self.retry(&name, &model)?;
        let health_check = self.health_check(&name, &model)?;
        let hedge = self.hedge(&name, &model)?;
        let breaker = self.breaker(&name, &model)?;
        // On by default for reads (gRPC methods not marked `idempotent =
        // false`, HTTP GET and HEAD); other sources only by their own say.
        let read = match model.kind {
            SourceKindModel::Grpc => model.idempotent.unwrap_or(true),
            SourceKindModel::Http => matches!(model.method.as_deref(), None | Some("GET" | "HEAD")),
        };
        let coalesce = match model.coalesce {
            Some(own) => own,
            None => self.defaults.coalesce.unwrap_or(true) && read,
        };
        let fallback = model
            .fallback
            .as_ref()
            .map(toml_to_json)
            .transpose()
            .map_err(|m| self.err(key("fallback"), m))?;
        let kind = match model.kind {
            SourceKindModel::Grpc => {
                let endpoint: Uri =
                    required(model.endpoint, "endpoint", "an http://host:port URL")?
                        .parse()
                        .ok()
                        .filter(|u: &Uri| u.scheme_str() == Some("http") && u.authority().is_some())
                        .ok_or_else(|| {
                            self.err(key("endpoint"), "expected an http://host:port URL")
                        })?;
                let method = required(model.method, "method", "`package.Service/Method`")?;
                let (service, method) = method
                    .split_once('/')
                    .filter(|(s, m)| s.contains('.') && !m.is_empty() && !m.contains('/'))
                    .ok_or_else(|| self.err(key("method"), "expected `package.Service/Method`"))?;
                let path = PathAndQuery::try_from(format!("/{service}/{method}"))
                    .map_err(|e| self.err(key("method"), e.to_string()))?;
                let request = toml_to_json(&toml::Value::Table(model.request.unwrap_or_default()))
                    .map_err(|m| self.err(key("request"), m))?;
                let request =
                    JsonTemplate::compile(&request).map_err(|e| template_err("request", e))?;
                let schema = self
                    .schema(
                        &model.protos.unwrap_or_default(),
                        &model.import_paths.unwrap_or_default(),
                        model.descriptor_set.as_deref(),
                    )
                    .map_err(|(field, m)| self.err(key(field), m))?
                    .map(|pool| {
                        let s = schema::method_schema(&pool, service, method)?;
                        schema::check_template(&request, &s.input)?;
                        Ok(s)
                    })
                    .transpose()
                    .map_err(|m: String| self.err(key("method"), m))?;
                SourceKind::Grpc(GrpcSpec {
                    endpoint,
                    service: service.to_owned(),
                    method: method.to_owned(),
                    path,
                    request,
                    schema,
                })
            }
            SourceKindModel::Http => {
                let url = required(model.url, "url", "an http:// URL template")?;
                let url = UrlTemplate::parse(&url).map_err(|e| template_err("url", e))?;
                let method = match model.method.as_deref().unwrap_or("GET") {
                    m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE") => {
                        Method::from_bytes(m.as_bytes()).expect("standard method")
                    }
                    other => {
                        return Err(self.err(
                            key("method"),
                            format!("`{other}`: expected GET, HEAD, POST, PUT, PATCH or DELETE"),
                        ));
                    }
                };
                let headers = model
                    .headers
                    .unwrap_or_default()
                    .iter()
                    .map(|(k, v)| {
                        let hkey = key(&format!("headers.{k}"));
                        let name = HeaderName::try_from(k.as_str())
                            .map_err(|_| self.err(&hkey, "not a valid header name"))?;
                        let value =
                            StrTemplate::parse(v).map_err(|e| self.err(&hkey, e.to_string()))?;
                        // Literal text must already be a valid header value.
                        let probe = value.params().map(|p| (p.to_string(), String::new()));
                        crate::template::render_header(&value, &probe.collect())
                            .map_err(|_| self.err(&hkey, "not a valid header value"))?;
                        Ok((name, value))
                    })
                    .collect::<Result<_, ConfigError>>()?;
                let body = model
                    .body
                    .map(|b| {
                        if method == Method::GET || method == Method::HEAD {
                            return Err(self.err(key("body"), "GET and HEAD requests have no body"));
                        }
                        let json = toml_to_json(&b).map_err(|m| self.err(key("body"), m))?;
                        JsonTemplate::compile(&json).map_err(|e| template_err("body", e))
                    })
                    .transpose()?;
                SourceKind::Http(HttpSpec {
                    method,
                    url,
                    headers,
                    body,
                })
            }
        };
        if timeout == Some(Duration::ZERO) {
            return Err(self.err(key("timeout"), "must be greater than zero"));
        }
        if max_response_bytes == Some(0) {
            return Err(self.err(key("max_response_bytes"), "must be greater than zero"));
        }
        Ok(SourceSpec {
            name: name.into(),
            timeout,
            max_response_bytes: max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
            max_concurrent,
            fallback,
            retry,
            coalesce,
            breaker,
            health_check,
            hedge,
            kind,
        })
    }

    /// Loads descriptors named in the config, if any: (field, message) on error.
    fn schema(
        &self,
        protos: &[PathBuf],
        import_paths: &[PathBuf],
        descriptor_set: Option<&Path>,
    ) -> Result<Option<prost_reflect::DescriptorPool>, (&'static str, String)> {
        let resolve = |p: &Path| self.base_dir.join(p);
        match (protos.is_empty(), descriptor_set) {
            (true, None) => Ok(None),
            (false, Some(_)) => Err((
                "descriptor_set",
                "give either `protos` or `descriptor_set`, not both".into(),
            )),
            (true, Some(path)) => {
                let path = resolve(path);
                let bytes = std::fs::read(&path)
                    .map_err(|e| ("descriptor_set", format!("{}: {e}", path.display())))?;
                prost_reflect::DescriptorPool::decode(bytes.as_slice())
                    .map(Some)
                    .map_err(|e| ("descriptor_set", format!("{}: {e}", path.display())))
            }
            (false, None) => {
                let mut includes: Vec<PathBuf> = import_paths.iter().map(|p| resolve(p)).collect();
                if includes.is_empty() {
                    includes.push(self.base_dir.to_path_buf());
                }
                // A proto is named relative to the config file or to an import path.
                let protos: Vec<PathBuf> = protos
                    .iter()
                    .map(|p| Some(resolve(p)).filter(|r| r.exists()).unwrap_or(p.clone()))
                    .collect();
                let fds =
                    protox::compile(&protos, &includes).map_err(|e| ("protos", e.to_string()))?;
                prost_reflect::DescriptorPool::from_file_descriptor_set(fds)
                    .map(Some)
                    .map_err(|e| ("protos", e.to_string()))
            }
        }
    }

    fn aggregation(
        &self,
        name: String,
        model: AggregationModel,
        sources: &[Arc<SourceSpec>],
    ) -> Result<AggregationSpec, ConfigError> {
        self.name("aggregations", &name)?;
        let key = |field: &str| format!("aggregations.{name}.{field}");
        if model.sources.is_empty() {
            return Err(self.err(key("sources"), "list at least one source"));
        }
        let known = || {
            sources
                .iter()
                .map(|s| &*s.name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut seen = HashSet::new();
        let members = model
            .sources
            .iter()
            .map(|s| {
                if !seen.insert(s.as_str()) {
                    return Err(self.err(key("sources"), format!("source '{s}' is listed twice")));
                }
                let spec = sources
                    .iter()
                    .find(|spec| &*spec.name == s)
                    .ok_or_else(|| {
                        self.err(
                            key("sources"),
                            format!("unknown source '{s}' (known: {})", known()),
                        )
                    })?;
                Ok((spec.clone(), model.optional.contains(s)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(stray) = model.optional.iter().find(|o| !seen.contains(o.as_str())) {
            return Err(self.err(
                key("optional"),
                format!("'{stray}' is not one of this aggregation's sources"),
            ));
        }
        if model.timeout.is_zero() {
            return Err(self.err(key("timeout"), "must be greater than zero"));
        }
        Ok(AggregationSpec {
            name: name.into(),
            members,
            mode: model.mode,
            timeout: model.timeout,
        })
    }
}

/// TOML to JSON; datetimes and non-finite floats have no JSON form.
/// gRPC methods, and HTTP GET/HEAD/PUT/DELETE, unless `idempotent` says otherwise.
fn safe_to_repeat(model: &SourceModel) -> bool {
    model.idempotent.unwrap_or(match model.kind {
        SourceKindModel::Grpc => true,
        SourceKindModel::Http => matches!(
            model.method.as_deref().unwrap_or("GET"),
            "GET" | "HEAD" | "PUT" | "DELETE"
        ),
    })
}

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
