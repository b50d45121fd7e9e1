//! `aggregator check`: every validation the server runs at startup, without
//! binding, then what a valid config may still get wrong (a timeout that can
//! never apply, retries that cannot fit, a source nobody uses); with
//! `--probe`, whether each upstream answers.

mod probe;
mod report;

use std::{sync::Arc, time::Duration};

use crate::config::{Config, HedgeDelay, SourceKind, SourceSpec};

pub use self::{
    probe::{ProbeRow, probe},
    report::{Options, run},
};

/// Something a valid config probably does not mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub key: String,
    pub message: String,
}

/// What a valid config may still get wrong.
pub fn warnings(config: &Config) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut warn = |key: String, message: String| out.push(Warning { key, message });
    for agg in &config.aggregations {
        if agg.members.iter().all(|(_, optional)| *optional) {
            warn(
                format!("aggregations.{}.optional", agg.name),
                "every source is optional: only min_success can fail a call".into(),
            );
        }
        for (source, _) in &agg.members {
            let key = |field: &str| format!("sources.{}.{field}", source.name);
            if let Some(timeout) = source.timeout.filter(|t| *t > agg.timeout) {
                warn(
                    key("timeout"),
                    format!(
                        "{} is longer than the {} timeout of aggregation '{}': it can never apply there",
                        humantime::format_duration(timeout),
                        humantime::format_duration(agg.timeout),
                        agg.name
                    ),
                );
            }
            if let Some(retry) = &source.retry {
                let budget = source.timeout.map_or(agg.timeout, |t| t.min(agg.timeout));
                let waiting = retry_waits(retry.attempts, retry.backoff, retry.max_backoff);
                if retry.attempts > 1 && waiting >= budget {
                    warn(
                        key("retry"),
                        format!(
                            "{} attempts may wait up to {} between them, more than the {} that aggregation '{}' gives the source: the last ones cannot fit",
                            retry.attempts,
                            humantime::format_duration(waiting),
                            humantime::format_duration(budget),
                            agg.name
                        ),
                    );
                }
            }
        }
    }
    for source in &config.sources {
        let key = |field: &str| format!("sources.{}.{field}", source.name);
        if let (Some(hedge), Some(timeout)) = (&source.hedge, source.timeout) {
            // A p95 delay is never below its `min`.
            let (HedgeDelay::Fixed(delay) | HedgeDelay::P95 { min: delay }) = hedge.delay;
            if delay >= timeout {
                warn(
                    key("hedge"),
                    format!(
                        "the hedge delay {} is not below the source's timeout {}: no hedge is ever sent",
                        humantime::format_duration(delay),
                        humantime::format_duration(timeout)
                    ),
                );
            }
        }
        if source.breaker.is_some() && source.timeout.is_none() {
            warn(
                key("breaker"),
                "the source has no `timeout`: a slow upstream cut by callers' deadlines never counts against its breaker".into(),
            );
        }
    }
    for source in &config.sources {
        if let (Some(_), SourceKind::Http(http)) = (&source.cache, &source.kind) {
            if !matches!(http.method.as_str(), "GET" | "HEAD") {
                warn(
                    format!("sources.{}.cache", source.name),
                    format!(
                        "{} is not a read: within the ttl, an identical call is answered from the cache and never sent",
                        http.method
                    ),
                );
            }
        }
    }
    for source in unused(config) {
        warn(
            format!("sources.{}", source.name),
            "no aggregation uses this source".into(),
        );
    }
    // Aggregations first, in config order; sources by name.
    dedup(&mut out);
    out
}

/// The longest the backoffs between `attempts` requests can add up to
/// (saturating: a config may say anything).
fn retry_waits(attempts: u32, backoff: Duration, max: Duration) -> Duration {
    let wait = |retry: u32| backoff.saturating_mul(1 << (retry - 1).min(20)).min(max);
    let retries = attempts.saturating_sub(1);
    // The backoff doubles for the first 21 retries, then stays the same.
    let doubling = retries.min(21);
    let first = (1..=doubling).fold(Duration::ZERO, |sum, r| sum.saturating_add(wait(r)));
    first.saturating_add(wait(21).saturating_mul(retries - doubling))
}

