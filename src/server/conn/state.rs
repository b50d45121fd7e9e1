//! One connection's live state: its handshake's progress, its requests in
//! flight, when it went idle, and its budget of client resets.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{ConnPolicy, Handshake};

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
    pub(super) handshaken: AtomicBool,
    /// Requests in flight (until their answer has been sent or dropped).
    active: AtomicUsize,
    /// When the last request ended (or the connection opened).
    idle_since: Mutex<Instant>,
    resets: Option<Mutex<crate::server::resets::Bucket>>,
    /// Set when the client sent resets beyond its budget.
    cut_off: AtomicBool,
    pub(super) cut: Notify,
}

impl ConnState {
    pub(super) fn new(policy: &ConnPolicy) -> Self {
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
                .map(|b| Mutex::new(crate::server::resets::Bucket::new(b))),
            cut_off: AtomicBool::new(false),
            cut: Notify::new(),
        }
    }

    pub(super) fn on_read(&self, bytes: &[u8]) {
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
    pub(super) fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.active.load(Relaxed) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + idle)
    }
}
