//! Request coalescing (singleflight): concurrent identical upstream calls
//! share one request.
//!
//! The caller that starts a call drives it itself, on its own task, so a
//! call that nobody joins costs no task, no channel message and no copy of
//! its answer. Unlike Go's singleflight, that caller may leave (cancel, or
//! reach its deadline) without failing the others: if anyone is waiting,
//! the call is handed to a task of its own and goes on; it is aborted only
//! when its last waiter has left. It carries the deadline of the caller that
//! started it; when it ends in DEADLINE_EXCEEDED, waiters with time left
//! start a fresh one under their own budget rather than inherit an expiry
//! that is not theirs. Nothing is kept once a call completes.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
};

use tokio::{sync::watch, task::AbortHandle};

use crate::{deadline::Deadline, error::SourceError, upstream::Answer};

/// What a shared call produced: its result and the requests it sent.
pub type Shared = (Result<Answer, SourceError>, u32);

/// The flights of one source, keyed by the fully rendered request.
#[derive(Default)]
pub struct Coalescer {
    flights: Arc<Flights>,
    next_id: AtomicU64,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    coalesced: AtomicU64,
    peak_waiters: AtomicUsize,
}

/// A snapshot of a coalescer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Shared calls started (each sent its request upstream).
    pub calls: u64,
    /// Callers that joined a call already in flight.
    pub coalesced: u64,
    /// Keys with a call in flight now.
    pub in_flight: usize,
    /// The most callers that ever waited on one call.
    pub peak_waiters: usize,
}

struct Flight {
    id: u64,
    deadline: Deadline,
    result: watch::Receiver<Option<Shared>>,
    /// The starter and its joiners. Changed under the map's lock only, so
    /// joining, leaving and handing off are ordered.
    waiters: AtomicUsize,
    /// Set (under the map's lock) once the starter has left and the call
    /// runs on a task of its own.
    task: Mutex<Option<AbortHandle>>,
}

/// A joiner's place on a flight; leaving (drop) may abort it.
struct Waiter<'a> {
    coalescer: &'a Coalescer,
    key: &'a [u8],
    flight: Arc<Flight>,
}

/// The starter's place: it owns the call and polls it.
struct Starter<'a> {
    coalescer: &'a Coalescer,
    key: &'a [u8],
    flight: Arc<Flight>,
    /// Taken when it completes, or when it is handed off.
    call: Option<Pin<Box<dyn Future<Output = Shared> + Send>>>,
    tx: Option<watch::Sender<Option<Shared>>>,
}

/// How a caller got its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It started the shared call.
    Started,
    /// It joined one already in flight.
    Joined,
}

impl Coalescer {
    /// Answers with the shared call for `key`, starting it with `start`
    /// under `deadline` when none is in flight.
    pub async fn call<F, Fut>(&self, key: &[u8], deadline: Deadline, start: F) -> (Shared, Role)
    where
        F: FnOnce(Deadline) -> Fut,
        Fut: Future<Output = Shared> + Send + 'static,
    {
        let mut start = Some(start);
        loop {
            let (flight, tx) = self.join(key, deadline);
            let Some(tx) = tx else {
                let flight_deadline = flight.deadline;
                let waiter = Waiter {
                    coalescer: self,
                    key,
                    flight,
                };
                let shared = waiter.wait().await;
                // The call expired on its starter's budget, not ours: go again.
                if matches!(shared.0, Err(SourceError::Timeout(_)))
                    && flight_deadline < deadline
                    && !deadline.is_expired()
                {
                    continue;
                }
                return (shared, Role::Joined);
            };
            let budget = deadline.remaining();
            let mut starter = Starter {
                coalescer: self,
                key,
                flight,
                call: None,
                tx: Some(tx),
            };
            // Only a flight of our own deadline is started, and its answer
            // is returned: a caller starts at most one call.
            let shared = match start.take() {
                Some(start) => {
                    let call = start(deadline);
                    // The deadline bounds the shared call whatever the source does.
                    let call = starter.call.insert(Box::pin(async move {
                        tokio::time::timeout_at(deadline.instant(), call)
                            .await
                            .unwrap_or((Err(SourceError::Timeout(budget)), 0))
                    }));
                    let shared = call.await;
                    starter.call = None;
                    shared
                }
                None => (Err(SourceError::Timeout(budget)), 0),
            };
            return (starter.finish(shared), Role::Started);
        }
    }

