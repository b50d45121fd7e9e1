//! Retries inside the deadline. A failed request is sent again only when the
//! failure is one the source retries (all safe to repeat), after an
//! exponential backoff with full jitter (or the upstream's `Retry-After`, if
//! longer), only if another attempt can still finish before the deadline,
//! and only while the source's retry budget (tower's `TpsBudget`: retries at
//! most a fraction of recent requests) allows, so that an upstream in
//! trouble is not sent a multiple of its load.

use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

use crate::{
    config::{RetryOn, RetrySpec},
    deadline::Deadline,
    error::SourceError,
};

/// How far back the budget counts requests.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// One source's retry policy and budget, shared by all its calls.
pub struct Retrier {
    spec: RetrySpec,
    budget: TpsBudget,
}

/// The retry state of one source call.
pub struct Attempts<'a> {
    retrier: &'a Retrier,
    /// Requests sent so far.
    sent: u32,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send again after waiting this long.
    RetryAfter(Duration),
    Stop(Stop),
}

/// Why no further attempt is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    NotRetryable,
    OutOfAttempts,
    /// The wait plus another attempt would not end before the deadline.
    NoTime,
    OutOfBudget,
}

impl Retrier {
    pub fn new(spec: RetrySpec) -> Self {
        let budget = TpsBudget::new(BUDGET_WINDOW, spec.min_per_second, spec.budget);
        Self { spec, budget }
    }

    /// The budget retries (and hedges) draw on.
    pub fn budget(&self) -> &TpsBudget {
        &self.budget
    }

    /// Starts a call: every call adds to the budget that retries draw on.
    pub fn start(&self) -> Attempts<'_> {
        self.budget.deposit();
        Attempts {
            retrier: self,
            sent: 0,
        }
    }
}

impl Attempts<'_> {
    /// Records that a request is being sent.
    pub fn sending(&mut self) {
        self.sent += 1;
    }

    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// Whether a failure of the attempt being sent could still be retried,
    /// i.e. whether its request must be kept for another attempt.
    pub fn may_retry(&self) -> bool {
        self.sent < self.retrier.spec.attempts
    }

    /// Decides after a failed attempt that took `took`; `jitter` picks a
    /// point in [0, 1] of the backoff (full jitter).
    pub fn after_failure(
        &mut self,
        error: &SourceError,
        took: Duration,
        deadline: Deadline,
        jitter: f64,
    ) -> Decision {
        let spec = &self.retrier.spec;
        let Some(retry_after) = retryable(error, spec.on) else {
            return Decision::Stop(Stop::NotRetryable);
        };
        if !self.may_retry() {
            return Decision::Stop(Stop::OutOfAttempts);
        }
        let doubled = spec
            .backoff
            .saturating_mul(1u32.checked_shl(self.sent - 1).unwrap_or(u32::MAX));
        let backoff = doubled
            .min(spec.max_backoff)
            .mul_f64(jitter.clamp(0.0, 1.0));
        let wait = backoff.max(retry_after.unwrap_or_default());
        // The last attempt's duration is the best guess of the next one's;
        // allow it twice that, since an upstream in trouble slows down.
        if wait.saturating_add(took.saturating_mul(2)) >= deadline.remaining() {
            return Decision::Stop(Stop::NoTime);
        }
        if !self.retrier.budget.withdraw() {
            return Decision::Stop(Stop::OutOfBudget);
        }
        Decision::RetryAfter(wait)
    }
}

