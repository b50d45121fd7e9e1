//! Real servers for end-to-end tests, each on its own `127.0.0.1:0` port:
//! configurable gRPC and HTTP upstreams that record what they saw (requests,
//! `grpc-timeout`, cancellations), and a gateway started through
//! `server::run` exactly as the binary does.

#![allow(dead_code)]

pub mod raw;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use aggregator::{
    config::Config,
    pb::{
        DEMO_DESCRIPTOR,
        aggregator::v1::aggregator_client::AggregatorClient,
        demo::v1::{
            GetProfileRequest, Profile,
            profiles_server::{Profiles, ProfilesServer},
        },
    },
    server::{ConnPolicy, H2Limits, accept_loop, serve_h2},
};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Code, service::Routes, transport::Channel};

/// What an upstream saw. Cheap to clone; every clone observes the same counts.
#[derive(Clone, Default)]
pub struct Log {
    stats: Arc<watch::Sender<Stats>>,
    requests: Arc<Mutex<Vec<Seen>>>,
    /// Every HTTP path a gRPC upstream was asked for, reflection included.
    paths: Arc<Mutex<Vec<String>>>,
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

    fn start(&self, seen: Seen) -> InFlight {
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
    fn connection(&self, io: &aggregator::server::conn::ConnIo) -> OpenConnection {
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
struct OpenConnection(Log, Arc<ConnEntry>);

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
struct PerConnection<S> {
    inner: S,
    _open: Arc<OpenConnection>,
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
struct InFlight {
    log: Log,
    done: bool,
}

impl InFlight {
    fn finish(mut self) {
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

/// A `demo.v1.Profiles` upstream with reflection.
#[derive(Clone, Default)]
pub struct GrpcUpstream {
    delay: Duration,
    fail: Option<(Code, String)>,
    /// Only the first this many requests fail (with `fail`); 0 = all.
    fail_first: u32,
    no_reflection: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl GrpcUpstream {
    /// Serve over TLS with this config (its ALPN should offer h2).
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn fail_with(mut self, code: Code, message: &str) -> Self {
        self.fail = Some((code, message.to_owned()));
        self
    }

    /// Fails the first `n` requests with `code`, then answers normally.
    pub fn fail_first(mut self, n: u32, code: Code) -> Self {
        self.fail = Some((code, format!("failing the first {n} requests")));
        self.fail_first = n;
        self
    }

    /// Serve without reflection (the gateway must be given descriptors).
    pub fn without_reflection(mut self) -> Self {
        self.no_reflection = true;
        self
    }

    pub async fn start(self) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Log::default();
        let stop = CancellationToken::new();
        let no_reflection = self.no_reflection;
        let policy = ConnPolicy {
            tls: self.tls.clone(),
            ..ConnPolicy::default()
        };
        let routes = Routes::new(ProfilesServer::new(TestProfiles {
            behaviour: self,
            log: log.clone(),
        }));
        let routes = with_health_and_reflection(routes, no_reflection).await;
        let (routes, paths) = (routes.prepare(), log.paths.clone());
        let service = tower::service_fn(move |req: Request<Incoming>| {
            paths.lock().unwrap().push(req.uri().path().to_owned());
            let mut routes = routes.clone();
            async move { tower::Service::call(&mut routes, req).await }
        });
        tokio::spawn(serve_h2(
            listener,
            service,
            H2Limits::default(),
            policy,
            stop.clone().cancelled_owned(),
            Duration::ZERO,
        ));
        Running { addr, log, stop }
    }
}

/// `grpc.health.v1` (SERVING for `demo.v1.Profiles`) and, unless told not
/// to, reflection next to the upstream's own service.
async fn with_health_and_reflection(mut routes: Routes, no_reflection: bool) -> Routes {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("demo.v1.Profiles", tonic_health::ServingStatus::Serving)
        .await;
    routes = routes.add_service(health);
    if !no_reflection {
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(DEMO_DESCRIPTOR)
            .build_v1()
            .unwrap();
        routes = routes.add_service(reflection);
    }
    routes
}

struct TestProfiles {
    behaviour: GrpcUpstream,
    log: Log,
}

#[tonic::async_trait]
impl Profiles for TestProfiles {
    async fn get_profile(
        &self,
        request: tonic::Request<GetProfileRequest>,
    ) -> Result<tonic::Response<Profile>, tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        let user_id = request.into_inner().user_id;
        let in_flight = self.log.start(Seen {
            target: user_id.clone(),
            headers,
        });
        let nth = self.log.stats().started;
        tokio::time::sleep(self.behaviour.delay).await;
        in_flight.finish();
        let failing = self.behaviour.fail_first == 0 || nth <= self.behaviour.fail_first;
        if let Some((code, message)) = self.behaviour.fail.as_ref().filter(|_| failing) {
            return Err(tonic::Status::new(*code, message.clone()));
        }
        Ok(tonic::Response::new(Profile {
            name: format!("name-{user_id}"),
            email: format!("{user_id}@example.com"),
            user_id,
        }))
    }
}

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
}

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

    pub async fn start(self) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
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
                let in_flight = log.start(Seen {
                    target: req
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    headers: req.headers().clone(),
                });
                if behaviour.hang {
                    std::future::pending::<()>().await;
                }
                let nth = log.stats().started;
                let delay = match behaviour.slow_first {
                    Some((n, slow)) if nth <= n => slow,
                    _ => behaviour.delay,
                };
                tokio::time::sleep(delay).await;
                in_flight.finish();
                let mut response = Response::new(Full::new(behaviour.body.clone()));
                *response.status_mut() = behaviour.status;
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

/// A TCP server that accepts and writes `reply` (e.g. garbage, or nothing)
/// then closes: for upstreams that reset or speak the wrong protocol.
pub async fn raw_tcp(reply: &'static [u8]) -> Running {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Ok((mut stream, _)) = listener.accept() => {
                    let _ = stream.write_all(reply).await;
                    drop(stream);
                }
                () = token.cancelled() => break,
            }
        }
    });
    Running {
        addr,
        log: Log::default(),
        stop,
    }
}

