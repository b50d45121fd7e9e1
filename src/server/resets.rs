//! The rapid-reset guard: how many calls a client may cancel before their
//! answer, per connection, as a token bucket. Cancelling is ordinary (a
//! caller's deadline, a user who navigates away), so a bucket refilled at a
//! rate with room for bursts tells it apart from a flood of HEADERS and
//! RST_STREAM pairs (CVE-2023-44487), which makes the server start work it
//! is never asked to finish.

use std::time::Duration;

use tokio::time::Instant;

/// Resets allowed: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetBudget {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug)]
pub struct Bucket {
    budget: ResetBudget,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(budget: ResetBudget) -> Self {
        Self {
            budget,
            tokens: f64::from(budget.burst),
            at: Instant::now(),
        }
    }

    /// Spends one reset; false once the budget is exhausted.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * f64::from(self.budget.per_second);
        self.tokens = (self.tokens + refill).min(f64::from(self.budget.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How long `n` resets take to be allowed again at the budget's rate.
pub fn refill_time(budget: ResetBudget, n: u32) -> Duration {
    Duration::from_secs_f64(f64::from(n) / f64::from(budget.per_second.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: ResetBudget = ResetBudget {
        per_second: 100,
        burst: 10,
    };

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_the_rate_holds() {
        let mut bucket = Bucket::new(BUDGET);
        assert!((0..10).all(|_| bucket.take()), "the burst is allowed");
        assert!(!bucket.take(), "the 11th at once is not");
        tokio::time::advance(refill_time(BUDGET, 5)).await;
        assert!((0..5).all(|_| bucket.take()), "refilled at the rate");
        assert!(!bucket.take());
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_rate_below_the_budget_never_runs_out() {
        let mut bucket = Bucket::new(BUDGET);
        for _ in 0..10_000 {
            tokio::time::advance(Duration::from_millis(11)).await;
            assert!(bucket.take());
        }
    }

    const DEFAULTS: ResetBudget = ResetBudget {
        per_second: crate::config::DEFAULT_MAX_RESETS_PER_SECOND,
        burst: crate::config::DEFAULT_MAX_RESET_BURST,
    };

    /// Spends `n` resets spread evenly over `over`; the index of the first
    /// refused, if any.
    async fn spend(bucket: &mut Bucket, n: u32, over: Duration) -> Option<u32> {
        let step = over / n;
        for i in 0..n {
            tokio::time::advance(step).await;
            if !bucket.take() {
                return Some(i);
            }
        }
        None
    }

    #[tokio::test(start_paused = true)]
    async fn by_default_a_rapid_reset_flood_is_cut_off_in_its_first_second() {
        let mut bucket = Bucket::new(DEFAULTS);
        let refused = spend(&mut bucket, 20_000, Duration::from_secs(2)).await;
        let refused = refused.expect("20,000 resets in 2 s were all allowed");
        assert!(refused < 10_000, "refused only at {refused}");
    }

    #[tokio::test(start_paused = true)]
    async fn by_default_ordinary_cancellation_bursts_pass() {
        // 10,000 over 10 s: evenly, in bursts of 100 every 100 ms, and in
        // bursts of 2,500 every 2.5 s.
        let mut even = Bucket::new(DEFAULTS);
        assert_eq!(
            spend(&mut even, 10_000, Duration::from_secs(10)).await,
            None
        );
        for (burst, every) in [(100, 100), (2_500, 2_500)] {
            let mut bucket = Bucket::new(DEFAULTS);
            for _ in 0..10_000 / burst {
                tokio::time::advance(Duration::from_millis(every)).await;
                assert!((0..burst).all(|_| bucket.take()), "bursts of {burst}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_never_holds_more_than_the_burst() {
        let mut bucket = Bucket::new(BUDGET);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!((0..10).all(|_| bucket.take()));
        assert!(!bucket.take());
    }
}
