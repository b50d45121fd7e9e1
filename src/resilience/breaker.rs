//! Circuit breaker per source. Closed, it counts outcomes; after
//! `failures` consecutive failures, or a failure ratio over a rolling window,
//! it opens: calls fail at once instead of waiting on a dead upstream. After
//! a cool-down (doubling each time a probe fails, up to a cap) it half-opens
//! and admits one probe: success closes it, failure opens it again.
//! Active health checks feed the same state.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::config::BreakerSpec;

/// Buckets of the rolling window.
const BUCKETS: usize = 10;

pub struct Breaker {
    /// The source's name, for the log.
    name: Arc<str>,
    spec: BreakerSpec,
    state: Mutex<Inner>,
    /// Whether the breaker is open, for whoever reports health.
    open: watch::Sender<bool>,
}

struct Inner {
    state: State,
    /// Failures in a row while closed.
    consecutive: u32,
    window: Window,
    /// The next cool-down; doubles while probes fail.
    cool_down: Duration,
    /// Opened by a failed health check (which a passing one may undo).
    by_health: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// Open's cool-down is over; one probe may be in flight.
    HalfOpen {
        probing: bool,
    },
}

/// Refusal: the circuit is open; the next probe is allowed in `retry_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    pub retry_in: Duration,
}

/// An admitted call; report its outcome with [`Breaker::record`]. Dropped
/// unreported (the caller went away), it frees the probe slot.
#[must_use]
pub struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Breaker {
    pub fn new(name: Arc<str>, spec: BreakerSpec) -> Self {
        Self {
            name,
            state: Mutex::new(Inner {
                state: State::Closed,
                consecutive: 0,
                window: Window::new(spec.window),
                cool_down: spec.cool_down,
                by_health: false,
            }),
            spec,
            open: watch::Sender::new(false),
        }
    }

    /// Lets a call through, or refuses it while the circuit is open.
    pub fn admit(&self) -> Result<Admission<'_>, Open> {
        let mut inner = self.state.lock().expect("breaker lock");
        let now = Instant::now();
        let probe = match inner.state {
            State::Closed => false,
            State::Open { until } if now < until => {
                return Err(Open {
                    retry_in: until - now,
                });
            }
            State::Open { .. } | State::HalfOpen { probing: false } => {
                inner.state = State::HalfOpen { probing: true };
                true
            }
            State::HalfOpen { probing: true } => {
                // Until the probe answers, nothing else goes through.
                return Err(Open {
                    retry_in: Duration::ZERO,
                });
            }
        };
        Ok(Admission {
            breaker: self,
            probe,
            reported: false,
        })
    }

    /// Records an admitted call's outcome.
    pub fn record(&self, mut admission: Admission<'_>, success: bool) {
        admission.reported = true;
        self.outcome(success, admission.probe);
    }

    /// An active health check's verdict: a failure opens the circuit at
    /// once; a success closes a circuit that a failed check opened (one
    /// opened by failing calls waits for a probe call: the health endpoint
    /// may be fine while the real one is not).
    pub fn health(&self, healthy: bool) {
        let mut inner = self.state.lock().expect("breaker lock");
        match (healthy, inner.state) {
            (true, State::Closed) => {}
            (true, _) if inner.by_health => self.close(&mut inner),
            (true, _) => {}
            (false, State::Open { .. }) => {}
            (false, _) => {
                self.trip(&mut inner);
                inner.by_health = true;
            }
        }
    }

    /// Open-state changes, for health reporting.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.open.subscribe()
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    fn outcome(&self, success: bool, probe: bool) {
        let mut inner = self.state.lock().expect("breaker lock");
        let now = Instant::now();
        match inner.state {
            State::HalfOpen { .. } if probe => {
                if success {
                    self.close(&mut inner);
                } else {
                    // The upstream is still down: wait longer next time.
                    inner.cool_down = (inner.cool_down * 2).min(self.spec.max_cool_down);
                    self.trip(&mut inner);
                }
            }
            State::Closed => {
                inner.window.add(now, success);
                if success {
                    inner.consecutive = 0;
                    return;
                }
                inner.consecutive += 1;
                let (calls, failures) = inner.window.counts(now);
                let by_ratio = self.spec.failure_ratio.is_some_and(|ratio| {
                    calls >= self.spec.min_calls && failures as f64 >= ratio * calls as f64
                });
                if inner.consecutive >= self.spec.failures || by_ratio {
                    self.trip(&mut inner);
                }
            }
            // A call admitted before the circuit opened: already decided.
            State::Open { .. } | State::HalfOpen { .. } => {}
        }
    }

    fn trip(&self, inner: &mut Inner) {
        inner.state = State::Open {
            until: Instant::now() + inner.cool_down,
        };
        inner.by_health = false;
        if !self.open.send_replace(true) {
            tracing::warn!(source = %self.name, cool_down = ?inner.cool_down, "circuit opened");
        }
    }

    fn close(&self, inner: &mut Inner) {
        inner.state = State::Closed;
        inner.consecutive = 0;
        inner.window = Window::new(self.spec.window);
        inner.cool_down = self.spec.cool_down;
        if self.open.send_replace(false) {
            tracing::info!(source = %self.name, "circuit closed");
        }
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            let mut inner = self.breaker.state.lock().expect("breaker lock");
            if inner.state == (State::HalfOpen { probing: true }) {
                inner.state = State::HalfOpen { probing: false };
            }
        }
    }
}