/// `Some(Retry-After)` when `error` is one of `on`.
fn retryable(error: &SourceError, on: RetryOn) -> Option<Option<Duration>> {
    let name = match error {
        SourceError::Connect(_) => "connect",
        // A connection lost mid-request: the request may have run, which
        // is safe for the idempotent requests that are retried at all.
        SourceError::Transport(_) => "unavailable",
        SourceError::Grpc { code, .. } => match code {
            tonic::Code::Unavailable => "unavailable",
            tonic::Code::ResourceExhausted => "resource_exhausted",
            _ => return None,
        },
        SourceError::Http { status, .. } => match status.as_u16() {
            429 => "429",
            502 => "502",
            503 => "503",
            504 => "504",
            _ => return None,
        },
        _ => return None,
    };
    let retry_after = match error {
        SourceError::Http { retry_after, .. } => *retry_after,
        _ => None,
    };
    on.contains(name).then_some(retry_after)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn spec(attempts: u32) -> RetrySpec {
        RetrySpec {
            attempts,
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(100),
            on: RetryOn::ALL,
            budget: 10.0,
            min_per_second: 1_000,
        }
    }

    fn unavailable() -> SourceError {
        SourceError::Grpc {
            code: tonic::Code::Unavailable,
            message: "try again".into(),
        }
    }

    fn http(status: u16, retry_after: Option<Duration>) -> SourceError {
        SourceError::Http {
            status: http::StatusCode::from_u16(status).unwrap(),
            retry_after,
        }
    }

    fn far() -> Deadline {
        Deadline::after(Duration::from_secs(60))
    }

    const FAST: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap_and_attempts_are_bounded() {
        let retrier = Retrier::new(spec(5));
        let mut a = retrier.start();
        let mut waits = Vec::new();
        loop {
            a.sending();
            match a.after_failure(&unavailable(), FAST, far(), 1.0) {
                Decision::RetryAfter(wait) => waits.push(wait.as_millis()),
                Decision::Stop(why) => {
                    assert_eq!(why, Stop::OutOfAttempts);
                    break;
                }
            }
        }
        assert_eq!(waits, [25, 50, 100, 100]);
        assert_eq!(a.sent(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn full_jitter_scales_the_whole_backoff() {
        let retrier = Retrier::new(spec(3));
        let mut a = retrier.start();
        a.sending();
        assert_eq!(
            a.after_failure(&unavailable(), FAST, far(), 0.0),
            Decision::RetryAfter(Duration::ZERO)
        );
        a.sending();
        assert_eq!(
            a.after_failure(&unavailable(), FAST, far(), 0.5),
            Decision::RetryAfter(Duration::from_millis(25))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_failures_safe_to_repeat_are_retried() {
        let retrier = Retrier::new(spec(3));
        for error in [
            SourceError::Grpc {
                code: tonic::Code::Internal,
                message: String::new(),
            },
            SourceError::Timeout(Duration::from_millis(10)),
            http(500, None),
            http(404, None),
            SourceError::TooLarge(1),
        ] {
            let mut a = retrier.start();
            a.sending();
            assert_eq!(
                a.after_failure(&error, FAST, far(), 1.0),
                Decision::Stop(Stop::NotRetryable),
                "{error}"
            );
        }
        for error in [
            unavailable(),
            http(502, None),
            http(503, None),
            http(429, None),
        ] {
            let mut a = retrier.start();
            a.sending();
            assert!(
                matches!(
                    a.after_failure(&error, FAST, far(), 1.0),
                    Decision::RetryAfter(_)
                ),
                "{error}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn on_narrows_what_is_retried() {
        let retrier = Retrier::new(RetrySpec {
            on: RetryOn::parse(&["503".into()]).unwrap(),
            ..spec(3)
        });
        let mut a = retrier.start();
        a.sending();
        assert_eq!(
            a.after_failure(&unavailable(), FAST, far(), 1.0),
            Decision::Stop(Stop::NotRetryable)
        );
        assert!(matches!(
            a.after_failure(&http(503, None), FAST, far(), 1.0),
            Decision::RetryAfter(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_when_longer_than_the_backoff() {
        let retrier = Retrier::new(spec(3));
        let mut a = retrier.start();
        a.sending();
        let error = http(429, Some(Duration::from_millis(400)));
        assert_eq!(
            a.after_failure(&error, FAST, far(), 1.0),
            Decision::RetryAfter(Duration::from_millis(400))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_starts_an_attempt_that_cannot_end_before_the_deadline() {
        let retrier = Retrier::new(spec(10));
        let mut a = retrier.start();
        a.sending();
        // 25 ms of backoff plus a 30 ms attempt do not fit in 50 ms.
        let deadline = Deadline::after(Duration::from_millis(50));
        assert_eq!(
            a.after_failure(&unavailable(), Duration::from_millis(30), deadline, 1.0),
            Decision::Stop(Stop::NoTime)
        );
        // A Retry-After past the deadline is not waited for either.
        let error = http(503, Some(Duration::from_secs(120)));
        assert_eq!(
            a.after_failure(&error, FAST, far(), 0.0),
            Decision::Stop(Stop::NoTime)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_at_a_fraction_of_requests() {
        // 10% of requests, nothing guaranteed per second.
        let retrier = Arc::new(Retrier::new(RetrySpec {
            budget: 0.1,
            min_per_second: 0,
            ..spec(2)
        }));
        let mut retried = 0;
        for _ in 0..100 {
            let mut a = retrier.start();
            a.sending();
            if let Decision::RetryAfter(_) = a.after_failure(&unavailable(), FAST, far(), 0.0) {
                retried += 1;
            }
        }
        assert!(
            (8..=10).contains(&retried),
            "{retried} retries for 100 calls"
        );
    }
}
