//! Upstream sources: how one source's request is rendered and sent.
//!
//! Rendering ([`Source::prepare`]) is separate from sending ([`Source::call`])
//! so that every parameter is checked before any upstream is contacted.

mod cached;
pub mod codec;
pub mod grpc;
pub mod http;
pub mod lookup;
pub mod pool;
pub mod prepared;
mod probe;
pub mod schema;
mod send;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    cache::{Cached, Directive, ResponseCache},
    config::{SourceKind, SourceSpec},
    deadline::Deadline,
    error::SourceError,
    resilience::{
        breaker::Breaker,
        bulkhead::Bulkhead,
        coalesce::{Coalescer, Role},
        hedge::Hedger,
        retry::{Decision, Retrier},
    },
    store::Store,
};

pub use self::prepared::Prepared;
use crate::telemetry::metrics::SourceMetrics;

/// A configured source with its live client.
pub struct Source {
    pub spec: Arc<SourceSpec>,
    /// Placeholders its requests need.
    pub params: Vec<Arc<str>>,
    /// Whether its requests read other sources' results (it then runs
    /// after them).
    pub reads_sources: bool,
    client: Client,
    /// The cap on this source's requests in flight, if configured.
    bulkhead: Option<Bulkhead>,
    retry: Option<Retrier>,
    coalescer: Option<Coalescer>,
    breaker: Option<Breaker>,
    hedger: Option<Hedger>,
    cache: Option<ResponseCache>,
    metrics: SourceMetrics,
}

/// An upstream's answer: its JSON, and what it lets a cache do with it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub value: serde_json::Value,
    pub directive: Directive,
}

impl From<serde_json::Value> for Answer {
    fn from(value: serde_json::Value) -> Self {
        Self {
            value,
            directive: Directive::Default,
        }
    }
}

/// What one source call came to.
pub struct Fetched {
    pub result: Result<serde_json::Value, SourceError>,
    /// Requests sent upstream for it (by the shared call, if coalesced).
    pub sent: u32,
    /// Whether it joined an identical call already in flight.
    pub coalesced: bool,
    /// Set when the cache answered.
    pub cached: Option<Cached>,
}

enum Client {
    Grpc(grpc::GrpcUpstream),
    /// Boxed: two hyper clients; a source is built once, at load.
    Http(Box<http::HttpUpstream>),
}

/// What a source's requests go to beyond their own bytes: a gRPC source's
/// endpoint and method (an HTTP request's URL names its upstream itself).
fn upstream_identity(spec: &SourceSpec) -> Vec<u8> {
    match &spec.kind {
        SourceKind::Grpc(g) => format!("{}{}", g.endpoint, g.path).into_bytes(),
        SourceKind::Http(_) => Vec::new(),
    }
}

impl Source {
    /// Builds the client; gRPC channels connect lazily, so a down upstream
    /// does not stop the gateway from starting.
    pub fn new(
        spec: Arc<SourceSpec>,
        metrics: SourceMetrics,
        store: &Store,
    ) -> Result<Self, tonic::transport::Error> {
        let client = match &spec.kind {
            SourceKind::Grpc(g) => Client::Grpc(grpc::GrpcUpstream::new(spec.clone(), g)?),
            SourceKind::Http(h) => {
                Client::Http(Box::new(http::HttpUpstream::new(&h.pool, h.tls.as_ref())))
            }
        };
        Ok(Self {
            params: spec.params(),
            reads_sources: spec.reads_sources(),
            bulkhead: spec.max_concurrent.map(Bulkhead::new),
            retry: spec.retry.clone().map(Retrier::new),
            coalescer: spec.coalesce.then(Coalescer::default),
            breaker: (spec.breaker.clone()).map(|b| Breaker::new(spec.name.clone(), b)),
            hedger: (spec.hedge.clone()).map(|h| Hedger::new(h, spec.retry.is_none())),
            cache: (spec.cache.clone())
                .map(|c| ResponseCache::new(&spec.name, c, store, upstream_identity(&spec))),
            spec,
            client,
            metrics,
        })
    }

    pub fn name(&self) -> &Arc<str> {
        &self.spec.name
    }

