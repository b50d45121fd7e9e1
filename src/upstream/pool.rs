//! Connections to one HTTP source: at most `max_connections` sockets open
//! at once (the connector holds a permit for each socket's life), at most
//! `pool_max_idle` of them kept idle, each for at most `pool_idle_timeout`.
//! Without a cap, a burst of slow calls opens a socket per call and keeps
//! them all.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use http::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An [`HttpConnector`] that opens a socket only with one of `sockets`' permits.
#[derive(Clone)]
pub struct CappedConnector {
    inner: HttpConnector,
    sockets: Arc<Semaphore>,
}

impl CappedConnector {
    pub fn new(max_connections: usize) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        // https:// URLs too: the TLS connector around this one handles them.
        inner.enforce_http(false);
        Self {
            inner,
            sockets: Arc::new(Semaphore::new(max_connections)),
        }
    }
}

impl tower::Service<Uri> for CappedConnector {
    type Response = Capped<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let sockets = self.sockets.clone();
        Box::pin(async move {
            let permit = sockets.acquire_owned().await?;
            let io = inner.call(uri).await?;
            Ok(Capped {
                io,
                _permit: permit,
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// A socket that gives its permit back when it is closed.
    pub struct Capped<T> {
        #[pin]
        io: T,
        _permit: OwnedSemaphorePermit,
    }
}

impl<T: Connection> Connection for Capped<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl<T: hyper::rt::Read> hyper::rt::Read for Capped<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write> hyper::rt::Write for Capped<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
}
