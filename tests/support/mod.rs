//! Real servers for end-to-end tests, each on its own `127.0.0.1:0` port:
//! configurable gRPC and HTTP upstreams that record what they saw (requests,
//! `grpc-timeout`, cancellations), a gateway started through
//! `server::run_with` exactly as the binary does, the binary itself as a
//! child process, certificates, and telemetry receivers.

#![allow(dead_code)]

mod demo;
mod gateway;
mod grpc;
mod http;
mod log;
mod net;
mod pki;
mod process;
pub mod raw;
mod redis;
mod telemetry;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use self::{
    demo::Demo,
    gateway::Gateway,
    grpc::{GrpcUpstream, grpc_answering, grpc_hanging},
    http::HttpUpstream,
    log::{Log, Seen, Stats},
    net::{raw_tcp, refused_addr, refusing_addr, slow_reader_proxy},
    pki::Pki,
    process::{Process, TempDir},
    redis::{Backing, Redis},
    telemetry::{Collector, sample, scrape},
};

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use ::http::{Request, Response};
use aggregator::server::{ConnPolicy, H2Limits, serve_h2};
use bytes::Bytes;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A listener on a free port of 127.0.0.1, and its address.
async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Serves `service` over HTTP/2 on `listener` until the token is cancelled.
fn spawn_h2<S, B>(listener: TcpListener, service: S, policy: ConnPolicy) -> CancellationToken
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stop = CancellationToken::new();
    let shutdown = stop.clone().cancelled_owned();
    tokio::spawn(serve_h2(
        listener,
        service,
        H2Limits::default(),
        policy,
        shutdown,
        Duration::ZERO,
    ));
    stop
}

/// A running upstream; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub log: Log,
    stop: CancellationToken,
}

impl Running {
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub struct Upstream;

impl Upstream {
    pub fn grpc() -> GrpcUpstream {
        GrpcUpstream::default()
    }

    pub fn http() -> HttpUpstream {
        HttpUpstream::default()
    }
}

/// A request with a deadline, as a client sets it (`grpc-timeout`).
pub fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// `[sources.NAME]` for a gRPC upstream answering `demo.v1.Profiles/GetProfile`.
pub fn grpc_source(name: &str, upstream: &Running) -> String {
    format!(
        "[sources.{name}]\nkind = \"grpc\"\nendpoint = \"{}\"\nmethod = \"demo.v1.Profiles/GetProfile\"\nrequest = {{ user_id = \"{{user_id}}\" }}\n",
        upstream.grpc_endpoint()
    )
}

/// `[sources.NAME]` for an HTTP upstream at `path` (a URL template path).
pub fn http_source(name: &str, upstream: &Running, path: &str) -> String {
    format!(
        "[sources.{name}]\nkind = \"http\"\nurl = \"{}\"\n",
        upstream.url(path)
    )
}

/// `[aggregations.NAME]` over `sources`, with extra TOML lines appended.
pub fn aggregation(name: &str, sources: &[&str], extra: &str) -> String {
    let list: Vec<String> = sources.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[aggregations.{name}]\nsources = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// An `Aggregate` request for `aggregation` with `params`.
pub fn aggregate_request(
    aggregation: &str,
    pairs: &[(&str, &str)],
) -> aggregator::pb::aggregator::v1::AggregateRequest {
    aggregator::pb::aggregator::v1::AggregateRequest {
        aggregation: aggregation.into(),
        params: params(pairs),
        payload: None,
    }
}

/// A JSON document as a `payload`.
pub fn payload(json: serde_json::Value) -> Option<prost_types::Struct> {
    match aggregator::api::to_value(json).kind {
        Some(prost_types::value::Kind::StructValue(s)) => Some(s),
        other => panic!("a payload is an object, not {other:?}"),
    }
}

/// An answer's `google.protobuf.Struct` as JSON, to compare whole.
pub fn json_of(data: &prost_types::Struct) -> serde_json::Value {
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StructValue(data.clone())),
    };
    aggregator::api::from_value(value)
}

/// Params from pairs.
pub fn params(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Holds an upstream's answers until the test opens it, so that a test can
/// order events (this request is in flight before that one is answered)
/// without assuming how fast anything runs. Clones share one gate.
#[derive(Clone, Default)]
pub struct Gate(CancellationToken);

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets every held request go on, and every later one pass at once.
    pub fn open(&self) {
        self.0.cancel();
    }

    async fn pass(&self) {
        self.0.cancelled().await;
    }
}

/// Why `toml` is not a valid config (it must not be).
pub fn startup_error(toml: &str) -> String {
    match aggregator::config::Config::parse(toml, "test config", std::path::Path::new(".")) {
        Ok(_) => panic!("a valid config:\n{toml}"),
        Err(e) => e.to_string(),
    }
}
