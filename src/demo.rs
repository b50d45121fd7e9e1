//! The built-in demo upstreams: a gRPC `demo.v1.Profiles` (with reflection)
//! and, over HTTP, `GET /users/{user_id}/orders`, `GET /stock/{sku}` and
//! `POST /webhooks/{target}`, each answering after `delay`. Error paths can
//! be tried too: user `0` has no profile (gRPC NOT_FOUND), user `7`'s orders
//! are down (HTTP 503), and so is the webhook target `pager`.

use std::{convert::Infallible, future::Future, net::SocketAddr, path::Path, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::{
    config::{Config, ConfigError},
    pb::{
        DEMO_DESCRIPTOR,
        demo::v1::{
            GetProfileRequest, Profile,
            profiles_server::{Profiles, ProfilesServer},
        },
    },
    server::{ConnPolicy, H2Limits, accept_loop, serve_h2},
};

/// The commented example config, written for the demo upstreams.
pub const EXAMPLE_CONFIG: &str = include_str!("../examples/gateway.toml");
const EXAMPLE_GRPC: &str = "127.0.0.1:50061";
const EXAMPLE_HTTP: &str = "127.0.0.1:8081";

/// The example config pointed at demo upstreams listening on `grpc` and `http`.
pub fn config(grpc: SocketAddr, http: SocketAddr) -> Result<Config, ConfigError> {
    let text = EXAMPLE_CONFIG
        .replace(EXAMPLE_GRPC, &grpc.to_string())
        .replace(EXAMPLE_HTTP, &http.to_string());
    Config::parse(&text, "built-in demo config", Path::new("."))
}

/// Serves both demo upstreams until `shutdown`.
pub async fn serve(
    grpc: TcpListener,
    http: TcpListener,
    delay: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic_reflection::server::Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DEMO_DESCRIPTOR)
        .build_v1()?;
    let routes = Routes::new(ProfilesServer::new(DemoProfiles { delay }))
        .add_service(reflection)
        .prepare();
    let shutdown = futures_util::FutureExt::shared(Box::pin(shutdown));
    let drain = Duration::from_secs(1);
    let orders = TowerToHyperService::new(tower::service_fn(move |req| orders(req, delay)));
    let mut http_server = auto::Builder::new(TokioExecutor::new());
    // Over HTTP/2 (`http2 = true` sources) every call in flight shares one
    // connection, as for the gRPC upstream.
    http_server
        .http2()
        .max_concurrent_streams(UPSTREAM_H2.max_concurrent_streams);
    let policy = ConnPolicy::default();
    tokio::join!(
        // The gateway holds one connection per gRPC upstream; let it carry
        // every call in flight, as the benchmark's 10,000 do.
        serve_h2(
            grpc,
            routes,
            UPSTREAM_H2,
            policy.clone(),
            shutdown.clone(),
            drain
        ),
        accept_loop(
            http,
            policy,
            move |io, _| {
                http_server
                    .serve_connection(TokioIo::new(io), orders)
                    .into_owned()
            },
            shutdown,
            drain,
        ),
    );
    Ok(())
}

const UPSTREAM_H2: H2Limits = H2Limits {
    max_concurrent_streams: Some(100_000),
    connection_window: Some(16 << 20),
    keepalive: None,
};

/// Waits `duration` to within tens of microseconds. tokio's timer rounds up
/// to whole milliseconds, which would blur the benchmark's 5 ms upstreams by
/// up to 2 ms; async-io's timers fire from a timerfd.
async fn delay(duration: Duration) {
    if !duration.is_zero() {
        async_io::Timer::after(duration).await;
    }
}

struct DemoProfiles {
    delay: Duration,
}

const NAMES: [&str; 6] = ["Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret"];

fn seed(user_id: &str) -> usize {
    user_id
        .bytes()
        .fold(7usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
}

#[tonic::async_trait]
impl Profiles for DemoProfiles {
    async fn get_profile(
        &self,
        request: tonic::Request<GetProfileRequest>,
    ) -> Result<tonic::Response<Profile>, tonic::Status> {
        delay(self.delay).await;
        let user_id = request.into_inner().user_id;
        if user_id == "0" {
            return Err(tonic::Status::not_found("no user '0'"));
        }
        let name = NAMES[seed(&user_id) % NAMES.len()];
        Ok(tonic::Response::new(Profile {
            email: format!("{}@example.com", name.to_lowercase()),
            name: format!("{name} #{user_id}"),
            user_id,
        }))
    }
}

/// The largest webhook body the demo reads.
const MAX_WEBHOOK_BYTES: usize = 64 * 1024;

async fn orders(
    req: Request<Incoming>,
    delay: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    self::delay(delay).await;
    let path = req.uri().path().to_owned();
    let segment = |prefix: &str| {
        path.strip_prefix(prefix)
            .filter(|s| !s.is_empty() && !s.contains('/'))
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
    };
    if let Some(target) = segment("/webhooks/") {
        let body = http_body_util::Limited::new(req.into_body(), MAX_WEBHOOK_BYTES);
        let body = http_body_util::BodyExt::collect(body).await;
        let (status, answer) = match body {
            _ if target == "pager" => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "pager gateway unavailable"}),
            ),
            Ok(body) => (
                StatusCode::OK,
                serde_json::json!({"target": target, "accepted": true, "bytes": body.to_bytes().len()}),
            ),
            Err(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": "body too large"}),
            ),
        };
        return Ok(json_response(status, &answer));
    }
    if let Some(sku) = segment("/stock/") {
        let answer = serde_json::json!({"sku": sku, "available": seed(&sku) % 20});
        return Ok(json_response(StatusCode::OK, &answer));
    }
    let user = path
        .strip_prefix("/users/")
        .and_then(|rest| rest.strip_suffix("/orders"))
        .filter(|u| !u.is_empty() && !u.contains('/'))
        .map(|u| {
            percent_encoding::percent_decode_str(u)
                .decode_utf8_lossy()
                .into_owned()
        });
    let (status, body) = match user {
        // User 7's orders are "down", to show degradation and fail-fast.
        Some(user) if req.method() == http::Method::GET && user == "7" => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "orders store unavailable"}),
        ),
        Some(user) if req.method() == http::Method::GET => {
            // User 0 has no profile, and no orders.
            let count = if user == "0" { 0 } else { seed(&user) % 3 + 1 };
            let orders: Vec<_> = (1..=count)
                .map(|n| {
                    let sku = format!("sku-{}", (seed(&user) + n) % 50);
                    serde_json::json!({"id": format!("o-{n}"), "sku": sku, "total_cents": 1250 * n})
                })
                .collect();
            let body = serde_json::json!({"user_id": user, "orders": orders, "count": count});
            (StatusCode::OK, body)
        }
        _ => (
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ),
    };
    Ok(json_response(status, &body))
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