/// An address nothing listens on (bound, then released).
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A gateway served by `server::run` on its own port; stops when dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    reloads: tokio::sync::mpsc::Sender<aggregator::server::Reload>,
}

impl Gateway {
    /// Parses `toml` (relative paths resolve from the crate root) and serves it.
    pub async fn start(toml: &str) -> Self {
        let config = Config::parse(toml, "test config", Path::new(env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("{e}"));
        Self::start_config(config).await
    }

    pub async fn start_config(config: Config) -> Self {
        Self::serve(config, None).await
    }

    /// Also serves Prometheus metrics; returns their address.
    pub async fn start_with_metrics(toml: &str) -> (Self, SocketAddr) {
        let config = Config::parse(toml, "test config", Path::new(env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("{e}"));
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = metrics.local_addr().unwrap();
        (Self::serve(config, Some(metrics)).await, addr)
    }

    async fn serve(config: Config, metrics: Option<TcpListener>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (reloads, received) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(
            aggregator::server::run_with(
                listener,
                metrics,
                config,
                stop.clone().cancelled_owned(),
                Some(received),
            )
            .map(|r| r.expect("server failed")),
        );
        Self {
            addr,
            stop,
            task: Some(task),
            reloads,
        }
    }

    /// Puts `toml` in force as SIGHUP would (or fails to, if it is not a
    /// valid config); returns once the server has applied or refused it.
    pub async fn reload(&self, toml: &str) -> Result<(), String> {
        let config = Config::parse(toml, "test config", Path::new(env!("CARGO_MANIFEST_DIR")));
        let (done, outcome) = tokio::sync::oneshot::channel();
        let reload = aggregator::server::Reload {
            config,
            done: Some(done),
        };
        self.reloads.send(reload).await.expect("the server stopped");
        outcome.await.expect("the server dropped the reload")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> AggregatorClient<Channel> {
        AggregatorClient::new(self.channel().await)
    }

    /// A client that sends `grpc-timeout` but does not enforce it itself:
    /// tonic's `Channel` answers CANCELLED locally when the deadline passes,
    /// which would hide what the gateway answers.
    pub fn lenient_client(&self) -> AggregatorClient<Client<HttpConnector, tonic::body::Body>> {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        AggregatorClient::with_origin(client, self.endpoint().parse().unwrap())
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        self.stop.cancel();
        self.task.take().unwrap().await.unwrap();
    }

    pub fn signal_stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

use futures_util::FutureExt;

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

/// Params from pairs.
pub fn params(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The gateway binary run as a child process with a config file, its
/// address read from its own "aggregator ready" log line. Killed on drop.
pub struct Process {
    pub addr: SocketAddr,
    child: tokio::process::Child,
    /// Every line it wrote to stderr, as it comes.
    lines: Arc<Mutex<Vec<String>>>,
    line_added: Arc<tokio::sync::Notify>,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("aggregator-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Process {
    /// Writes `toml` to a file and runs `aggregator --config FILE` plus
    /// `args`, listening on a free port unless `toml` says otherwise.
    pub async fn start(toml: &str, args: &[&str]) -> Self {
        let dir = TempDir::new();
        let path = dir.0.join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_aggregator"));
        command
            .arg("--config")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0"])
            .args(args);
        Self::spawn(command, dir).await
    }

    /// Starts the binary with exactly `args` (no config written), waiting
    /// for it to be ready.
    pub async fn start_with_args(args: &[&str]) -> Self {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_aggregator"));
        command.args(args);
        Self::spawn(command, TempDir::new()).await
    }

    /// Writes `toml` to a file; its path, and the directory that holds it.
    pub fn config_file(toml: &str) -> (std::path::PathBuf, TempDir) {
        let dir = TempDir::new();
        let path = dir.0.join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        (path, dir)
    }

    /// Runs the binary with exactly `args` (no config written) to its end.
    pub async fn run(args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_aggregator"))
            .args(args)
            .env("RUST_LOG", "info")
            .output()
            .await
            .unwrap()
    }

    async fn spawn(mut command: tokio::process::Command, dir: TempDir) -> Self {
        use tokio::io::AsyncBufReadExt;
        command
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let line_added = Arc::new(tokio::sync::Notify::new());
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let (sink, added) = (lines.clone(), line_added.clone());
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                sink.lock().unwrap().push(line);
                added.notify_waiters();
            }
        });
        let mut process = Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            child,
            lines,
            line_added,
            _dir: dir,
        };
        let ready = process
            .wait_for_line(Duration::from_secs(60), |l| l.contains("aggregator ready"))
            .await
            .unwrap_or_else(|| panic!("the gateway never got ready:\n{}", process.stderr()));
        // `addr=...` in text, `"addr":"..."` in JSON.
        let addr = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .or_else(|| ready.split("\"addr\":\"").nth(1)?.split('"').next())
            .unwrap_or_else(|| panic!("no addr in {ready:?}"));
        process.addr = addr.parse().unwrap();
        process
    }

    /// Waits until a line of its stderr satisfies `cond`; returns it.
    pub async fn wait_for_line(
        &self,
        within: Duration,
        mut cond: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        self.wait_until(within, |lines| lines.iter().find(|l| cond(l)).cloned())
            .await
    }

    /// Waits until `n` lines of its stderr satisfy `cond`.
    pub async fn wait_for_lines(
        &self,
        within: Duration,
        n: usize,
        mut cond: impl FnMut(&str) -> bool,
    ) -> bool {
        let enough =
            |lines: &[String]| (lines.iter().filter(|l| cond(l)).count() >= n).then_some(());
        self.wait_until(within, enough).await.is_some()
    }

    async fn wait_until<T>(
        &self,
        within: Duration,
        mut found: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        let search = async {
            loop {
                // Created before looking: a line added meanwhile still wakes it.
                let added = self.line_added.notified();
                if let Some(found) = found(&self.lines.lock().unwrap()) {
                    return found;
                }
                added.await;
            }
        };
        tokio::time::timeout(within, search).await.ok()
    }

    /// All it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> AggregatorClient<Channel> {
        let channel = Channel::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap();
        AggregatorClient::new(channel)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal named `name` (`TERM`, `HUP`...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The config file it was started with (by [`Process::start`]).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.0.join("gateway.toml")
    }

    /// Waits for it to exit; returns its exit code.
    pub async fn wait(&mut self, within: Duration) -> Option<i32> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the gateway did not exit in time")
            .unwrap();
        status.code()
    }
}

/// A TCP proxy in front of `target` that forwards what clients send at once
/// but reads the target's answers slowly through a small receive buffer, so
/// that the target's socket send queue stays full: what a slow or distant
/// client looks like from the server.
pub async fn slow_reader_proxy(target: SocketAddr) -> Running {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            let (client, _) = tokio::select! {
                accepted = listener.accept() => accepted.unwrap(),
                () = token.cancelled() => return,
            };
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let Ok(server) = socket.connect(target).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                let _ = server_write.shutdown().await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // Pass a reset on as a reset, so the client sees what the
                // server did.
                let _ = client_write.shutdown().await;
            });
        }
    });
    Running {
        addr,
        log: Log::default(),
        stop,
    }
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