fn dedup(warnings: &mut Vec<Warning>) {
    let mut seen = std::collections::HashSet::new();
    warnings.retain(|w| seen.insert((w.key.clone(), w.message.clone())));
}

/// Whether a source is used by no aggregation (for callers of [`warnings`]).
pub fn unused(config: &Config) -> Vec<&Arc<SourceSpec>> {
    config
        .sources
        .iter()
        .filter(|s| {
            !config
                .aggregations
                .iter()
                .any(|a| a.members.iter().any(|(m, _)| m.name == s.name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "gw.toml", Path::new(".")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn keys(config: &Config) -> Vec<String> {
        warnings(config).into_iter().map(|w| w.key).collect()
    }

    const SOURCE: &str = "[sources.s]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/s\"\n";

    #[test]
    fn retry_waits_saturate_instead_of_overflowing() {
        let year = Duration::from_secs(365 * 86_400);
        let huge = year.saturating_mul(300_000_000);
        assert_eq!(retry_waits(u32::MAX, huge, huge), Duration::MAX);
        // 1 + 2 + 4 s, then capped at 4 s.
        let s = Duration::from_secs(1);
        assert_eq!(retry_waits(5, s, 4 * s), 11 * s);
        // Past the 21 doublings every wait is the same.
        let ms = Duration::from_millis(1);
        assert_eq!(retry_waits(24, ms, ms), 23 * ms);
        assert_eq!(retry_waits(1, s, s), Duration::ZERO);
    }

    #[test]
    fn a_p95_hedge_whose_min_reaches_the_timeout_is_named() {
        let config = parse(&format!(
            "{SOURCE}timeout = \"1s\"\nhedge = {{ delay = \"p95\", min_delay = \"1s\" }}\n[aggregations.a]\nsources = [\"s\"]\n"
        ));
        assert_eq!(keys(&config), vec!["sources.s.hedge".to_owned()]);
    }

    #[test]
    fn a_cache_on_a_write_is_named() {
        let cached = |method: &str| {
            parse(&format!(
                "{SOURCE}timeout = \"1s\"\nmethod = \"{method}\"\ncache = {{ ttl = \"1s\" }}\n[aggregations.a]\nsources = [\"s\"]\n"
            ))
        };
        assert_eq!(keys(&cached("POST")), vec!["sources.s.cache".to_owned()]);
        assert_eq!(keys(&cached("GET")), Vec::<String>::new());
    }

    #[test]
    fn a_clean_config_has_no_warnings() {
        let config = parse(&format!(
            "{SOURCE}timeout = \"1s\"\n[aggregations.a]\nsources = [\"s\"]\n"
        ));
        assert_eq!(keys(&config), Vec::<String>::new());
    }

    #[test]
    fn each_mistake_is_named_by_its_key() {
        let config = parse(&format!(
            "{SOURCE}timeout = \"5s\"\nretry = {{ attempts = 5, backoff = \"1s\", max_backoff = \"1s\" }}\n\
             hedge = {{ delay = \"5s\" }}\n\
             [sources.b]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/b\"\nbreaker = {{ failures = 3 }}\n\
             [sources.unused]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/u\"\n\
             [aggregations.a]\nsources = [\"s\", \"b\"]\ntimeout = \"2s\"\n\
             [aggregations.all_optional]\nsources = [\"b\"]\noptional = [\"b\"]\n"
        ));
        let keys = keys(&config);
        for expected in [
            "sources.s.timeout",
            "sources.s.retry",
            "sources.s.hedge",
            "sources.b.breaker",
            "sources.unused",
            "aggregations.all_optional.optional",
        ] {
            assert!(
                keys.iter().any(|k| k == expected),
                "no warning for {expected}: {keys:?}"
            );
        }
        assert_eq!(unused(&config).len(), 1);
    }
}
