//! The socket of an accepted connection: counts what the client sends
//! (for the handshake timeout) and closes the lingering way when dropped.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
};
use tokio_util::task::TaskTracker;

use super::{ConnState, LINGER};

/// An accepted socket: counts what the client sends and lingers on close.
pub struct ConnIo {
    stream: Option<TcpStream>,
    state: Arc<ConnState>,
    /// Held until the socket is really closed, lingering included.
    permit: Option<OwnedSemaphorePermit>,
    lingering: TaskTracker,
}

impl ConnIo {
    pub(super) fn new(
        stream: TcpStream,
        state: Arc<ConnState>,
        permit: Option<OwnedSemaphorePermit>,
        lingering: TaskTracker,
    ) -> Self {
        Self {
            stream: Some(stream),
            state,
            permit,
            lingering,
        }
    }

    fn stream(&mut self) -> &mut TcpStream {
        self.stream.as_mut().expect("only taken on drop")
    }
}

#[cfg(unix)]
impl std::os::fd::AsFd for ConnIo {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.stream {
            Some(stream) => stream.as_fd(),
            // Taken only on drop, when nobody can borrow it any more.
            None => unreachable!("a ConnIo's stream is taken only when it is dropped"),
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(this.stream()).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.state.on_read(&buf.filled()[before..]);
        }
        result
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().stream()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().stream()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()).poll_shutdown(cx)
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        let (Some(stream), Ok(runtime)) =
            (self.stream.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let permit = self.permit.take();
        self.lingering
            .spawn_on(async move { linger(stream, permit).await }, &runtime);
    }
}

/// A connection's byte stream: plain, or TLS over the counted socket.
pub enum ConnStream {
    Plain(ConnIo),
    Tls(Box<tokio_rustls::server::TlsStream<ConnIo>>),
}

impl ConnStream {
    /// The socket underneath.
    pub fn io(&self) -> &ConnIo {
        match self {
            Self::Plain(io) => io,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for ConnStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ConnStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Closes the write side, then reads (and discards) until the client
/// closes too, so that the kernel never resets a connection whose last
/// answers are still queued.
async fn linger(mut stream: TcpStream, _permit: Option<OwnedSemaphorePermit>) {
    let drain = async {
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
