//! Counts each connection's requests in flight (for its idle timeout) and
//! the calls its client cancelled before their answer (for the rapid-reset
//! guard): a service wrapper whose future and response body report to the
//! connection's [`ConnState`].

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};

use super::conn::ConnState;

/// `S`, reporting every request to one connection's state.
#[derive(Clone)]
pub struct Track<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S> Track<S> {
    pub fn new(inner: S, state: Arc<ConnState>) -> Self {
        Self { inner, state }
    }
}

/// Ends the request on drop: answered, or reset by the client first.
struct InFlight {
    state: Arc<ConnState>,
    answered: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.end(self.answered);
    }
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for Track<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        self.state.begin();
        TrackedFuture {
            inner: self.inner.call(request),
            in_flight: Some(InFlight {
                state: self.state.clone(),
                answered: false,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let mut in_flight = this.in_flight.take();
        if let Some(f) = &mut in_flight {
            f.answered = true;
        }
        Poll::Ready(result.map(|response| {
            response.map(|body| TrackedBody {
                inner: body,
                _in_flight: in_flight,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// The answer's body; the request is in flight until it is dropped.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        _in_flight: Option<InFlight>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