/// Call and failure counts over the last `span`, in `BUCKETS` buckets.
struct Window {
    bucket: Duration,
    /// (bucket start, calls, failures), oldest first.
    buckets: [(Option<Instant>, u32, u32); BUCKETS],
}

impl Window {
    fn new(span: Duration) -> Self {
        Self {
            bucket: (span / BUCKETS as u32).max(Duration::from_millis(1)),
            buckets: [(None, 0, 0); BUCKETS],
        }
    }

    fn add(&mut self, now: Instant, success: bool) {
        let bucket = self.bucket;
        let current = self
            .buckets
            .iter_mut()
            .find(|(start, ..)| start.is_some_and(|s| now >= s && now < s + bucket));
        let slot = match current {
            Some(slot) => slot,
            None => {
                // Reuse the oldest (or an unused) bucket for this period.
                let oldest = self
                    .buckets
                    .iter_mut()
                    .min_by_key(|(start, ..)| *start)
                    .expect("buckets");
                *oldest = (Some(now), 0, 0);
                oldest
            }
        };
        slot.1 += 1;
        slot.2 += u32::from(!success);
    }

    fn counts(&self, now: Instant) -> (u32, u32) {
        let span = self.bucket * BUCKETS as u32;
        self.buckets
            .iter()
            .filter(|(start, ..)| start.is_some_and(|s| now.duration_since(s) < span))
            .fold((0, 0), |(c, f), (_, calls, failures)| {
                (c + calls, f + failures)
            })
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    fn spec() -> BreakerSpec {
        BreakerSpec {
            failures: 3,
            failure_ratio: None,
            min_calls: 10,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(1),
            max_cool_down: Duration::from_secs(4),
        }
    }

    fn fail(b: &Breaker) {
        let a = b.admit().expect("admitted");
        b.record(a, false);
    }

    fn succeed(b: &Breaker) {
        let a = b.admit().expect("admitted");
        b.record(a, true);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_refuses_at_once() {
        let b = Breaker::new("test".into(), spec());
        fail(&b);
        fail(&b);
        succeed(&b); // resets the run
        fail(&b);
        fail(&b);
        assert!(!b.is_open());
        fail(&b);
        assert!(b.is_open());
        assert_eq!(
            b.admit().err(),
            Some(Open {
                retry_in: Duration::from_secs(1)
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_opens_after_the_cool_down_with_a_single_probe() {
        let b = Breaker::new("test".into(), spec());
        (0..3).for_each(|_| fail(&b));
        advance(Duration::from_secs(1)).await;
        let probe = b.admit().expect("the probe");
        assert!(b.admit().is_err(), "one probe at a time");
        b.record(probe, true);
        assert!(!b.is_open());
        succeed(&b);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_doubles_the_cool_down_up_to_the_cap() {
        let b = Breaker::new("test".into(), spec());
        (0..3).for_each(|_| fail(&b));
        let mut cool_downs = Vec::new();
        for _ in 0..4 {
            let wait = b.admit().err().expect("open").retry_in;
            cool_downs.push(wait.as_secs());
            advance(wait).await;
            fail(&b); // the probe fails
        }
        assert_eq!(cool_downs, [1, 2, 4, 4]);
        // A success resets the cool-down.
        advance(Duration::from_secs(4)).await;
        succeed(&b);
        (0..3).for_each(|_| fail(&b));
        assert_eq!(b.admit().err().unwrap().retry_in, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_whose_caller_left_frees_the_slot() {
        let b = Breaker::new("test".into(), spec());
        (0..3).for_each(|_| fail(&b));
        advance(Duration::from_secs(1)).await;
        drop(b.admit().expect("the probe"));
        assert!(b.admit().is_ok(), "another probe may go");
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_the_failure_ratio_over_the_window() {
        let b = Breaker::new(
            "test".into(),
            BreakerSpec {
                failures: 100,
                failure_ratio: Some(0.5),
                ..spec()
            },
        );
        // Alternating: never 3 in a row, but half of the calls fail.
        for _ in 0..4 {
            fail(&b);
            succeed(&b);
        }
        succeed(&b);
        assert!(!b.is_open(), "fewer than min_calls so far");
        fail(&b);
        assert!(b.is_open(), "10 calls, 5 failures");
    }

    #[tokio::test(start_paused = true)]
    async fn old_outcomes_leave_the_window() {
        let b = Breaker::new(
            "test".into(),
            BreakerSpec {
                failures: 100,
                failure_ratio: Some(0.5),
                ..spec()
            },
        );
        (0..9).for_each(|_| fail(&b));
        advance(Duration::from_secs(11)).await;
        (0..9).for_each(|_| succeed(&b));
        fail(&b);
        assert!(!b.is_open(), "the 9 old failures have expired");
    }

    #[tokio::test(start_paused = true)]
    async fn health_checks_open_and_close_the_circuit() {
        let b = Breaker::new("test".into(), spec());
        let mut open = b.watch();
        b.health(false);
        assert!(b.is_open() && b.admit().is_err());
        assert!(open.has_changed().unwrap());
        assert!(*open.borrow_and_update());
        b.health(true);
        assert!(!b.is_open());
        succeed(&b);
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_check_leaves_a_circuit_opened_by_calls_to_its_probe() {
        let b = Breaker::new("test".into(), spec());
        (0..3).for_each(|_| fail(&b));
        b.health(true);
        assert!(b.is_open());
        advance(Duration::from_secs(1)).await;
        succeed(&b);
        assert!(!b.is_open());
    }
}
