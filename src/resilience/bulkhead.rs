//! Concurrency caps: per source (its upstream requests in flight) and
//! gateway-wide (calls in flight). A call that finds the cap reached waits
//! for a slot at most the cap's queue time, never past its deadline, and is
//! then refused: overload sheds load instead of queueing without bound.

use std::{sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{config::Limit, deadline::Deadline};

/// Clones share the slots.
#[derive(Debug, Clone)]
pub struct Bulkhead {
    slots: Arc<Semaphore>,
    limit: Limit,
}

/// A slot; the next waiter gets it when this is dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// The cap was reached and no slot freed up in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{max} already in flight, no slot freed within {waited:?}")]
pub struct Full {
    pub max: usize,
    pub waited: Duration,
}

impl Bulkhead {
    pub fn new(limit: Limit) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit.max)),
            limit,
        }
    }

    /// Takes a slot, waiting at most the queue time (or until `deadline`).
    /// Waiters are served in arrival order (tokio's semaphore is fair).
    pub async fn enter(&self, deadline: Deadline) -> Result<Slot, Full> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(Slot { _permit: permit });
        }
        let wait = self.limit.queue_timeout.min(deadline.remaining());
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Slot { _permit: permit }),
            // The semaphore is never closed; a timeout is the only way here.
            _ => Err(Full {
                max: self.limit.max,
                waited: wait,
            }),
        }
    }

    /// Slots taken right now.
    pub fn limit(&self) -> Limit {
        self.limit
    }

    pub fn in_flight(&self) -> usize {
        self.limit.max - self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulkhead(max: usize, queue_ms: u64) -> Bulkhead {
        Bulkhead::new(Limit {
            max,
            queue_timeout: Duration::from_millis(queue_ms),
        })
    }

    fn far() -> Deadline {
        Deadline::after(Duration::from_secs(60))
    }

    #[tokio::test(start_paused = true)]
    async fn admits_up_to_the_cap_at_once() {
        let b = bulkhead(2, 10);
        let t0 = tokio::time::Instant::now();
        let _a = b.enter(far()).await.unwrap();
        let _b = b.enter(far()).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(b.in_flight(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_after_the_queue_time_when_full() {
        let b = bulkhead(1, 10);
        let _held = b.enter(far()).await.unwrap();
        let t0 = tokio::time::Instant::now();
        let err = b.enter(far()).await.unwrap_err();
        assert_eq!(
            err,
            Full {
                max: 1,
                waited: Duration::from_millis(10)
            }
        );
        assert_eq!(t0.elapsed(), Duration::from_millis(10));
        assert_eq!(b.in_flight(), 1, "a refused call holds nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_freed_while_waiting_is_taken() {
        let b = Arc::new(bulkhead(1, 50));
        let held = b.enter(far()).await.unwrap();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move {
                let t0 = tokio::time::Instant::now();
                b.enter(far()).await.map(|_| t0.elapsed())
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        let waited = waiter.await.unwrap().expect("got the freed slot");
        assert_eq!(waited, Duration::from_millis(20));
        assert_eq!(b.in_flight(), 0, "the waiter's slot was released with it");
    }

    #[tokio::test(start_paused = true)]
    async fn never_waits_past_the_deadline() {
        let b = bulkhead(1, 1_000);
        let _held = b.enter(far()).await.unwrap();
        let t0 = tokio::time::Instant::now();
        let err = b
            .enter(Deadline::after(Duration::from_millis(30)))
            .await
            .unwrap_err();
        assert_eq!(err.waited, Duration::from_millis(30));
        assert_eq!(t0.elapsed(), Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_the_queue() {
        let b = Arc::new(bulkhead(1, 1_000));
        let held = b.enter(far()).await.unwrap();
        // A caller that cancels while queued...
        let gone = tokio::spawn({
            let b = b.clone();
            async move { b.enter(far()).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        gone.abort();
        let _ = gone.await;
        // ...does not take the slot from the next one.
        let next = tokio::spawn({
            let b = b.clone();
            async move { b.enter(far()).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(held);
        assert_eq!(next.await.unwrap(), Ok(()));
    }
}