impl GrpcUpstream {
    /// Like `start`, but each request, once it has reached the handler (it
    /// counts in `started` and `in_flight`), waits for `gate` to open before
    /// its delay and its answer.
    pub async fn start_gated(self, gate: &Gate) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Log::default();
        let stop = CancellationToken::new();
        let no_reflection = self.no_reflection;
        let routes = Routes::new(ProfilesServer::new(GatedProfiles {
            behaviour: self,
            log: log.clone(),
            gate: gate.clone(),
        }));
        let routes = with_health_and_reflection(routes, no_reflection).await;
        tokio::spawn(serve_h2(
            listener,
            routes.prepare(),
            H2Limits::default(),
            ConnPolicy::default(),
            stop.clone().cancelled_owned(),
            Duration::ZERO,
        ));
        Running { addr, log, stop }
    }
}

/// `TestProfiles` behind a gate.
struct GatedProfiles {
    behaviour: GrpcUpstream,
    log: Log,
    gate: Gate,
}

#[tonic::async_trait]
impl Profiles for GatedProfiles {
    async fn get_profile(
        &self,
        request: tonic::Request<GetProfileRequest>,
    ) -> Result<tonic::Response<Profile>, tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        let user_id = request.into_inner().user_id;
        let in_flight = self.log.start(Seen {
            target: user_id.clone(),
            headers,
        });
        let nth = self.log.stats().started;
        self.gate.pass().await;
        tokio::time::sleep(self.behaviour.delay).await;
        in_flight.finish();
        let failing = self.behaviour.fail_first == 0 || nth <= self.behaviour.fail_first;
        if let Some((code, message)) = self.behaviour.fail.as_ref().filter(|_| failing) {
            return Err(tonic::Status::new(*code, message.clone()));
        }
        Ok(tonic::Response::new(Profile {
            name: format!("name-{user_id}"),
            email: format!("{user_id}@example.com"),
            user_id,
        }))
    }
}