    /// Joins the flight in flight for `key`, or registers a new one, whose
    /// sender is returned: the caller is to start it.
    fn join(
        &self,
        key: &[u8],
        deadline: Deadline,
    ) -> (Arc<Flight>, Option<watch::Sender<Option<Shared>>>) {
        let mut flights = self.flights.lock().expect("coalescer lock");
        if let Some(flight) = flights.get(key) {
            let waiters = flight.waiters.fetch_add(1, Relaxed) + 1;
            self.stats.coalesced.fetch_add(1, Relaxed);
            self.stats.peak_waiters.fetch_max(waiters, Relaxed);
            return (flight.clone(), None);
        }
        let (tx, rx) = watch::channel(None);
        let flight = Arc::new(Flight {
            id: self.next_id.fetch_add(1, Relaxed),
            deadline,
            result: rx,
            waiters: AtomicUsize::new(1),
            task: Mutex::new(None),
        });
        flights.insert(key.into(), flight.clone());
        self.stats.calls.fetch_add(1, Relaxed);
        self.stats.peak_waiters.fetch_max(1, Relaxed);
        (flight, Some(tx))
    }

    pub fn stats(&self) -> Stats {
        Stats {
            calls: self.stats.calls.load(Relaxed),
            coalesced: self.stats.coalesced.load(Relaxed),
            in_flight: self.flights.lock().expect("coalescer lock").len(),
            peak_waiters: self.stats.peak_waiters.load(Relaxed),
        }
    }
}

type Flights = Mutex<HashMap<Box<[u8]>, Arc<Flight>>>;

/// Forgets flight `id` if it is still the one in flight for `key`.
fn remove(flights: &mut HashMap<Box<[u8]>, Arc<Flight>>, key: &[u8], id: u64) {
    if flights.get(key).is_some_and(|f| f.id == id) {
        flights.remove(key);
    }
}

impl Starter<'_> {
    /// The starter's own answer; joiners get a copy only if there are any.
    fn finish(&mut self, shared: Shared) -> Shared {
        let mut flights = self.coalescer.flights.lock().expect("coalescer lock");
        // Forget the flight before answering: nothing is kept, and a caller
        // arriving from now on starts a fresh call.
        remove(&mut flights, self.key, self.flight.id);
        let joined = self.flight.waiters.load(Relaxed) > 1;
        if let Some(tx) = self.tx.take()
            && joined
        {
            let _ = tx.send(Some(shared.clone()));
        }
        shared
    }
}

impl Drop for Starter<'_> {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        // The starter left before the answer.
        let mut flights = self.coalescer.flights.lock().expect("coalescer lock");
        let left = self.flight.waiters.fetch_sub(1, Relaxed) - 1;
        if left == 0 {
            // Nobody else wants it: dropping the call aborts it.
            remove(&mut flights, self.key, self.flight.id);
            return;
        }
        // Others wait: the call goes on without us, on its own task.
        let (map, key, id) = (
            self.coalescer.flights.clone(),
            Box::<[u8]>::from(self.key),
            self.flight.id,
        );
        let tx = self.tx.take();
        // Outside a runtime (it is shutting down) nothing can run it on.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = runtime.spawn(async move {
            let shared = call.await;
            remove(&mut map.lock().expect("coalescer lock"), &key, id);
            if let Some(tx) = tx {
                let _ = tx.send(Some(shared));
            }
        });
        *self.flight.task.lock().expect("coalescer lock") = Some(task.abort_handle());
    }
}

