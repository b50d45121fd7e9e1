//! A value learned once from an upstream (a method's schema, by server
//! reflection): one lookup in flight at a time, shared by every caller that
//! needs it meanwhile, kept once found, and after a failure not tried again
//! for a second, doubling up to 30 s; callers in between get the last
//! failure at once. An upstream without reflection then costs one RPC per
//! backoff, not one per call.

use std::{future::Future, sync::OnceLock, time::Duration};

use tokio::{sync::Mutex, time::Instant};

use crate::error::SourceError;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Lookup<T> {
    found: OnceLock<T>,
    /// Held for the whole of a lookup: that is what makes it shared.
    failed: Mutex<Failed>,
}

#[derive(Default)]
struct Failed {
    times: u32,
    last: Option<(SourceError, Instant)>,
}

impl<T> Lookup<T> {
    /// Known from the start (descriptors in the config), or to be looked up.
    pub fn new(known: Option<T>) -> Self {
        let found = OnceLock::new();
        if let Some(value) = known {
            let _ = found.set(value);
        }
        Self {
            found,
            failed: Mutex::new(Failed::default()),
        }
    }

    /// The value, if it is known already.
    pub fn get(&self) -> Option<&T> {
        self.found.get()
    }

    /// The value, looking it up with `lookup` unless another caller is doing
    /// so (then waiting for its outcome) or a failure is too recent.
    pub async fn get_or_lookup<F, Fut>(&self, lookup: F) -> Result<&T, SourceError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, SourceError>>,
    {
        if let Some(value) = self.found.get() {
            return Ok(value);
        }
        let mut failed = self.failed.lock().await;
        if let Some(value) = self.found.get() {
            return Ok(value);
        }
        if let Some((error, retry_at)) = &failed.last {
            if Instant::now() < *retry_at {
                return Err(error.clone());
            }
        }
        match lookup().await {
            Ok(value) => Ok(self.found.get_or_init(|| value)),
            Err(error) => {
                failed.times += 1;
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << (failed.times - 1).min(5))
                    .min(MAX_BACKOFF);
                failed.last = Some((error.clone(), Instant::now() + backoff));
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering::Relaxed},
    };

    use super::*;

    async fn failing(n: &AtomicU32) -> Result<u32, SourceError> {
        n.fetch_add(1, Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
        Err(SourceError::Schema("no reflection".into()))
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_lookup() {
        let lookup = Arc::new(Lookup::new(None));
        let n = Arc::new(AtomicU32::new(0));
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let (lookup, n) = (lookup.clone(), n.clone());
                tokio::spawn(async move {
                    lookup
                        .get_or_lookup(|| async {
                            n.fetch_add(1, Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            Ok(7)
                        })
                        .await
                        .copied()
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), 7);
        }
        assert_eq!(n.load(Relaxed), 1);
        assert_eq!(lookup.get(), Some(&7));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_from_one_second_doubling_to_thirty() {
        let lookup: Lookup<u32> = Lookup::new(None);
        let n = AtomicU32::new(0);
        assert!(lookup.get_or_lookup(|| failing(&n)).await.is_err());
        // Within the backoff: the same failure, no lookup.
        for _ in 0..100 {
            assert!(lookup.get_or_lookup(|| failing(&n)).await.is_err());
        }
        assert_eq!(n.load(Relaxed), 1);
        let mut expected = 1;
        for backoff in [1, 2, 4, 8, 16, 30, 30] {
            tokio::time::advance(Duration::from_millis(backoff * 1000 - 20)).await;
            assert!(lookup.get_or_lookup(|| failing(&n)).await.is_err());
            assert_eq!(n.load(Relaxed), expected, "before {backoff} s");
            tokio::time::advance(Duration::from_millis(20)).await;
            assert!(lookup.get_or_lookup(|| failing(&n)).await.is_err());
            expected += 1;
            assert_eq!(n.load(Relaxed), expected, "after {backoff} s");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_known_value_is_never_looked_up() {
        let lookup = Lookup::new(Some(3));
        let n = AtomicU32::new(0);
        assert_eq!(
            lookup.get_or_lookup(|| failing(&n)).await.copied().unwrap(),
            3
        );
        assert_eq!(n.load(Relaxed), 0);
    }
}