impl HttpUpstream {
    /// Like `start`, but each request, once it has reached the handler (it
    /// counts in `started` and `in_flight`), waits for `gate` to open before
    /// its delay and its answer.
    pub async fn start_gated(self, gate: &Gate) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Log::default();
        let stop = CancellationToken::new();
        let behaviour = Arc::new(self);
        let handler_log = log.clone();
        let gate = gate.clone();
        let service = TowerToHyperService::new(tower::service_fn(move |req: Request<Incoming>| {
            let (behaviour, log, gate) = (behaviour.clone(), handler_log.clone(), gate.clone());
            async move {
                let in_flight = log.start(Seen {
                    target: req
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    headers: req.headers().clone(),
                });
                let nth = log.stats().started;
                gate.pass().await;
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
        tokio::spawn(accept_loop(
            listener,
            ConnPolicy::default(),
            move |io, _| {
                server
                    .serve_connection(TokioIo::new(io), service.clone())
                    .into_owned()
            },
            stop.clone().cancelled_owned(),
            Duration::ZERO,
        ));
        Running { addr, log, stop }
    }
}

/// An address that refuses connections for as long as the returned socket
/// lives: bound but not listening, so that no server of a test running at
/// the same time can be given the port (as may happen once `refused_addr`
/// has released it).
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A gRPC upstream that answers every call with `message` (protobuf bytes,
/// whatever the method), counting the calls it got.
pub async fn grpc_answering(message: Bytes) -> Running {
    use http_body_util::{BodyExt, StreamBody};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Log::default();
    let stop = CancellationToken::new();
    let handler_log = log.clone();
    let service = tower::service_fn(move |req: Request<Incoming>| {
        let (log, message) = (handler_log.clone(), message.clone());
        async move {
            log.start(Seen {
                target: req.uri().path().to_owned(),
                headers: req.headers().clone(),
            })
            .finish();
            let mut framed = Vec::with_capacity(message.len() + 5);
            framed.push(0);
            framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
            framed.extend_from_slice(&message);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = [
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(framed))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
            let response = Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    tokio::spawn(serve_h2(
        listener,
        service,
        H2Limits::default(),
        ConnPolicy::default(),
        stop.clone().cancelled_owned(),
        Duration::ZERO,
    ));
    Running { addr, log, stop }
}

/// A throwaway PKI written to a directory: a CA, a server certificate for
/// `localhost`, `127.0.0.1` and `upstream.test`, a client certificate, and a
/// second CA that signed nothing of these.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let dir = TempDir::new();
        let write = |name: &str, text: String| std::fs::write(dir.0.join(name), text).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "aggregator test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        write("ca.crt", ca_cert.pem());
        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        other
            .distinguished_name
            .push(rcgen::DnType::CommonName, "some other CA");
        write("other-ca.crt", other.self_signed(&other_key).unwrap().pem());
        let server_key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "upstream.test".to_owned()])
                .unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
        write("server.crt", server_cert.pem());
        write("server.key", server_key.serialize_pem());
        let client_key = KeyPair::generate().unwrap();
        let client = CertificateParams::new(vec!["client".to_owned()]).unwrap();
        let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key).unwrap();
        write("client.crt", client_cert.pem());
        write("client.key", client_key.serialize_pem());
        Self { dir }
    }

    /// A file's absolute path, for configs.
    pub fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.0.join(name)).unwrap()
    }

