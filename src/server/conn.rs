//! Client connections: how many may be open, how long one may take to say
//! anything, how long it may sit idle, and how it is closed.
//!
//! Every accepted socket is wrapped in a [`ConnIo`] that counts what the
//! client has sent (the handshake timeout) and, when dropped, closes it the
//! lingering way: the write side first, then what the client still sends
//! is read and discarded until it closes too (or [`LINGER`] passes). A plain
//! close with unread bytes in the receive queue makes the kernel send a
//! reset and throw away whatever answers were still queued to go out: that
//! lost calls at shutdown, answered by the gateway but never received.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::server::graceful::GracefulConnection;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::resets::ResetBudget;

/// The longest a closed connection is read from, waiting for the client to
/// close its side, before the socket is dropped anyway.
pub const LINGER: Duration = Duration::from_secs(2);

/// How long an idle connection told to go away (GOAWAY) has to do so before
/// it is closed: a client that never answers the GOAWAY's ping is not left
/// to the keepalive.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What a listener allows each connection. `None` is no limit.
#[derive(Clone, Default)]
pub struct ConnPolicy {
    /// Connections open at once; more are closed as soon as accepted.
    pub max_connections: Option<usize>,
    /// How long a new connection has to complete its `handshake`.
    pub handshake_timeout: Option<Duration>,
    /// What the client must send for its handshake to count as done.
    pub handshake: Handshake,
    /// A connection with no request in flight for this long is closed
    /// (gracefully: GOAWAY on HTTP/2).
    pub idle_timeout: Option<Duration>,
    /// Client resets (calls cancelled before their answer) a connection may
    /// send, as a rate and a burst; beyond it the connection is cut off.
    pub resets: Option<ResetBudget>,
    /// TLS on every connection, its handshake within `handshake_timeout`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// What a client must send before its connection counts as established.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Handshake {
    /// Nothing (or TLS, whose own handshake is what is timed).
    #[default]
    None,
    /// At least one byte: HTTP/1 and HTTP/2 alike (the metrics listener).
    AnyByte,
    /// The HTTP/2 connection preface and a whole SETTINGS frame after it.
    Http2,
}

/// The 24-byte preface and the 9-byte header of the SETTINGS frame that follows.
const H2_PREFIX: usize = 24 + 9;

/// What has arrived of a handshake.
#[derive(Debug)]
struct Progress {
    /// The first bytes, up to the SETTINGS frame's header.
    head: [u8; H2_PREFIX],
    read: u64,
}

/// One connection's live state, shared by its socket, its requests and the
/// task that drives it.
#[derive(Debug)]
pub struct ConnState {
    handshake: Handshake,
    /// What the client sent, kept until the handshake is done.
    progress: Mutex<Progress>,
    handshaken: AtomicBool,
    /// Requests in flight (until their answer has been sent or dropped).
    active: AtomicUsize,
    /// When the last request ended (or the connection opened).
    idle_since: Mutex<Instant>,
    resets: Option<Mutex<super::resets::Bucket>>,
    /// Set when the client sent resets beyond its budget.
    cut_off: AtomicBool,
    cut: Notify,
}

