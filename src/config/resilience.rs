//! `retry`, `breaker`, `hedge` and `health_check` of a source (or of
//! `[defaults]`): their file model, validation and runtime specs.

use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use super::{
    ConfigError, Validator,
    source::{SourceKindModel, SourceModel},
};
use crate::template::UrlTemplate;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HedgeModel {
    /// A duration, or `"p95"`.
    pub(super) delay: String,
    #[serde(default, with = "humantime_serde")]
    pub(super) min_delay: Option<Duration>,
}

/// `health_check = { ... }` of a source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthCheckModel {
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub(super) interval: Duration,
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub(super) timeout: Duration,
    /// HTTP: the path to GET on the source's host.
    pub(super) path: Option<String>,
    /// gRPC: the service name to ask `grpc.health.v1` about.
    pub(super) service: Option<String>,
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
pub(super) struct BreakerModel {
    pub(super) failures: u32,
    pub(super) failure_ratio: Option<f64>,
    pub(super) min_calls: u32,
    #[serde(with = "humantime_serde")]
    pub(super) window: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) cool_down: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) max_cool_down: Duration,
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
pub(super) struct RetryModel {
    pub(super) attempts: u32,
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub(super) backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub(super) max_backoff: Duration,
    pub(super) on: Option<Vec<String>>,
    #[serde(default = "default_budget")]
    pub(super) budget: f32,
    #[serde(default = "default_min_per_second")]
    pub(super) min_per_second: u32,
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

impl Validator<'_> {
    /// A source's retry policy.
    pub(super) fn retry(
        &self,
        name: &str,
        model: &SourceModel,
    ) -> Result<Option<RetrySpec>, ConfigError> {
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
    pub(super) fn hedge(
        &self,
        name: &str,
        model: &SourceModel,
    ) -> Result<Option<HedgeSpec>, ConfigError> {
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

    pub(super) fn health_check(
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
    pub(super) fn breaker(
        &self,
        name: &str,
        model: &SourceModel,
    ) -> Result<Option<BreakerSpec>, ConfigError> {
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
}
