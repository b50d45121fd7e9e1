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

    #[tokio::test(start_paused = true)]
    async fn the_bucket_never_holds_more_than_the_burst() {
        let mut bucket = Bucket::new(BUDGET);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!((0..10).all(|_| bucket.take()));
        assert!(!bucket.take());
    }
}
