//! Hedged requests: when an idempotent source has not answered within a
//! delay (fixed, or its observed p95 latency), one more identical request is
//! sent and the first good answer wins; the other is cancelled. Hedges are
//! paid from the retry budget (the source's own, or one of the same
//! defaults), so they cannot double the load on a slow upstream.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tower::retry::budget::{Budget, TpsBudget};

use crate::config::{HedgeDelay, HedgeSpec};

/// Latencies kept for the p95.
const SAMPLES: usize = 200;
/// Samples needed before a p95 is trusted.
const MIN_SAMPLES: usize = 20;
/// The p95 is recomputed every this many samples.
const RECOMPUTE_EVERY: u64 = 10;

pub struct Hedger {
    spec: HedgeSpec,
    /// Used when the source has no retry budget to share.
    budget: Option<TpsBudget>,
    samples: Mutex<VecDeque<Duration>>,
    seen: AtomicU64,
    /// The current p95 in nanoseconds; 0 until there are enough samples.
    p95: AtomicU64,
}

impl Hedger {
    /// `own_budget`: whether hedges need a budget of their own (the source
    /// has no retry budget).
    pub fn new(spec: HedgeSpec, own_budget: bool) -> Self {
        Self {
            spec,
            budget: own_budget.then(|| TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES)),
            seen: AtomicU64::new(0),
            p95: AtomicU64::new(0),
        }
    }

    /// How long to wait before hedging; `None` while the p95 is unknown.
    pub fn delay(&self) -> Option<Duration> {
        match self.spec.delay {
            HedgeDelay::Fixed(delay) => Some(delay),
            HedgeDelay::P95 { min } => match self.p95.load(Relaxed) {
                0 => None,
                nanos => Some(Duration::from_nanos(nanos).max(min)),
            },
        }
    }

    /// A call started: it adds to the budget hedges draw on (when own).
    pub fn deposit(&self) {
        if let Some(budget) = &self.budget {
            budget.deposit();
        }
    }

    /// Whether the budget allows a hedge (the own one, else `shared`).
    pub fn withdraw(&self, shared: Option<&TpsBudget>) -> bool {
        match (&self.budget, shared) {
            (Some(own), _) => own.withdraw(),
            (None, Some(shared)) => shared.withdraw(),
            (None, None) => false,
        }
    }

    /// Records a successful request's latency.
    pub fn observe(&self, took: Duration) {
        if !matches!(self.spec.delay, HedgeDelay::P95 { .. }) {
            return;
        }
        let mut samples = self.samples.lock().expect("hedge samples");
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(took);
        let seen = self.seen.fetch_add(1, Relaxed) + 1;
        if samples.len() >= MIN_SAMPLES && seen % RECOMPUTE_EVERY == 0 {
            let mut sorted: Vec<Duration> = samples.iter().copied().collect();
            sorted.sort_unstable();
            let p95 = sorted[(sorted.len() * 95).div_ceil(100) - 1];
            self.p95.store(p95.as_nanos().max(1) as u64, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_delay_is_known_at_once() {
        let h = Hedger::new(
            HedgeSpec {
                delay: HedgeDelay::Fixed(Duration::from_millis(30)),
            },
            true,
        );
        assert_eq!(h.delay(), Some(Duration::from_millis(30)));
    }

    #[test]
    fn the_p95_is_learned_from_successful_latencies() {
        let h = Hedger::new(
            HedgeSpec {
                delay: HedgeDelay::P95 {
                    min: Duration::from_millis(2),
                },
            },
            true,
        );
        for ms in 1..=10 {
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(h.delay(), None, "too few samples to hedge");
        // 1..=100 ms: the p95 is 95 ms.
        for ms in 11..=100 {
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(h.delay(), Some(Duration::from_millis(95)));
        // The floor applies to a fast source.
        let fast = Hedger::new(h.spec.clone(), true);
        for _ in 0..20 {
            fast.observe(Duration::from_micros(100));
        }
        assert_eq!(fast.delay(), Some(Duration::from_millis(2)));
    }

    #[test]
    fn hedges_are_paid_from_a_budget() {
        let h = Hedger::new(
            HedgeSpec {
                delay: HedgeDelay::Fixed(Duration::ZERO),
            },
            false,
        );
        assert!(!h.withdraw(None), "no budget, no hedge");
        let shared = TpsBudget::new(Duration::from_secs(10), 0, 0.5);
        for _ in 0..4 {
            shared.deposit();
        }
        let allowed = (0..4).filter(|_| h.withdraw(Some(&shared))).count();
        assert_eq!(allowed, 2, "half of the requests");
    }
}
