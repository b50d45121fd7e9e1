//! The families of caches, rate limits and their store.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    source: Arc<str>,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: Arc<str>,
}

#[derive(Clone, Default)]
pub struct StoreMetrics {
    cache_requests: Family<CacheLabels, Counter>,
    store_errors: Family<StoreLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
}

/// How a cached source's call was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    /// Served stale while one refresh runs.
    Stale,
    /// Served stale in place of a failed upstream call.
    StaleIfError,
}

impl CacheResult {
    const ALL: [Self; 4] = [Self::Hit, Self::Miss, Self::Stale, Self::StaleIfError];

    fn name(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::StaleIfError => "stale_if_error",
        }
    }
}

/// One cached source's counters, by result.
#[derive(Clone)]
pub struct CacheMetrics([Counter; 4]);

impl CacheMetrics {
    pub fn record(&self, result: CacheResult) {
        self.0[result as usize].inc();
    }
}

impl StoreMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "aggregator_cache_requests",
            "Calls of a cached source, by how the cache answered.",
            self.cache_requests.clone(),
        );
        registry.register(
            "aggregator_store_errors",
            "Store operations that failed or ran out of store_timeout, by store and operation.",
            self.store_errors.clone(),
        );
        registry.register(
            "aggregator_rate_limited",
            "Calls refused by a rate limit.",
            self.rate_limited.clone(),
        );
    }

    /// The counters of `source`'s cache; every result shows from the start.
    pub fn cache(&self, source: &Arc<str>) -> CacheMetrics {
        CacheMetrics(CacheResult::ALL.map(|result| {
            self.cache_requests
                .get_or_create(&CacheLabels {
                    source: source.clone(),
                    result: result.name(),
                })
                .clone()
        }))
    }

    pub fn rate_limited(&self, limit: &Arc<str>) -> Counter {
        self.rate_limited
            .get_or_create(&LimitLabels {
                limit: limit.clone(),
            })
            .clone()
    }

    /// Rare (the store is failing), so looked up each time.
    pub fn store_error(&self, store: &'static str, op: &'static str) {
        self.store_errors
            .get_or_create(&StoreLabels { store, op })
            .inc();
    }
}
