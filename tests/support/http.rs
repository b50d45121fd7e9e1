//! An HTTP/1.1 + HTTP/2 upstream that answers every request the same way.

use std::{convert::Infallible, sync::Arc, time::Duration};

use aggregator::server::{ConnPolicy, accept_loop};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Gate, Log, Running, Seen, listen, log::PerConnection};

/// An HTTP/1.1 + HTTP/2 upstream answering every request the same way.
#[derive(Clone)]
pub struct HttpUpstream {
    delay: Duration,
    status: StatusCode,
    body: Bytes,
    /// Never answer (the handler waits until the client goes away).
    hang: bool,
    /// The first `.0` requests get status `.1`, with `Retry-After: .2` if set.
    fail_first: Option<(u32, StatusCode, Option<&'static str>)>,
    /// The first `.0` requests take `.1` instead of `delay`.
    slow_first: Option<(u32, Duration)>,
    /// Served by a runtime of its own, on its own thread.
    own_thread: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
    gate: Option<Gate>,
    /// Requests up to this one pass the gate without waiting.
    gate_after: u32,
    /// Added to every response.
    headers: Vec<(&'static str, &'static str)>,
    /// Answers each request by its path and query and its body.
    handler: Option<Handler>,
}

/// An answer made from the request's path and query and its body: status, JSON.
pub type Handler = Arc<dyn Fn(&str, &[u8]) -> (u16, serde_json::Value) + Send + Sync>;

impl Default for HttpUpstream {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            status: StatusCode::OK,
            body: Bytes::from_static(br#"{"ok":true}"#),
            hang: false,
            fail_first: None,
            slow_first: None,
            own_thread: false,
            tls: None,
            gate: None,
            gate_after: 0,
            headers: Vec::new(),
            handler: None,
        }
    }
}

impl HttpUpstream {
    /// Serves from a single-threaded runtime of its own, as a separate
    /// process would: it sees its connections' events in the order they
    /// arrive (a closed connection before a new one), whatever load the
    /// test's own runtime is under.
    pub fn on_its_own_thread(mut self) -> Self {
        self.own_thread = true;
        self
    }

    /// Serve over TLS with this config.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = StatusCode::from_u16(status).unwrap();
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    pub fn json(self, value: serde_json::Value) -> Self {
        self.body(value.to_string())
    }

    pub fn hang(mut self) -> Self {
        self.hang = true;
        self
    }

    /// The first `n` requests take `delay` (the rest the usual delay).
    pub fn slow_first(mut self, n: u32, delay: Duration) -> Self {
        self.slow_first = Some((n, delay));
        self
    }

    /// Answers the first `n` requests with `status` (and `Retry-After`).
    pub fn fail_first(mut self, n: u32, status: u16, retry_after: Option<&'static str>) -> Self {
        self.fail_first = Some((n, StatusCode::from_u16(status).unwrap(), retry_after));
        self
    }

    /// Answers each request with what `f` makes of its path and body (the
    /// body is read first, and recorded).
    pub fn answer_with(
        mut self,
        f: impl Fn(&str, &[u8]) -> (u16, serde_json::Value) + Send + Sync + 'static,
    ) -> Self {
        self.handler = Some(Arc::new(f));
        self
    }

    /// Holds each request at `gate`, as [`super::GrpcUpstream::gated`] does.
    pub fn gated(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }

    /// Holds every request after the first `n` at `gate`.
    pub fn gated_after(mut self, n: u32, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self.gate_after = n;
        self
    }

    /// Adds `name: value` to every response.
    pub fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    pub async fn start(self) -> Running {
        let (listener, addr) = listen().await;
        let log = Log::default();
        let stop = CancellationToken::new();
        let own_thread = self.own_thread;
        let policy = ConnPolicy {
            tls: self.tls.clone(),
            ..ConnPolicy::default()
        };
        let behaviour = Arc::new(self);
        let handler_log = log.clone();
        let service = TowerToHyperService::new(tower::service_fn(move |req: Request<Incoming>| {
            let (behaviour, log) = (behaviour.clone(), handler_log.clone());
            async move {
                let target = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                let headers = req.headers().clone();
                let version = req.version();
                let body = match &behaviour.handler {
                    Some(_) => match http_body_util::BodyExt::collect(req.into_body()).await {
                        Ok(body) => body.to_bytes(),
                        Err(_) => Bytes::new(),
                    },
                    None => Bytes::new(),
                };
                let answer = (behaviour.handler.as_ref()).map(|handler| handler(&target, &body));
                let in_flight = log.start(Seen {
                    target,
                    headers,
                    body,
                    version,
                });
                let nth = log.stats().started;
                if let Some(gate) = &behaviour.gate {
                    if nth > behaviour.gate_after {
                        gate.pass().await;
                    }
                }
                if behaviour.hang {
                    std::future::pending::<()>().await;
                }
                let delay = match behaviour.slow_first {
                    Some((n, slow)) if nth <= n => slow,
                    _ => behaviour.delay,
                };
                tokio::time::sleep(delay).await;
                in_flight.finish();
                let mut response = Response::new(Full::new(behaviour.body.clone()));
                *response.status_mut() = behaviour.status;
                for (name, value) in &behaviour.headers {
                    response
                        .headers_mut()
                        .append(*name, http::HeaderValue::from_static(value));
                }
                if let Some((status, json)) = answer {
                    *response.body_mut() = Full::new(Bytes::from(json.to_string()));
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                }
                if let Some((n, status, retry_after)) = behaviour.fail_first {
                    if nth <= n {
                        *response.status_mut() = status;
                        if let Some(value) = retry_after {
                            response.headers_mut().insert(
                                http::header::RETRY_AFTER,
                                http::HeaderValue::from_static(value),
                            );
                        }
                    }
                }
                Ok::<_, Infallible>(response)
            }
        }));
        let server = auto::Builder::new(TokioExecutor::new());
        let stopped = stop.clone().cancelled_owned();
        let conn_log = log.clone();
        let serve = move |listener| {
            accept_loop(
                listener,
                policy,
                move |io, _| {
                    let service = PerConnection {
                        inner: service.clone(),
                        _open: Arc::new(conn_log.connection(io.io())),
                    };
                    server
                        .serve_connection(TokioIo::new(io), service)
                        .into_owned()
                },
                stopped,
                Duration::ZERO,
            )
        };
        if own_thread {
            let listener = listener.into_std().unwrap();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    serve(TcpListener::from_std(listener).unwrap()).await;
                });
            });
        } else {
            tokio::spawn(serve(listener));
        }
        Running { addr, log, stop }
    }
}