impl ConnState {
    fn new(policy: &ConnPolicy) -> Self {
        Self {
            handshake: policy.handshake,
            progress: Mutex::new(Progress {
                head: [0; H2_PREFIX],
                read: 0,
            }),
            // Over TLS the bytes read are ciphertext: the TLS handshake is
            // what is timed (in the accept loop).
            handshaken: AtomicBool::new(
                policy.handshake == Handshake::None || policy.tls.is_some(),
            ),
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            resets: policy
                .resets
                .map(|b| Mutex::new(super::resets::Bucket::new(b))),
            cut_off: AtomicBool::new(false),
            cut: Notify::new(),
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        if self.handshaken.load(Relaxed) || bytes.is_empty() {
            return;
        }
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let at = progress.read as usize;
        if at < H2_PREFIX {
            let n = bytes.len().min(H2_PREFIX - at);
            progress.head[at..at + n].copy_from_slice(&bytes[..n]);
        }
        progress.read += bytes.len() as u64;
        let done = match self.handshake {
            Handshake::None | Handshake::AnyByte => true,
            Handshake::Http2 if progress.read < H2_PREFIX as u64 => false,
            Handshake::Http2 => {
                // The SETTINGS frame's 24-bit payload length.
                let h = &progress.head[24..27];
                let payload = u64::from(h[0]) << 16 | u64::from(h[1]) << 8 | u64::from(h[2]);
                progress.read >= H2_PREFIX as u64 + payload
            }
        };
        if done {
            self.handshaken.store(true, Relaxed);
        }
    }

    /// A request arrived.
    pub fn begin(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    /// A request ended; `answered` is false when the client reset it first.
    pub fn end(&self, answered: bool) {
        if self.active.fetch_sub(1, Relaxed) == 1 {
            *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        if answered {
            return;
        }
        if let Some(bucket) = &self.resets {
            let within = bucket.lock().unwrap_or_else(|e| e.into_inner()).take();
            if !within && !self.cut_off.swap(true, Relaxed) {
                self.cut.notify_one();
            }
        }
    }

    /// When the connection will have been idle for `idle`, if it is idle now.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.active.load(Relaxed) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + idle)
    }
}

/// An accepted socket: counts what the client sends and lingers on close.
pub struct ConnIo {
    stream: Option<TcpStream>,
    state: Arc<ConnState>,
    /// Held until the socket is really closed, lingering included.
    permit: Option<OwnedSemaphorePermit>,
    lingering: TaskTracker,
}

impl ConnIo {
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

/// Accepts connections until `shutdown`, serving each with `serve`; then
/// closes the listener, asks every connection to finish (GOAWAY on HTTP/2)
/// and waits up to `drain` for them before closing the rest.
pub async fn accept_loop<C, F>(
    listener: TcpListener,
    policy: ConnPolicy,
    serve: F,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) where
    F: Fn(ConnStream, Arc<ConnState>) -> C + Clone + Send + 'static,
    C: GracefulConnection + Send + 'static,
    C::Error: std::fmt::Debug,
{
    let slots = policy.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let tls = policy.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let closing = CancellationToken::new();
    let abort = CancellationToken::new();
    let connections = TaskTracker::new();
    let lingering = TaskTracker::new();
    let mut refused: u64 = 0;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let permit = match &slots {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    // Closed at once: a client told "no" can go elsewhere.
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(refused, max_connections = ?policy.max_connections, "connection refused: at max_connections");
                    }
                    drop(stream);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnState::new(&policy));
        let io = ConnIo {
            stream: Some(stream),
            state: state.clone(),
            permit,
            lingering: lingering.clone(),
        };
        let (serve, tls, policy) = (serve.clone(), tls.clone(), policy.clone());
        let (closing, abort) = (closing.clone(), abort.clone());
        connections.spawn(async move {
            let io = match tls {
                None => ConnStream::Plain(io),
                Some(tls) => {
                    let handshake = tls.accept(io);
                    let timeout = policy.handshake_timeout.unwrap_or(Duration::MAX);
                    tokio::select! {
                        accepted = tokio::time::timeout(timeout, handshake) => match accepted {
                            Ok(Ok(tls)) => ConnStream::Tls(Box::new(tls)),
                            Ok(Err(error)) => {
                                tracing::debug!(%error, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(?timeout, "connection closed: no TLS handshake in time");
                                return;
                            }
                        },
                        () = closing.cancelled() => return,
                    }
                }
            };
            let conn = serve(io, state.clone());
            drive(conn, state, policy, closing, abort).await;
        });
    }
    drop(listener);
    closing.cancel();
    connections.close();
    tokio::select! {
        () = connections.wait() => tracing::debug!("all connections drained"),
        () = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "drain timeout elapsed; closing remaining connections");
            abort.cancel();
            connections.wait().await;
        }
    }
    lingering.close();
    let _ = tokio::time::timeout(LINGER, lingering.wait()).await;
}

/// Drives one connection to its end, closing it on shutdown, when idle, when
/// its handshake does not come, or when it sends resets beyond its budget.
async fn drive<C>(
    conn: C,
    state: Arc<ConnState>,
    policy: ConnPolicy,
    closing: CancellationToken,
    abort: CancellationToken,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Debug,
{
    let mut conn = std::pin::pin!(conn);
    let opened = Instant::now();
    let mut finishing = false;
    // Set once an idle connection has been asked to go.
    let mut close_by: Option<Instant> = None;
    let far = || Instant::now() + Duration::from_secs(86_400);
    loop {
        let handshake_by = match policy.handshake_timeout {
            Some(t) if !state.handshaken.load(Relaxed) => opened + t,
            _ => far(),
        };
        let idle_by = match policy.idle_timeout {
            Some(t) if !finishing => state.idle_deadline(t).unwrap_or_else(|| Instant::now() + t),
            _ => far(),
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(?error, "connection closed with an error");
                }
                return;
            }
            () = closing.cancelled(), if !finishing => {
                finishing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = abort.cancelled() => return,
            () = tokio::time::sleep_until(close_by.unwrap_or_else(far)), if close_by.is_some() => {
                tracing::debug!("closing an idle connection that did not go away");
                return;
            }
            () = state.cut.notified() => {
                tracing::warn!(
                    "connection cut off: the client reset calls faster than max_resets_per_second allows"
                );
                return;
            }
            () = tokio::time::sleep_until(handshake_by) => {
                if !state.handshaken.load(Relaxed) {
                    tracing::debug!(timeout = ?policy.handshake_timeout, "connection closed: no handshake in time");
                    return;
                }
            }
            () = tokio::time::sleep_until(idle_by) => {
                let idle = policy.idle_timeout.unwrap_or_default();
                if state.idle_deadline(idle).is_some_and(|at| at <= Instant::now()) {
                    tracing::debug!(?idle, "closing an idle connection");
                    finishing = true;
                    close_by = Some(Instant::now() + CLOSE_GRACE);
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
