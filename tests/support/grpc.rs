//! gRPC upstreams: `demo.v1.Profiles` with health and reflection, and raw
//! ones that answer fixed bytes or never answer.

use std::{convert::Infallible, sync::Arc, time::Duration};

use aggregator::{
    pb::{
        DEMO_DESCRIPTOR,
        demo::v1::{
            GetProfileRequest, Profile,
            profiles_server::{Profiles, ProfilesServer},
        },
    },
    server::ConnPolicy,
};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tonic::{Code, service::Routes};

use super::{Gate, Log, Running, Seen, listen, spawn_h2};

/// A `demo.v1.Profiles` upstream with reflection.
#[derive(Clone, Default)]
pub struct GrpcUpstream {
    delay: Duration,
    fail: Option<(Code, String)>,
    /// Only the first this many requests fail (with `fail`); 0 = all.
    fail_first: u32,
    no_reflection: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
    gate: Option<Gate>,
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

    /// Each request, once it has reached the handler (it counts in
    /// `started` and `in_flight`), waits for `gate` to open before its delay
    /// and its answer.
    pub fn gated(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }

    pub async fn start(self) -> Running {
        let (listener, addr) = listen().await;
        let log = Log::default();
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
        let stop = spawn_h2(listener, service, policy);
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
            body: Bytes::new(),
            version: http::Version::HTTP_2,
        });
        let nth = self.log.stats().started;
        if let Some(gate) = &self.behaviour.gate {
            gate.pass().await;
        }
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

/// A gRPC upstream that answers every call with `message` (protobuf bytes,
/// whatever the method), counting the calls it got.
pub async fn grpc_answering(message: Bytes) -> Running {
    use http_body_util::{BodyExt, StreamBody};
    let (listener, addr) = listen().await;
    let log = Log::default();
    let handler_log = log.clone();
    let service = tower::service_fn(move |req: Request<Incoming>| {
        let (log, message) = (handler_log.clone(), message.clone());
        async move {
            log.start(Seen {
                target: req.uri().path().to_owned(),
                body: Bytes::new(),
                version: req.version(),
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
    let stop = spawn_h2(listener, service, ConnPolicy::default());
    Running { addr, log, stop }
}

/// A gRPC upstream that takes every call and never answers, counting the
/// paths it is asked for (its reflection service hangs too).
pub async fn grpc_hanging() -> Running {
    let (listener, addr) = listen().await;
    let log = Log::default();
    let paths = log.paths.clone();
    let service = tower::service_fn(move |req: Request<Incoming>| {
        paths.lock().unwrap().push(req.uri().path().to_owned());
        async move {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    });
    let stop = spawn_h2(listener, service, ConnPolicy::default());
    Running { addr, log, stop }
}
