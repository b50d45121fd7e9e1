//! `[defaults]`: the keys every source inherits unless it sets them itself,
//! the rules of that inheritance, and the concurrency caps.

use std::time::Duration;

use serde::Deserialize;

use super::{
    ConfigError, Validator,
    resilience::{BreakerModel, HedgeModel, RetryModel},
    source::{SourceKindModel, SourceModel},
};

/// Default wait for a free slot under a concurrency cap.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_millis(10);

/// `[defaults]`: the keys every source inherits unless it sets them itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DefaultsModel {
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub max_response_bytes: Option<usize>,
    pub max_concurrent: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub queue_timeout: Option<Duration>,
    pub retry: Option<RetryModel>,
    pub coalesce: Option<bool>,
    pub breaker: Option<BreakerModel>,
    pub hedge: Option<HedgeModel>,
    pub forward_metadata: Option<Vec<String>>,
    pub tls: Option<super::tls::UpstreamTlsModel>,
    /// HTTP sources only; gRPC sources have one HTTP/2 connection.
    pub max_connections: Option<usize>,
    pub pool_max_idle: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub pool_idle_timeout: Option<Duration>,
}

/// A concurrency cap and how long a call may wait for a free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max: usize,
    pub queue_timeout: Duration,
}

impl Validator<'_> {
    /// A source's `field` table: its own, else `[defaults]`'s, with the key
    /// that errors in it name.
    pub(super) fn inherit<'m, T>(
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
    pub(super) fn repeating<'m, T>(
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

    /// Zero values in `[defaults]` are named there, not in each source.
    pub(super) fn check_defaults(&self) -> Result<(), ConfigError> {
        let d = self.defaults;
        let zero = [
            ("timeout", d.timeout == Some(Duration::ZERO)),
            ("max_response_bytes", d.max_response_bytes == Some(0)),
            ("max_concurrent", d.max_concurrent == Some(0)),
            ("max_connections", d.max_connections == Some(0)),
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
    pub(super) fn limit(
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
                max: self.count(format!("{table}.{max_key}"), max)?,
                queue_timeout: queue_timeout.unwrap_or(DEFAULT_QUEUE_TIMEOUT),
            })),
            (None, _) => Ok(None),
        }
    }
}

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
