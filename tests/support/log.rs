//! What an upstream saw: requests, their headers, how many were in flight
//! at once, cancellations, and connections.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;

/// What an upstream saw. Cheap to clone; every clone observes the same counts.
#[derive(Clone, Default)]
pub struct Log {
    stats: Arc<watch::Sender<Stats>>,
    requests: Arc<Mutex<Vec<Seen>>>,
    /// Every HTTP path a gRPC upstream was asked for, reflection included.
    pub(super) paths: Arc<Mutex<Vec<String>>>,
    /// The open connections of an HTTP upstream.
    sockets: Arc<Mutex<Vec<Arc<ConnEntry>>>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests that reached the handler.
    pub started: u32,
    /// Requests whose handler ran to the end.
    pub finished: u32,
    /// Requests dropped before the handler finished (the client went away).
    pub cancelled: u32,
    /// The most requests ever in the handler at once.
    pub peak: u32,
    /// Connections open now (HTTP upstreams).
    pub connections: u32,
    /// The most connections ever open at once.
    pub peak_connections: u32,
    /// Connections accepted in all.
    pub connections_accepted: u32,
}

impl Stats {
    /// Requests in the handler now.
    pub fn in_flight(&self) -> u32 {
        self.started - self.finished - self.cancelled
    }
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The HTTP path and query, or the gRPC `user_id`.
    pub target: String,
    pub headers: http::HeaderMap,
    /// The request body, for an HTTP upstream that answers by request.
    pub body: bytes::Bytes,
    /// The HTTP version it came over.
    pub version: http::Version,
}

impl Log {
    pub fn stats(&self) -> Stats {
        *self.stats.borrow()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests a gRPC upstream got whose path starts with `prefix`.
    pub fn paths_starting(&self, prefix: &str) -> usize {
        let paths = self.paths.lock().unwrap();
        paths.iter().filter(|p| p.starts_with(prefix)).count()
    }

    /// Waits until `cond` holds, at most `within`; returns whether it did.
    pub async fn wait_for(&self, within: Duration, cond: impl FnMut(&Stats) -> bool) -> bool {
        let mut rx = self.stats.subscribe();
        tokio::time::timeout(within, rx.wait_for(cond))
            .await
            .is_ok()
    }

    pub(super) fn start(&self, seen: Seen) -> InFlight {
        self.requests.lock().unwrap().push(seen);
        self.stats.send_modify(|s| {
            s.started += 1;
            s.peak = s.peak.max(s.in_flight());
        });
        InFlight {
            log: self.clone(),
            done: false,
        }
    }
}

impl Log {
    /// Counts a connection open until the guard is dropped, or until its
    /// socket shows the peer closed it: at each new connection, every open
    /// one is checked for an end of stream first, so a connection the
    /// client closed before it opened the next never counts as open
    /// together with it (whatever order the runtime polls them in).
    pub(super) fn connection(&self, io: &aggregator::server::conn::ConnIo) -> OpenConnection {
        use std::os::fd::AsFd;
        let socket = std::net::TcpStream::from(io.as_fd().try_clone_to_owned().unwrap());
        let entry = Arc::new(ConnEntry {
            socket,
            counted: std::sync::atomic::AtomicBool::new(true),
        });
        let mut open = self.sockets.lock().unwrap();
        open.retain(|e| {
            let closed = matches!(e.socket.peek(&mut [0u8; 1]), Ok(0));
            if closed {
                e.uncount(self);
            }
            !closed && e.counted.load(std::sync::atomic::Ordering::Relaxed)
        });
        open.push(entry.clone());
        self.stats.send_modify(|s| {
            s.connections += 1;
            s.connections_accepted += 1;
            s.peak_connections = s.peak_connections.max(s.connections);
        });
        OpenConnection(self.clone(), entry)
    }
}

/// A connection's socket (a duplicate, to peek at), counted open until
/// closed.
struct ConnEntry {
    socket: std::net::TcpStream,
    counted: std::sync::atomic::AtomicBool,
}

impl ConnEntry {
    fn uncount(&self, log: &Log) {
        if self
            .counted
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            log.stats.send_modify(|s| s.connections -= 1);
        }
    }
}

/// One open connection of an upstream, until dropped.
pub(super) struct OpenConnection(Log, Arc<ConnEntry>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.1.uncount(&self.0);
        self.0
            .sockets
            .lock()
            .unwrap()
            .retain(|e| !Arc::ptr_eq(e, &self.1));
    }
}

/// A hyper service that holds its connection's [`OpenConnection`]: hyper
/// keeps the service for as long as the connection lives.
#[derive(Clone)]
pub(super) struct PerConnection<S> {
    pub(super) inner: S,
    pub(super) _open: Arc<OpenConnection>,
}

impl<S, R> hyper::service::Service<R> for PerConnection<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        self.inner.call(request)
    }
}

/// Counts a handler as cancelled if it is dropped before `finish`.
pub(super) struct InFlight {
    log: Log,
    done: bool,
}

impl InFlight {
    pub(super) fn finish(mut self) {
        self.done = true;
        self.log.stats.send_modify(|s| s.finished += 1);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.log.stats.send_modify(|s| s.cancelled += 1);
        }
    }
}
