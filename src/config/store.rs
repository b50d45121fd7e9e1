//! What lives in the store (`[server] store`, in this process without it):
//! a source's `cache` and the `[rate_limits.NAME]` tables.

use std::{sync::Arc, time::Duration};

use serde::Deserialize;

use super::{ConfigError, MAX_COUNT, Validator};
use crate::template::StrTemplate;

/// The longest `ttl` or stale window: far beyond any use, far below what
/// the caches' timers and Redis's expiries can take.
const MAX_WINDOW: Duration = Duration::from_secs(365 * 86_400);

/// A source's response cache when `max_entries` is not set.
pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;

/// `cache = { ttl = "30s", ... }` on a source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CacheModel {
    #[serde(with = "humantime_serde")]
    ttl: Duration,
    #[serde(default, with = "humantime_serde")]
    stale_while_revalidate: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    stale_if_error: Option<Duration>,
    max_entries: Option<u64>,
}

/// A source's response cache, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// How long an entry is fresh (an HTTP upstream's `max-age` may cut it).
    pub ttl: Duration,
    /// Past `ttl`, how long an entry is served while one refresh runs.
    pub stale_while_revalidate: Duration,
    /// Past `ttl`, how long an entry stands in for a failed upstream call.
    pub stale_if_error: Duration,
    /// Entries held in this process (the memory store only).
    pub max_entries: u64,
}

impl CacheSpec {
    /// How long an entry is worth keeping: past this it can serve nothing.
    pub fn retention(&self, ttl: Duration) -> Duration {
        ttl + self.stale_while_revalidate.max(self.stale_if_error)
    }
}

/// `[rate_limits.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitModel {
    key: String,
    rate: String,
    burst: Option<u32>,
    aggregations: Option<Vec<String>>,
    #[serde(default)]
    on_store_error: OnStoreError,
    #[serde(default)]
    key_missing: KeyMissing,
}

/// What a rate limit does when the store cannot be asked in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Let the call through: a down store never fails calls.
    #[default]
    Allow,
    /// Refuse it, as if over the limit.
    Deny,
}

/// What a rate limit does with a call whose key cannot be rendered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyMissing {
    /// INVALID_ARGUMENT, naming what is missing.
    #[default]
    Reject,
    /// One bucket for every such caller.
    Shared,
}

/// A rate limit, validated.
#[derive(Debug, Clone)]
pub struct RateLimitSpec {
    pub name: Arc<str>,
    /// Renders the bucket a call counts against.
    pub key: StrTemplate,
    /// One call is let through per `interval`, on average...
    pub interval: Duration,
    /// ...and this many at once after a quiet spell.
    pub burst: u32,
    /// As configured (`100/s`), for messages.
    pub rate: Arc<str>,
    /// The aggregations it applies to; `None` is all.
    pub aggregations: Option<Vec<Arc<str>>>,
    pub on_store_error: OnStoreError,
    pub key_missing: KeyMissing,
}

impl RateLimitSpec {
    pub fn applies_to(&self, aggregation: &str) -> bool {
        self.aggregations
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| &**n == aggregation))
    }
}

/// `"100/s"`: the count and the period it is spread over.
fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let expected =
        || format!("`{text}`: expected calls per period, such as \"100/s\" or \"6000/m\"");
    let (count, unit) = text.split_once('/').ok_or_else(expected)?;
    let count: u32 = count.trim().parse().map_err(|_| expected())?;
    let period = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(expected()),
    };
    if count == 0 {
        return Err(format!("`{text}`: the count must be greater than zero"));
    }
    Ok((count, period))
}

impl Validator<'_> {
    pub(super) fn cache(
        &self,
        source: &str,
        model: Option<&CacheModel>,
    ) -> Result<Option<CacheSpec>, ConfigError> {
        let Some(model) = model else {
            return Ok(None);
        };
        let key = |field: &str| format!("sources.{source}.cache.{field}");
        if model.ttl.is_zero() {
            return Err(self.err(key("ttl"), "must be greater than zero"));
        }
        let windows = [
            ("ttl", Some(model.ttl)),
            ("stale_while_revalidate", model.stale_while_revalidate),
            ("stale_if_error", model.stale_if_error),
        ];
        if let Some((field, _)) = windows
            .iter()
            .find(|(_, d)| d.is_some_and(|d| d > MAX_WINDOW))
        {
            return Err(self.err(key(field), "must be at most 365 days"));
        }
        let max_entries = model.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES);
        if max_entries == 0 || max_entries > MAX_COUNT as u64 {
            return Err(self.err(
                key("max_entries"),
                format!("must be between 1 and {MAX_COUNT}"),
            ));
        }
        // A cached source is bound to the store: a new store is a new source.
        let server = self.raw.get("server");
        for field in ["store", "store_timeout"] {
            let value = server.and_then(|s| s.get(field)).map(|v| v.to_string());
            self.depends_on(value.unwrap_or_default().as_bytes());
        }
        Ok(Some(CacheSpec {
            ttl: model.ttl,
            stale_while_revalidate: model.stale_while_revalidate.unwrap_or_default(),
            stale_if_error: model.stale_if_error.unwrap_or_default(),
            max_entries,
        }))
    }

    pub(super) fn rate_limit(
        &self,
        name: String,
        model: RateLimitModel,
        aggregations: &[super::AggregationSpec],
    ) -> Result<RateLimitSpec, ConfigError> {
        self.name("rate_limits", &name)?;
        let key = |field: &str| format!("rate_limits.{name}.{field}");
        let template =
            StrTemplate::parse(&model.key).map_err(|e| self.err(key("key"), e.to_string()))?;
        if let Some(r) = template.refs().next() {
            return Err(self.err(
                key("key"),
                format!("`{}`: a key is made of params and caller metadata, read before any source runs", r.display),
            ));
        }
        let (count, period) = parse_rate(&model.rate).map_err(|m| self.err(key("rate"), m))?;
        let burst = model.burst.unwrap_or(count);
        if burst == 0 {
            return Err(self.err(key("burst"), "must be greater than zero"));
        }
        let names = model
            .aggregations
            .map(|names| {
                names
                    .into_iter()
                    .map(|n| match aggregations.iter().find(|a| *a.name == n) {
                        Some(a) => Ok(a.name.clone()),
                        None => Err(self.err(
                            key("aggregations"),
                            format!("no aggregation '{n}' is configured"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(RateLimitSpec {
            name: name.as_str().into(),
            key: template,
            interval: period / count,
            burst,
            rate: model.rate.trim().into(),
            aggregations: names,
            on_store_error: model.on_store_error,
            key_missing: model.key_missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_count_per_period() {
        assert_eq!(parse_rate("100/s"), Ok((100, Duration::from_secs(1))));
        assert_eq!(parse_rate("6000/m"), Ok((6000, Duration::from_secs(60))));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("100").is_err());
        assert!(parse_rate("100/d").is_err());
        assert!(parse_rate("-1/s").is_err());
    }
}