impl Waiter<'_> {
    async fn wait(self) -> Shared {
        let mut result = self.flight.result.clone();
        match result.wait_for(Option::is_some).await {
            Ok(value) => match value.clone() {
                Some(shared) => shared,
                None => (Err(SourceError::Decode("the shared call failed".into())), 0),
            },
            // The call ended without an answer: its task panicked.
            Err(_) => (Err(SourceError::Decode("the shared call failed".into())), 0),
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Under the lock, so nobody joins a flight that is being aborted.
        let mut flights = self.coalescer.flights.lock().expect("coalescer lock");
        let left = self.flight.waiters.fetch_sub(1, Relaxed) - 1;
        let answered = self.flight.result.borrow().is_some();
        if left == 0 && !answered {
            // The last caller left before the answer: nobody wants it. The
            // starter is gone too (it counts as a waiter), so the call runs
            // on its task.
            if let Some(task) = self.flight.task.lock().expect("coalescer lock").take() {
                task.abort();
            }
            remove(&mut flights, self.key, self.flight.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicU32, time::Duration};

    use tokio::time::{Instant, sleep};

    use super::*;

    /// Counts starts and aborted calls; each call sleeps `delay` then answers
    /// with its start number.
    #[derive(Clone, Default)]
    struct Upstream {
        starts: Arc<AtomicU32>,
        aborted: Arc<AtomicU32>,
    }

    struct AbortGuard(Arc<AtomicU32>, bool);

    impl AbortGuard {
        fn finish(&mut self) {
            self.1 = true;
        }
    }

    impl Drop for AbortGuard {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Relaxed);
            }
        }
    }

    impl Upstream {
        fn start(
            &self,
            delay: Duration,
        ) -> impl Fn(Deadline) -> std::pin::Pin<Box<dyn Future<Output = Shared> + Send>> + Clone + use<>
        {
            let this = self.clone();
            move |_deadline| {
                let n = this.starts.fetch_add(1, Relaxed) + 1;
                let mut guard = AbortGuard(this.aborted.clone(), false);
                Box::pin(async move {
                    sleep(delay).await;
                    guard.finish();
                    (Ok(serde_json::json!(n).into()), 1)
                })
            }
        }
    }

    fn after(ms: u64) -> Deadline {
        Deadline::after(Duration::from_millis(ms))
    }

    #[tokio::test(start_paused = true)]
    async fn identical_concurrent_calls_share_one_request() {
        let c = Arc::new(Coalescer::default());
        let up = Upstream::default();
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let (c, start) = (c.clone(), up.start(Duration::from_millis(100)));
                tokio::spawn(async move { c.call(b"k", after(1_000), start).await })
            })
            .collect();
        let mut roles = Vec::new();
        for call in calls {
            let ((result, sent), role) = call.await.unwrap();
            assert_eq!(result.unwrap().value, serde_json::json!(1));
            assert_eq!(sent, 1);
            roles.push(role);
        }
        assert_eq!(roles.iter().filter(|r| **r == Role::Started).count(), 1);
        assert_eq!(up.starts.load(Relaxed), 1);
        assert_eq!(
            c.stats(),
            Stats {
                calls: 1,
                coalesced: 9,
                in_flight: 0,
                peak_waiters: 10
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_nobody_joins_runs_on_its_callers_task_and_hands_off_when_joined() {
        let c = Arc::new(Coalescer::default());
        let ran_on = Arc::new(Mutex::new(Vec::new()));
        let start = |ran_on: Arc<Mutex<Vec<_>>>| {
            move |_| async move {
                sleep(Duration::from_millis(100)).await;
                ran_on.lock().unwrap().push(tokio::task::try_id());
                (Ok(serde_json::json!(1).into()), 1)
            }
        };
        let caller = tokio::spawn({
            let (c, start) = (c.clone(), start(ran_on.clone()));
            async move {
                let id = tokio::task::try_id();
                (c.call(b"k", after(1_000), start).await, id)
            }
        });
        let ((_, role), caller_id) = caller.await.unwrap();
        assert_eq!(role, Role::Started);
        assert_eq!(ran_on.lock().unwrap().as_slice(), &[caller_id]);
        // Joined, then left: the call moves to a task of its own.
        ran_on.lock().unwrap().clear();
        let starter = tokio::spawn({
            let (c, start) = (c.clone(), start(ran_on.clone()));
            async move { c.call(b"k", after(1_000), start).await }
        });
        sleep(Duration::from_millis(1)).await;
        let joiner = tokio::spawn({
            let (c, start) = (c.clone(), start(ran_on.clone()));
            async move { c.call(b"k", after(1_000), start).await }
        });
        sleep(Duration::from_millis(1)).await;
        let starter_id = starter.id();
        starter.abort();
        let (_, role) = joiner.await.unwrap();
        assert_eq!(role, Role::Joined);
        let ran = ran_on.lock().unwrap().clone();
        assert_eq!(ran.len(), 1, "one request for both");
        assert!(ran[0].is_some_and(|id| id != starter_id), "{ran:?}");
        assert_eq!(c.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn different_keys_do_not_share_and_nothing_is_kept_after_completion() {
        let c = Coalescer::default();
        let up = Upstream::default();
        let start = up.start(Duration::from_millis(10));
        let (a, b) = tokio::join!(
            c.call(b"a", after(1_000), &start),
            c.call(b"b", after(1_000), &start)
        );
        assert_eq!((a.1, b.1), (Role::Started, Role::Started));
        let (again, role) = c.call(b"a", after(1_000), &start).await;
        assert_eq!(role, Role::Started, "a completed call is not reused");
        assert_eq!(again.0.unwrap().value, serde_json::json!(3));
        assert_eq!(c.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_does_not_fail_the_others() {
        let c = Arc::new(Coalescer::default());
        let up = Upstream::default();
        let start = up.start(Duration::from_millis(100));
        // The starter is cancelled after 20 ms...
        let starter = tokio::spawn({
            let (c, start) = (c.clone(), start.clone());
            async move { c.call(b"k", after(500), start).await }
        });
        sleep(Duration::from_millis(1)).await;
        let other = tokio::spawn({
            let c = c.clone();
            async move { c.call(b"k", after(1_000), start).await }
        });
        sleep(Duration::from_millis(20)).await;
        starter.abort();
        // ...and the other still gets the one shared answer.
        let ((result, _), role) = other.await.unwrap();
        assert_eq!(result.unwrap().value, serde_json::json!(1));
        assert_eq!(role, Role::Joined);
        assert_eq!(up.starts.load(Relaxed), 1);
        assert_eq!(up.aborted.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_call_is_aborted_when_its_last_caller_leaves() {
        let c = Arc::new(Coalescer::default());
        let up = Upstream::default();
        let callers: Vec<_> = (0..3)
            .map(|_| {
                let (c, start) = (c.clone(), up.start(Duration::from_secs(10)));
                tokio::spawn(async move { c.call(b"k", after(60_000), start).await })
            })
            .collect();
        sleep(Duration::from_millis(10)).await;
        for (i, caller) in callers.iter().enumerate() {
            caller.abort();
            sleep(Duration::from_millis(1)).await;
            let expected = u32::from(i == 2);
            assert_eq!(up.aborted.load(Relaxed), expected, "after {} left", i + 1);
        }
        assert_eq!(c.stats().in_flight, 0);
        // The next caller starts afresh.
        let start = up.start(Duration::from_millis(1));
        let (_, role) = c.call(b"k", after(1_000), start).await;
        assert_eq!(role, Role::Started);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_with_time_left_rerun_a_call_that_expired_on_its_starters_budget() {
        let c = Arc::new(Coalescer::default());
        let up = Upstream::default();
        let start = up.start(Duration::from_millis(100));
        let t0 = Instant::now();
        let short = tokio::spawn({
            let (c, start) = (c.clone(), start.clone());
            async move { c.call(b"k", after(50), start).await }
        });
        sleep(Duration::from_millis(1)).await;
        let long = tokio::spawn({
            let c = c.clone();
            async move { (c.call(b"k", after(1_000), start).await, t0.elapsed()) }
        });
        let ((result, _), _) = short.await.unwrap();
        assert!(matches!(result, Err(SourceError::Timeout(_))), "{result:?}");
        let (((result, _), _), elapsed) = long.await.unwrap();
        assert_eq!(
            result.unwrap().value,
            serde_json::json!(2),
            "a fresh call answered"
        );
        assert_eq!(elapsed, Duration::from_millis(150));
        assert_eq!(up.starts.load(Relaxed), 2);
    }
}
