//! A source's response cache (`cache = { ttl, ... }`): successes kept under
//! the hash of the whole rendered request, in this process (moka, bounded
//! by `max_entries`) or in the shared store, never both: with Redis every
//! replica sees the same entries.

mod entry;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use sha2::{Digest, Sha256};

pub use self::entry::{Directive, Entry};
use crate::{
    config::CacheSpec,
    deadline::Deadline,
    store::Store,
    telemetry::metrics::{CacheMetrics, CacheResult},
};

/// Where Redis keys of cached answers live: `aggregator:cache:SOURCE:HASH`,
/// the hash being SHA-256 of the rendered request, in hex.
pub const KEY_PREFIX: &str = "aggregator:cache:";

/// Background refreshes one source runs at once, at most.
const MAX_REFRESHES: usize = 64;

/// A request's identity in the cache.
pub type Key = [u8; 32];

/// A result answered from the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached {
    pub age: Duration,
    /// The upstream's failure it stands in for (`stale_if_error`).
    pub error: Option<String>,
}

/// What the cache holds for a request.
pub enum Lookup {
    /// Fresh: served as it is.
    Fresh(Arc<Entry>, Duration),
    /// Within `stale_while_revalidate`: served, and refreshed once.
    Stale(Arc<Entry>, Duration),
    /// Within `stale_if_error` only: stands in if the upstream fails.
    Fallback(Arc<Entry>, Duration),
    Miss,
}

pub struct ResponseCache {
    spec: CacheSpec,
    /// `aggregator:cache:SOURCE:`.
    prefix: String,
    /// `None` with a shared store.
    memory: Option<moka::sync::Cache<Key, Arc<Entry>>>,
    store: Store,
    /// What the request goes to beyond its own bytes (a gRPC source's
    /// endpoint and method; an HTTP request's URL holds its own), so that
    /// a reload pointing the source elsewhere never serves the old answers.
    upstream: Vec<u8>,
    /// Keys being refreshed in the background, so each gets one refresh.
    refreshing: Arc<Mutex<HashSet<Key>>>,
    metrics: CacheMetrics,
}

/// A claim on a key's one background refresh, released when dropped.
pub struct Refresh {
    key: Key,
    refreshing: Arc<Mutex<HashSet<Key>>>,
}

impl Drop for Refresh {
    fn drop(&mut self) {
        lock(&self.refreshing).remove(&self.key);
    }
}

fn lock(set: &Mutex<HashSet<Key>>) -> std::sync::MutexGuard<'_, HashSet<Key>> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}

impl ResponseCache {
    pub fn new(source: &Arc<str>, spec: CacheSpec, store: &Store, upstream: Vec<u8>) -> Self {
        let memory = (!store.is_shared()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(spec.max_entries)
                .time_to_live(spec.retention(spec.ttl))
                .build()
        });
        Self {
            prefix: format!("{KEY_PREFIX}{source}:"),
            memory,
            store: store.clone(),
            upstream,
            refreshing: Default::default(),
            metrics: store.metrics().cache(source),
            spec,
        }
    }

    /// The key of a request, from its bytes as coalescing sees them.
    pub fn key(&self, request: &[u8]) -> Key {
        let mut hash = Sha256::new();
        hash.update(&self.upstream);
        hash.update(b"\n");
        hash.update(request);
        hash.finalize().into()
    }

    fn redis_key(&self, key: &Key) -> String {
        crate::store::key(&[&self.prefix], key)
    }

    pub fn record(&self, result: CacheResult) {
        self.metrics.record(result);
    }

    /// What is held for `key`; a store that fails is a miss.
    pub async fn lookup(&self, key: &Key, deadline: Deadline) -> Lookup {
        let entry = match &self.memory {
            Some(memory) => memory.get(key),
            None => match self.store.get(&self.redis_key(key), deadline).await {
                Ok(Some(bytes)) => Entry::decode(&bytes).map(Arc::new),
                Ok(None) | Err(_) => None,
            },
        };
        let Some(entry) = entry else {
            return Lookup::Miss;
        };
        let age = entry.age();
        match entry.staleness(age) {
            None => Lookup::Fresh(entry, age),
            Some(s) if s <= self.spec.stale_while_revalidate => Lookup::Stale(entry, age),
            Some(s) if s <= self.spec.stale_if_error => Lookup::Fallback(entry, age),
            Some(_) => Lookup::Miss,
        }
    }

    /// Keeps a success, as long as its upstream allows.
    pub async fn put(
        &self,
        key: &Key,
        value: &serde_json::Value,
        directive: Directive,
        deadline: Deadline,
    ) {
        let Some(ttl) = directive.ttl(self.spec.ttl) else {
            return;
        };
        let entry = Entry::new(value.clone(), ttl);
        match &self.memory {
            Some(memory) => memory.insert(*key, Arc::new(entry)),
            None => {
                let retention = self.spec.retention(ttl);
                // A failure is counted and logged by the store: the next
                // call is a miss, nothing worse.
                let _ = (self.store)
                    .set(&self.redis_key(key), &entry.encode(), retention, deadline)
                    .await;
            }
        }
    }

    /// Claims `key`'s background refresh; `None` if one is running, or if
    /// as many refreshes as a source may run are (the stale entry is then
    /// served without one: a caller sweeping stale keys cannot pile up
    /// tasks).
    pub fn claim_refresh(&self, key: Key) -> Option<Refresh> {
        let mut refreshing = lock(&self.refreshing);
        if refreshing.len() >= MAX_REFRESHES {
            return None;
        }
        refreshing.insert(key).then(|| Refresh {
            key,
            refreshing: self.refreshing.clone(),
        })
    }

    /// Entries held in this process; `None` with a shared store. Applies
    /// pending evictions first (moka applies them in batches): for a
    /// scrape, not the hot path.
    pub fn entries(&self) -> Option<u64> {
        self.memory.as_ref().map(|m| {
            m.run_pending_tasks();
            m.entry_count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_request_to_another_upstream_is_another_entry() {
        let store = Store::memory(Default::default());
        let spec = CacheSpec {
            ttl: Duration::from_secs(1),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            max_entries: 10,
        };
        let cache =
            |upstream: &str| ResponseCache::new(&"s".into(), spec.clone(), &store, upstream.into());
        let (a, b) = (cache("http://a:1/p.S/M"), cache("http://a:1/p.S/N"));
        assert_ne!(a.key(b"{\"id\":1}"), b.key(b"{\"id\":1}"));
        assert_eq!(
            a.key(b"{\"id\":1}"),
            cache("http://a:1/p.S/M").key(b"{\"id\":1}")
        );
        assert_ne!(a.key(b"{\"id\":1}"), a.key(b"{\"id\":2}"));
    }
}
