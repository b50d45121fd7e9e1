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

mod io;
mod state;

use std::{
    future::Future,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use hyper_util::server::graceful::GracefulConnection;
use tokio::{net::TcpListener, sync::Semaphore, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use self::{
    io::{ConnIo, ConnStream},
    state::ConnState,
};
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
        let io = ConnIo::new(stream, state.clone(), permit, lingering.clone());
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
