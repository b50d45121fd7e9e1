//! Where caches and rate limits keep their state: this process, or a Redis
//! that every replica shares (`[server] store`).
//!
//! Every Redis operation gets `[server] store_timeout`, never past the
//! call's deadline. A failure or a timeout is counted and logged at a
//! bounded rate, and the caller decides what it means (a cache miss; for a
//! rate limit, its `on_store_error`): a dead Redis never fails a call by
//! itself, nor holds one up past that budget.

mod redis;
mod throttle;

use std::{sync::Arc, time::Duration};

use crate::{deadline::Deadline, telemetry::metrics::StoreMetrics};

pub use self::redis::Gcra;
use self::{redis::Redis, throttle::Throttle};

/// The store of a gateway; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Option<Redis>,
    /// As configured, to tell whether a reload may keep this store.
    url: Option<String>,
    timeout: Duration,
    metrics: StoreMetrics,
    /// One per operation, so that one failing op cannot hide another's.
    logs: [Throttle; 3],
}

/// The store operations, as `aggregator_store_errors_total{op}` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
    RateLimit,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Set => "set",
            Self::RateLimit => "rate_limit",
        }
    }
}

/// A store operation that did not complete in its budget or failed.
#[derive(Debug, Clone, Copy)]
pub struct StoreError;

impl Store {
    /// State in this process only.
    pub fn memory(metrics: StoreMetrics) -> Self {
        Self::build(None, None, Duration::MAX, metrics)
    }

    /// The store `url` names (Redis), or memory without one. Connects
    /// lazily, and reconnects by itself whenever the connection is lost.
    pub fn open(
        url: Option<&str>,
        timeout: Duration,
        metrics: StoreMetrics,
    ) -> Result<Self, ::redis::RedisError> {
        let redis = url.map(Redis::connect).transpose()?;
        Ok(Self::build(redis, url.map(str::to_owned), timeout, metrics))
    }

    fn build(
        redis: Option<Redis>,
        url: Option<String>,
        timeout: Duration,
        metrics: StoreMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                url,
                timeout,
                metrics,
                logs: Default::default(),
            }),
        }
    }

    /// Whether it is the store that `url` and `timeout` configure.
    pub fn is(&self, url: Option<&str>, timeout: Duration) -> bool {
        self.inner.url.as_deref() == url && (url.is_none() || self.inner.timeout == timeout)
    }

    /// Whether it is the very same store (a reload kept it).
    pub fn same(&self, other: &Store) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether state lives in Redis rather than in this process.
    pub fn is_shared(&self) -> bool {
        self.inner.redis.is_some()
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    /// The value at `key`; `Ok(None)` when there is none.
    pub async fn get(&self, key: &str, deadline: Deadline) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(redis) = &self.inner.redis else {
            return Ok(None);
        };
        self.within(Op::Get, deadline, redis.get(key)).await
    }

    /// Sets `key` to `value` for `ttl`.
    pub async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<(), StoreError> {
        let Some(redis) = &self.inner.redis else {
            return Ok(());
        };
        self.within(Op::Set, deadline, redis.set(key, value, ttl))
            .await
    }

    /// One GCRA decision for the bucket at `key`, made atomically in Redis:
    /// `Err(wait)` when over the limit. A memory store keeps no buckets (a
    /// limit keeps its own): it lets everything through.
    pub async fn gcra(
        &self,
        key: &str,
        gcra: Gcra,
        deadline: Deadline,
    ) -> Result<Result<(), Duration>, StoreError> {
        let Some(redis) = &self.inner.redis else {
            return Ok(Ok(()));
        };
        self.within(Op::RateLimit, deadline, redis.gcra(key, gcra))
            .await
    }

    /// Runs `op` within the store's budget, counting and logging a failure.
    async fn within<T>(
        &self,
        op: Op,
        deadline: Deadline,
        future: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let budget = self.inner.timeout.min(deadline.remaining());
        let error = match tokio::time::timeout(budget, future).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {budget:?} (store_timeout)"),
        };
        self.inner.metrics.store_error("redis", op.name());
        if let Some(suppressed) = self.inner.logs[op as usize].admit() {
            tracing::warn!(
                op = op.name(),
                error = %crate::error::truncate(&error, 512),
                suppressed,
                "store operation failed: caches miss, rate limits follow on_store_error"
            );
        }
        Err(StoreError)
    }
}

/// A Redis key: `parts`, then `hash` in hex.
pub fn key(parts: &[&str], hash: &[u8; 32]) -> String {
    use std::fmt::Write as _;
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = String::with_capacity(len + 64);
    parts.iter().for_each(|p| out.push_str(p));
    for b in hash {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}
