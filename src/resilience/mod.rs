//! What keeps one slow or failing upstream from taking the gateway down,
//! one explicit state machine per file, each unit-tested under paused time:
//!
//! - [`bulkhead`]: concurrency caps per source and gateway-wide, with a
//!   bounded wait, so overload is refused rather than queued.
//! - [`retry`]: backoff, what is safe to retry, the deadline and the budget.
//! - [`coalesce`]: identical concurrent upstream calls share one request.
//! - [`breaker`]: per-source circuit breakers, fed by calls and health checks.
//! - [`hedge`]: a second request when the first is slow, within the budget.

pub mod breaker;
pub mod bulkhead;
pub mod coalesce;
pub mod hedge;
pub mod retry;