    /// Calls the source, sharing the request with identical calls in flight
    /// when it coalesces: the upstream's answer and the requests sent, and
    /// whether it was shared.
    async fn fetch_live(
        self: &Arc<Self>,
        prepared: Prepared,
        deadline: Deadline,
    ) -> (Result<Answer, SourceError>, u32, bool) {
        let Some(coalescer) = &self.coalescer else {
            let (result, sent) = self.call(prepared, deadline).await;
            return (result, sent, false);
        };
        let key = prepared.key();
        let source = self.clone();
        let start = move |deadline| async move { source.call(prepared, deadline).await };
        let t0 = Instant::now();
        let ((result, sent), role) = coalescer.call(&key, deadline, start).await;
        if role == Role::Joined {
            self.metrics.coalesce_waited(t0.elapsed().as_secs_f64());
        }
        (result, sent, role == Role::Joined)
    }

    /// Runs the source's active health check, if it has one, every
    /// interval for as long as the returned future is polled, feeding the
    /// verdicts to its circuit breaker.
    pub async fn watch_health(self: Arc<Self>) {
        let (Some(check), Some(breaker)) = (&self.spec.health_check, &self.breaker) else {
            return;
        };
        let mut ticks = tokio::time::interval(check.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_healthy = true;
        loop {
            ticks.tick().await;
            let verdict = tokio::time::timeout(check.timeout, self.probe_health())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", check.timeout)));
            let healthy = verdict.is_ok();
            if healthy != was_healthy {
                match &verdict {
                    Ok(()) => tracing::info!(source = %self.spec.name, "health check passes again"),
                    Err(reason) => tracing::warn!(
                        source = %self.spec.name,
                        reason = %crate::error::truncate(reason, 512),
                        "health check failed: circuit open"
                    ),
                }
                was_healthy = healthy;
            }
            breaker.health(healthy);
        }
    }

    /// Requests holding a slot of its `max_concurrent` cap, if it has one.
    pub fn in_flight(&self) -> Option<usize> {
        self.bulkhead.as_ref().map(Bulkhead::in_flight)
    }

    /// The source's circuit breaker, if it has one.
    pub fn breaker(&self) -> Option<&Breaker> {
        self.breaker.as_ref()
    }

    /// Entries its response cache holds in this process, if it has one
    /// there.
    pub fn cache_entries(&self) -> Option<u64> {
        self.cache.as_ref()?.entries()
    }

    /// Counters of request coalescing, if the source coalesces.
    pub fn coalescing(&self) -> Option<crate::resilience::coalesce::Stats> {
        self.coalescer.as_ref().map(Coalescer::stats)
    }

    /// Sends the request, and again on the failures its retry policy allows.
    /// The source's own timeout, if shorter than the deadline, bounds all of
    /// it (dropping the future aborts the request on the wire). Returns the
    /// result and the number of requests sent.
    pub async fn call(
        &self,
        prepared: Prepared,
        deadline: Deadline,
    ) -> (Result<Answer, SourceError>, u32) {
        // An open circuit answers at once; the verdict on an admitted call
        // is recorded below, outside `send`, so a timeout counts too.
        let admission = match self.breaker.as_ref().map(Breaker::admit) {
            Some(Err(open)) => {
                self.metrics.skipped();
                let error = SourceError::CircuitOpen {
                    source_name: self.spec.name.clone(),
                    retry_in: open.retry_in,
                };
                return (Err(error), 0);
            }
            Some(Ok(admission)) => Some(admission),
            None => None,
        };
        let own = self.spec.timeout.filter(|t| *t < deadline.remaining());
        let deadline = own.map_or(deadline, |t| deadline.cap(t));
        // Outlives `send`, which the source's timeout may drop mid-attempt.
        let sent = AtomicU32::new(0);
        let send = async {
            // Waiting for a slot counts against the source's time; the slot
            // is held until the response is read or the call is dropped.
            let _slot = match &self.bulkhead {
                Some(b) => Some(b.enter(deadline).await.map_err(|full| {
                    self.metrics.shed();
                    SourceError::Overloaded(full)
                })?),
                None => None,
            };
            if let Some(hedger) = &self.hedger {
                hedger.deposit();
            }
            let Some(retrier) = &self.retry else {
                return self.attempt(prepared, deadline, &sent).await;
            };
            let mut attempts = retrier.start();
            let mut prepared = Some(prepared);
            loop {
                attempts.sending();
                // Keep the request while a failure could still be retried.
                let request = match attempts.may_retry() {
                    true => prepared.clone(),
                    false => prepared.take(),
                }
                .expect("kept until the last attempt");
                let t0 = Instant::now();
                let error = match self.attempt(request, deadline, &sent).await {
                    Ok(value) => return Ok(value),
                    Err(error) => error,
                };
                match attempts.after_failure(&error, t0.elapsed(), deadline, fastrand::f64()) {
                    Decision::RetryAfter(wait) => {
                        self.metrics.retried();
                        tracing::debug!(source = %self.spec.name, attempt = attempts.sent(), ?wait, %error, "retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Decision::Stop(why) => {
                        tracing::debug!(source = %self.spec.name, attempts = attempts.sent(), ?why, %error, "not retrying");
                        return Err(error);
                    }
                }
            }
        };
        let result = match own {
            None => send.await,
            Some(t) => tokio::time::timeout_at(deadline.instant(), send)
                .await
                .unwrap_or(Err(SourceError::Timeout(t))),
        };
        let result = match (own, result) {
            // A gRPC channel enforces the budget it forwards, so its failure
            // may win the race against our timer: it is still this timeout.
            (Some(t), Err(_)) if deadline.is_expired() => Err(SourceError::Timeout(t)),
            (_, result) => result,
        };
        if let (Some(breaker), Some(admission)) = (&self.breaker, admission) {
            match &result {
                Ok(_) => breaker.record(admission, true),
                Err(e) if e.is_upstream_fault() => breaker.record(admission, false),
                // Not the upstream's doing: no verdict.
                Err(_) => drop(admission),
            }
        }
        (result, sent.into_inner())
    }

    /// One attempt: one request, or two when the source hedges and the
    /// first is slow; the first good answer wins and dropping the other
    /// cancels it. Counts what it sends in `sent`.
    async fn attempt(
        &self,
        request: Prepared,
        deadline: Deadline,
        sent: &AtomicU32,
    ) -> Result<Answer, SourceError> {
        let attempt = sent.fetch_add(1, Relaxed) + 1;
        match self.hedger.as_ref().and_then(|h| Some((h, h.delay()?))) {
            None => self.send(request, deadline, attempt).await,
            // Boxed: two requests' futures at once would otherwise weigh on
            // every call in flight, hedged or not.
            Some((hedger, delay)) => {
                Box::pin(self.hedged(hedger, delay, request, deadline, sent)).await
            }
        }
    }

    async fn hedged(
        &self,
        hedger: &Hedger,
        delay: Duration,
        request: Prepared,
        deadline: Deadline,
        sent: &AtomicU32,
    ) -> Result<Answer, SourceError> {
        let t0 = Instant::now();
        let first = self.send(request.clone(), deadline, sent.load(Relaxed));
        tokio::pin!(first);
        let result = tokio::select! {
            biased;
            result = &mut first => result,
            // Never a hedge that could not answer before the deadline.
            () = tokio::time::sleep(delay), if delay < deadline.remaining() => {
                let shared = self.retry.as_ref().map(Retrier::budget);
                if hedger.withdraw(shared) {
                    let attempt = sent.fetch_add(1, Relaxed) + 1;
                    self.metrics.hedged();
                    tracing::debug!(source = %self.spec.name, ?delay, "hedging");
                    let second = self.send(request, deadline, attempt);
                    tokio::pin!(second);
                    tokio::select! {
                        result = &mut first => match result {
                            Ok(value) => Ok(value),
                            Err(_) => second.await,
                        },
                        result = &mut second => match result {
                            Ok(value) => Ok(value),
                            Err(_) => first.await,
                        },
                    }
                } else {
                    first.await
                }
            }
        };
        if result.is_ok() {
            hedger.observe(t0.elapsed());
        }
        result
    }
}