    /// A server config with the server certificate, offering `alpn`; with a
    /// client CA when clients must present a certificate.
    pub fn server_config(&self, alpn: &[&str], require_client: bool) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&self.read("server.crt"))
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&self.read("server.key")).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(&self.read("ca.crt")) {
                roots.add(ca.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(certs, key).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

/// `GET /metrics` at `addr`, with `Accept: accept` when given: the content
/// type and the body.
pub async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    use http_body_util::BodyExt;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::get(format!("http://{addr}/metrics"));
    if let Some(accept) = accept {
        request = request.header(http::header::ACCEPT, accept);
    }
    let response = client
        .request(request.body(Full::default()).unwrap())
        .await
        .unwrap();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (content_type, String::from_utf8(body.to_vec()).unwrap())
}

/// The value of the sample `name{labels}` (labels exactly as written), if any.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// An OTLP/gRPC trace receiver (the collector's own service, from the
/// `opentelemetry-proto` types) that keeps every span it is sent.
pub struct Collector {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
    stop: CancellationToken,
}

impl Collector {
    pub async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let service = Routes::new(TraceServiceServer::new(Receiver(spans.clone()))).prepare();
        tokio::spawn(serve_h2(
            listener,
            service,
            H2Limits::default(),
            ConnPolicy::default(),
            stop.clone().cancelled_owned(),
            Duration::ZERO,
        ));
        Self { addr, spans, stop }
    }

    pub fn spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.spans.lock().unwrap().clone()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Receiver(Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Receiver
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// A gRPC upstream that takes every call and never answers, counting the
/// paths it is asked for (its reflection service hangs too).
pub async fn grpc_hanging() -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Log::default();
    let stop = CancellationToken::new();
    let paths = log.paths.clone();
    let service = tower::service_fn(move |req: Request<Incoming>| {
        paths.lock().unwrap().push(req.uri().path().to_owned());
        async move {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    });
    tokio::spawn(serve_h2(
        listener,
        service,
        H2Limits::default(),
        ConnPolicy::default(),
        stop.clone().cancelled_owned(),
        Duration::ZERO,
    ));
    Running { addr, log, stop }
}
