//! A value learned once from an upstream (a method's schema, by server
//! reflection): one lookup in flight at a time, shared by every caller that
//! needs it meanwhile, kept once found, and after a failure not tried again
//! for a second, doubling up to 30 s; callers in between get the last
//! failure at once. An upstream without reflection then costs one RPC per
//! backoff, not one per call.
//!
//! The lookup runs on a task of its own, bounded by [`LOOKUP_TIMEOUT`]:
//! callers that give up (their deadline) only stop waiting, so an upstream
//! whose reflection never answers is asked once per backoff too.

use std::{
    future::Future,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::error::SourceError;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest a lookup may take before it counts as failed.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Lookup<T> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    found: OnceLock<T>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    failures: u32,
    last: Option<(SourceError, Instant)>,
    /// The lookup in flight, if any; changes to true when it is done.
    flight: Option<watch::Receiver<bool>>,
}

impl<T: Send + Sync + 'static> Lookup<T> {
    /// Known from the start (descriptors in the config), or to be looked up.
    pub fn new(known: Option<T>) -> Self {
        let found = OnceLock::new();
        if let Some(value) = known {
            let _ = found.set(value);
        }
        Self {
            inner: Arc::new(Inner {
                found,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The value, if it is known already.
    pub fn get(&self) -> Option<&T> {
        self.inner.found.get()
    }

    /// The value, looking it up with `lookup` unless a lookup is in flight
    /// (then waiting for its outcome) or a failure is too recent.
    pub async fn get_or_lookup<F, Fut>(&self, lookup: F) -> Result<&T, SourceError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, SourceError>> + Send + 'static,
    {
        let mut lookup = Some(lookup);
        loop {
            if let Some(value) = self.inner.found.get() {
                return Ok(value);
            }
            let mut done = {
                let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(value) = self.inner.found.get() {
                    return Ok(value);
                }
                match (&state.flight, &state.last) {
                    (Some(flight), _) => flight.clone(),
                    (None, Some((error, retry_at))) if Instant::now() < *retry_at => {
                        return Err(error.clone());
                    }
                    (None, last) => {
                        let Some(lookup) = lookup.take() else {
                            // Ours has run and failed: its failure stands.
                            let error = last.as_ref().map(|(e, _)| e.clone());
                            return Err(error
                                .unwrap_or_else(|| SourceError::Schema("lookup failed".into())));
                        };
                        let (tx, rx) = watch::channel(false);
                        state.flight = Some(rx.clone());
                        tokio::spawn(run(self.inner.clone(), lookup(), tx));
                        rx
                    }
                }
            };
            // Dropped with the caller (its deadline); the lookup goes on.
            let _ = done.wait_for(|done| *done).await;
        }
    }
}

async fn run<T>(
    inner: Arc<Inner<T>>,
    lookup: impl Future<Output = Result<T, SourceError>>,
    done: watch::Sender<bool>,
) {
    let result = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
        .await
        .unwrap_or_else(|_| {
            Err(SourceError::Schema(format!(
                "the upstream's server reflection did not answer within {LOOKUP_TIMEOUT:?}"
            )))
        });
    let mut state = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    match result {
        Ok(value) => {
            let _ = inner.found.set(value);
            state.last = None;
        }
        Err(error) => {
            state.failures += 1;
            let backoff = FIRST_BACKOFF
                .saturating_mul(1 << (state.failures - 1).min(5))
                .min(MAX_BACKOFF);
            state.last = Some((error, Instant::now() + backoff));
        }
    }
    state.flight = None;
    drop(state);
    let _ = done.send(true);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

    use super::*;

    fn failing(n: &Arc<AtomicU32>) -> impl Future<Output = Result<u32, SourceError>> + use<> {
        let n = n.clone();
        async move {
            n.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err(SourceError::Schema("no reflection".into()))
        }
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
                        .get_or_lookup(|| async move {
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
        let n = Arc::new(AtomicU32::new(0));
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
    async fn callers_that_give_up_do_not_restart_a_lookup_that_never_answers() {
        let lookup: Arc<Lookup<u32>> = Arc::new(Lookup::new(None));
        let n = Arc::new(AtomicU32::new(0));
        for _ in 0..50 {
            let n = n.clone();
            let waiting = lookup.get_or_lookup(|| async move {
                n.fetch_add(1, Relaxed);
                std::future::pending::<Result<u32, SourceError>>().await
            });
            // Each caller's deadline: 100 ms.
            assert!(
                tokio::time::timeout(Duration::from_millis(100), waiting)
                    .await
                    .is_err()
            );
        }
        assert_eq!(n.load(Relaxed), 1, "one lookup, however many gave up");
        // After LOOKUP_TIMEOUT it counts as failed, and is backed off.
        tokio::time::advance(LOOKUP_TIMEOUT).await;
        let error = lookup.get_or_lookup(|| failing(&n)).await.unwrap_err();
        assert!(error.to_string().contains("did not answer"), "{error}");
        assert_eq!(n.load(Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_known_value_is_never_looked_up() {
        let lookup = Lookup::new(Some(3));
        let n = Arc::new(AtomicU32::new(0));
        assert_eq!(
            lookup.get_or_lookup(|| failing(&n)).await.copied().unwrap(),
            3
        );
        assert_eq!(n.load(Relaxed), 0);
    }
}
