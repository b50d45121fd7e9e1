//! `[rate_limits.NAME]`: calls per caller key, checked before any upstream
//! is called. The GCRA keeps one timestamp per key: in this process
//! (`governor`), or in the store, where one script makes each decision
//! atomically, so that a limit holds for every replica together.

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _};
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};

use crate::{
    config::{KeyMissing, OnStoreError, RateLimitSpec},
    deadline::Deadline,
    error::Error,
    store::{Gcra, Store},
    template::Inputs,
};

/// Where Redis keys of rate limits live: `aggregator:ratelimit:NAME:HASH`,
/// the hash being SHA-256 of the rendered key, in hex.
pub const KEY_PREFIX: &str = "aggregator:ratelimit:";

/// Decisions between sweeps of the memory store's idle buckets.
const SWEEP_EVERY: u64 = 1024;

/// Every limit of a config.
#[derive(Default)]
pub struct RateLimits {
    limits: Vec<Arc<Limit>>,
}

pub struct Limit {
    spec: RateLimitSpec,
    /// Used when the store is memory. Keys are hashes: whatever a caller
    /// sends, a bucket costs the same.
    /// Shared with the limit a reload replaces, when the buckets mean the
    /// same (same name, key, rate and burst).
    memory: Arc<DefaultKeyedRateLimiter<[u8; 32]>>,
    decisions: AtomicU64,
    store: Store,
    refused: Counter,
}

impl RateLimits {
    /// The limits of `specs`, keeping from `previous` those that did not
    /// change (their buckets go on).
    pub fn new(specs: &[RateLimitSpec], store: &Store, previous: Option<&RateLimits>) -> Self {
        let limits = specs
            .iter()
            .map(|spec| {
                // The buckets go on; everything else is the new spec's.
                let buckets = previous.and_then(|p| {
                    p.limits
                        .iter()
                        .find(|l| same(&l.spec, spec) && l.store.same(store))
                        .map(|l| l.memory.clone())
                });
                Arc::new(Limit::new(spec.clone(), store, buckets))
            })
            .collect();
        Self { limits }
    }

    /// Counts the call against every limit on `aggregation`; the first it
    /// is over refuses it.
    pub async fn check(
        &self,
        aggregation: &str,
        inputs: &Inputs<'_>,
        deadline: Deadline,
    ) -> Result<(), Error> {
        for limit in &self.limits {
            if limit.spec.applies_to(aggregation) {
                limit.check(inputs, deadline).await?;
            }
        }
        Ok(())
    }
}

fn same(a: &RateLimitSpec, b: &RateLimitSpec) -> bool {
    a.name == b.name && a.key == b.key && a.interval == b.interval && a.burst == b.burst
}

impl Limit {
    fn new(
        spec: RateLimitSpec,
        store: &Store,
        buckets: Option<Arc<DefaultKeyedRateLimiter<[u8; 32]>>>,
    ) -> Self {
        let burst = NonZeroU32::new(spec.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(spec.interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Self {
            memory: buckets.unwrap_or_else(|| Arc::new(RateLimiter::keyed(quota))),
            decisions: AtomicU64::new(0),
            refused: store.metrics().rate_limited(&spec.name),
            store: store.clone(),
            spec,
        }
    }

    async fn check(&self, inputs: &Inputs<'_>, deadline: Deadline) -> Result<(), Error> {
        let spec = &self.spec;
        let mut hasher = Sha256::new();
        match spec.key.render_with(inputs) {
            Ok(key) => {
                hasher.update(b"k");
                hasher.update(key.as_bytes());
            }
            // Every caller without a key shares one bucket, which no
            // rendered key can reach.
            Err(_) if spec.key_missing == KeyMissing::Shared => hasher.update(b"m"),
            Err(error) => {
                return Err(Error::RateLimitKey {
                    limit: spec.name.clone(),
                    error,
                });
            }
        }
        let hash: [u8; 32] = hasher.finalize().into();
        let gcra = Gcra {
            interval: spec.interval,
            burst: spec.burst,
        };
        let decision = if !self.store.is_shared() {
            self.decide_here(&hash)
        } else {
            let key = crate::store::key(&[KEY_PREFIX, &spec.name, ":"], &hash);
            match self.store.gcra(&key, gcra, deadline).await {
                Ok(decision) => decision,
                Err(_) => match spec.on_store_error {
                    OnStoreError::Allow => Ok(()),
                    OnStoreError::Deny => {
                        self.refused.inc();
                        return Err(Error::RateLimitUnchecked {
                            limit: spec.name.clone(),
                        });
                    }
                },
            }
        };
        decision.map_err(|retry_after| {
            self.refused.inc();
            Error::RateLimited {
                limit: spec.name.clone(),
                rate: spec.rate.clone(),
                burst: spec.burst,
                retry_after,
            }
        })
    }

    /// The memory store's decision; now and then drops the buckets that
    /// have refilled, so idle keys cost nothing.
    fn decide_here(&self, hash: &[u8; 32]) -> Result<(), Duration> {
        if self.decisions.fetch_add(1, Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.memory.retain_recent();
        }
        self.memory
            .check_key(hash)
            .map_err(|not_until| not_until.wait_time_from(self.memory.clock().now()))
    }
}
