//! A bound on the time to send an answer. A client that never opens its
//! HTTP/2 receive window would otherwise keep every answer it asked for in
//! the gateway's memory for as long as it keeps the connection.
//!
//! hyper runs each HTTP/2 stream as a task through the connection's
//! executor; [`StreamExecutor`] runs it under a per-stream bound that the
//! request's handler sets once its answer is ready ([`answer_within`]).
//! When the bound passes first, the stream's task is dropped: h2 resets the
//! stream (RST_STREAM CANCEL) and frees what it had queued. Answers are
//! handed to h2 in small chunks ([`super::edge::Rechunk`]), so the stream is
//! still open, and resettable, while its data waits for the window.

use std::{future::Future, time::Duration};

use tokio::{sync::watch, time::Instant};

tokio::task_local! {
    /// When the current stream must have sent its answer, once known.
    static BOUND: watch::Sender<Option<Instant>>;
}

/// Runs each HTTP/2 stream as a task, dropped if its answer is not sent in time.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let (bound, mut expires) = watch::channel(None);
        tokio::spawn(BOUND.scope(bound, async move {
            tokio::select! {
                biased;
                () = stream => {}
                () = expiry(&mut expires) => {
                    tracing::debug!("the client did not take its answer in time: stream reset");
                }
            }
        }));
    }
}

async fn expiry(bound: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let at = *bound.borrow_and_update();
        let changed = async {
            if bound.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        match at {
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at) => return,
                () = changed => {}
            },
            None => changed.await,
        }
    }
}

/// From now, the current stream has `timeout` to send its answer. Outside a
/// stream run by [`StreamExecutor`] (HTTP/1, tests), nothing happens.
pub fn answer_within(timeout: Duration) {
    let _ = BOUND.try_with(|bound| bound.send_replace(Some(Instant::now() + timeout)));
}
