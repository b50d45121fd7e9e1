//! A log line at most every few seconds, however often its event happens:
//! a dead store must not flood the log.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

/// At most one line per this.
const INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Throttle {
    last: Mutex<Option<Instant>>,
    /// Events since the last line.
    suppressed: AtomicU64,
}

impl Throttle {
    /// Whether to log this event; if so, how many went unlogged before it.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        // Contended only while the store fails; never held across an await.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(at) if now.duration_since(at) < INTERVAL => {
                self.suppressed.fetch_add(1, Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_with_the_count_of_the_rest() {
        let throttle = Throttle::default();
        assert_eq!(throttle.admit(), Some(0));
        for _ in 0..1000 {
            assert_eq!(throttle.admit(), None);
        }
        tokio::time::advance(INTERVAL).await;
        assert_eq!(throttle.admit(), Some(1000));
        assert_eq!(throttle.admit(), None);
    }
}
