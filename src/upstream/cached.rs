//! A source's calls through its response cache: a fresh entry answers
//! without a request; a stale one answers while one background refresh
//! runs; past that, the upstream is called and its success kept, and an
//! old entry stands in if it fails (`stale_if_error`).

use std::{sync::Arc, time::Duration};

use super::{Fetched, Prepared, Source};
use crate::{
    cache::{Cached, Entry, Lookup, ResponseCache},
    deadline::Deadline,
    error::SourceError,
    telemetry::metrics::CacheResult,
};

/// A background refresh's budget when the source has no `timeout`.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

impl Source {
    /// Calls the source, through its cache if it has one, sharing the
    /// request with identical calls in flight when it coalesces.
    pub async fn fetch(self: &Arc<Self>, prepared: Prepared, deadline: Deadline) -> Fetched {
        let Some(cache) = &self.cache else {
            let (result, sent, coalesced) = self.fetch_live(prepared, deadline).await;
            return Fetched {
                result: result.map(|a| a.value),
                sent,
                coalesced,
                cached: None,
            };
        };
        // Boxed: the store's futures would otherwise weigh on every call of
        // every source in flight, cached or not.
        Box::pin(self.fetch_cached(cache, prepared, deadline)).await
    }

    async fn fetch_cached(
        self: &Arc<Self>,
        cache: &ResponseCache,
        prepared: Prepared,
        deadline: Deadline,
    ) -> Fetched {
        let key = cache.key(&prepared.key());
        let fallback = match cache.lookup(&key, deadline).await {
            Lookup::Fresh(entry, age) => {
                cache.record(CacheResult::Hit);
                return from_cache(&entry, age, None);
            }
            Lookup::Stale(entry, age) => {
                cache.record(CacheResult::Stale);
                self.refresh(cache, key, &prepared);
                return from_cache(&entry, age, None);
            }
            Lookup::Fallback(entry, age) => Some((entry, age)),
            Lookup::Miss => None,
        };
        let (result, sent, coalesced) = self.fetch_live(prepared, deadline).await;
        let result = match (result, fallback) {
            (Ok(answer), _) => {
                // The caller that started a shared request stores it, once.
                if !coalesced {
                    cache
                        .put(&key, &answer.value, answer.directive, deadline)
                        .await;
                }
                Ok(answer.value)
            }
            (Err(error), Some((entry, age))) if stands_in_for(&error) => {
                cache.record(CacheResult::StaleIfError);
                let error = crate::error::truncate(&error.to_string(), 1024);
                return Fetched {
                    sent,
                    coalesced,
                    ..from_cache(&entry, age, Some(error))
                };
            }
            (Err(error), _) => Err(error),
        };
        cache.record(CacheResult::Miss);
        Fetched {
            result,
            sent,
            coalesced,
            cached: None,
        }
    }

    /// Refreshes `key` on a task of its own, unless a refresh of it is
    /// running: no caller waits for it, and none that leaves cancels it.
    fn refresh(
        self: &Arc<Self>,
        cache: &ResponseCache,
        key: crate::cache::Key,
        prepared: &Prepared,
    ) {
        let Some(claim) = cache.claim_refresh(key) else {
            return;
        };
        let (source, prepared) = (self.clone(), prepared.clone().detached());
        let budget = self.spec.timeout.unwrap_or(REFRESH_TIMEOUT);
        tokio::spawn(async move {
            let _claim = claim;
            let deadline = Deadline::after(budget);
            let (result, _, coalesced) = source.fetch_live(prepared, deadline).await;
            if let (Ok(answer), Some(cache), false) = (result, &source.cache, coalesced) {
                cache
                    .put(&key, &answer.value, answer.directive, deadline)
                    .await;
            }
        });
    }
}

fn from_cache(entry: &Entry, age: Duration, error: Option<String>) -> Fetched {
    Fetched {
        result: Ok(entry.value.clone()),
        sent: 0,
        coalesced: false,
        cached: Some(Cached { age, error }),
    }
}

/// Failures an old entry may stand in for: the upstream's, not the
/// caller's (a request that cannot be built is the caller's to fix).
fn stands_in_for(error: &SourceError) -> bool {
    error.is_upstream_fault()
        || matches!(
            error,
            SourceError::CircuitOpen { .. }
                | SourceError::Overloaded(_)
                | SourceError::NoConnection(_)
                | SourceError::TooLarge(_)
        )
}
