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
//!
//! Until an answer is ready a stream costs a cell in its task; the timer is
//! made only then.

use std::{
    cell::Cell,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

tokio::task_local! {
    /// When the current stream must have sent its answer, once known.
    static BOUND: Cell<Option<Instant>>;
}

/// Runs each HTTP/2 stream as a task, dropped if its answer is not sent in time.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let bounded = Bounded {
            stream,
            timer: None,
        };
        tokio::spawn(BOUND.scope(Cell::new(None), bounded));
    }
}

pin_project_lite::pin_project! {
    /// A stream's task: done when the stream is, or when its bound passes.
    struct Bounded<F> {
        #[pin]
        stream: F,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<F: Future<Output = ()>> Future for Bounded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.stream.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if this.timer.is_none() {
            match BOUND.try_with(Cell::get).ok().flatten() {
                Some(at) => *this.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                None => return Poll::Pending,
            }
        }
        match this.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => {
                tracing::debug!("the client did not take its answer in time: stream reset");
                Poll::Ready(())
            }
            _ => Poll::Pending,
        }
    }
}

/// From now, the current stream has `timeout` to send its answer. Outside a
/// stream run by [`StreamExecutor`] (HTTP/1, tests), nothing happens.
pub fn answer_within(timeout: Duration) {
    let _ = BOUND.try_with(|bound| bound.set(Some(Instant::now() + timeout)));
}
