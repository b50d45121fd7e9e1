//! Operating the gateway: health, reflection, graceful shutdown and the drain
//! timeout, the built-in demo, and the binary's refusal of bad configs.

mod support;

use std::time::Duration;

use aggregator::pb::aggregator::v1::{
    AggregateRequest, FetchAllRequest, Mode, aggregator_client::AggregatorClient,
};
use prost_types::{Struct, Value, value::Kind};
use support::*;
use tokio::time::Instant;
use tonic::{Code, Streaming};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};
use tonic_types::StatusExt;

const SERVICE: &str = "aggregator.v1.Aggregator";

/// Bounds every wait so a regression fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

fn health_request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

async fn next_status(watch: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    let response = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("a health update in time")
        .expect("the watch stream failed")
        .expect("the watch stream ended");
    ServingStatus::try_from(response.status).expect("a known serving status")
}

/// A gateway over one gRPC source `profile` in aggregation `dash`, with `server`
/// lines under `[server]`.
async fn gateway_over(upstream: &Running, server: &str, aggregation_extra: &str) -> Gateway {
    Gateway::start(&format!(
        "[server]\n{server}\n{}{}",
        grpc_source("profile", upstream),
        aggregation("dash", &["profile"], aggregation_extra)
    ))
    .await
}

fn dash_request(user_id: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: "dash".into(),
        params: params(&[("user_id", user_id)]),
    }
}

// ---- health ----

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_service() {
    let upstream = Upstream::grpc().start().await;
    let gateway = gateway_over(&upstream, "", "").await;
    let mut health = HealthClient::new(gateway.channel().await);
    for service in ["", SERVICE] {
        let response = health
            .check(health_request(service))
            .await
            .unwrap_or_else(|s| panic!("Check({service:?}): {s:?}"))
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "Check({service:?})"
        );
    }
    let unknown = health
        .check(health_request("no.such.Service"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    gateway.stop().await;
}

// ---- reflection ----

/// The same client calls for reflection v1 and v1alpha, whose messages are
/// identical but live in different modules.
macro_rules! reflection_client {
    ($version:ident) => {
        mod $version {
            use prost::Message;
            use prost_types::FileDescriptorProto;
            use tonic::transport::Channel;
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };

            /// One request, one response; a refusal may come as a status.
            async fn ask(
                channel: Channel,
                request: MessageRequest,
            ) -> Result<MessageResponse, tonic::Status> {
                let request = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(request),
                };
                let mut responses = ServerReflectionClient::new(channel)
                    .server_reflection_info(tokio_stream::iter(vec![request]))
                    .await?
                    .into_inner();
                let response = responses.message().await?.expect("one response");
                Ok(response.message_response.expect("a message response"))
            }

            pub async fn list_services(channel: Channel) -> Vec<String> {
                match ask(channel, MessageRequest::ListServices(String::new())).await {
                    Err(status) => panic!("ListServices: {status:?}"),
                    Ok(MessageResponse::ListServicesResponse(list)) => {
                        list.service.into_iter().map(|s| s.name).collect()
                    }
                    Ok(other) => panic!("expected a service list, got {other:?}"),
                }
            }

            /// The files, or the error code reflection answered with (as an
            /// error response or as the stream's status).
            pub async fn file_containing_symbol(
                channel: Channel,
                symbol: &str,
            ) -> Result<Vec<FileDescriptorProto>, i32> {
                match ask(
                    channel,
                    MessageRequest::FileContainingSymbol(symbol.to_owned()),
                )
                .await
                {
                    Ok(MessageResponse::FileDescriptorResponse(files)) => Ok(files
                        .file_descriptor_proto
                        .iter()
                        .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).unwrap())
                        .collect()),
                    Ok(MessageResponse::ErrorResponse(e)) => Err(e.error_code),
                    Ok(other) => panic!("expected files, got {other:?}"),
                    Err(status) => Err(status.code() as i32),
                }
            }
        }
    };
}

reflection_client!(v1);
reflection_client!(v1alpha);

fn defines_service(files: &[prost_types::FileDescriptorProto], package: &str, name: &str) -> bool {
    files
        .iter()
        .any(|f| f.package() == package && f.service.iter().any(|s| s.name() == name))
}

fn assert_lists(services: &[String], expected: &[&str]) {
    for name in expected {
        assert!(
            services.iter().any(|s| s == name),
            "{name} not in {services:?}"
        );
    }
}

#[tokio::test]
async fn reflection_v1_lists_and_describes_the_services() {
    let upstream = Upstream::grpc().start().await;
    let gateway = gateway_over(&upstream, "", "").await;
    let channel = gateway.channel().await;

    let services = v1::list_services(channel.clone()).await;
    assert_lists(
        &services,
        &[
            SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ],
    );
    let files = v1::file_containing_symbol(channel.clone(), SERVICE)
        .await
        .expect("a file for the service");
    assert!(
        defines_service(&files, "aggregator.v1", "Aggregator"),
        "{files:?}"
    );
    let files = v1::file_containing_symbol(channel.clone(), "grpc.health.v1.Health")
        .await
        .expect("a file for health");
    assert!(defines_service(&files, "grpc.health.v1", "Health"));
    let missing = v1::file_containing_symbol(channel, "no.such.Symbol").await;
    assert_eq!(missing.unwrap_err(), Code::NotFound as i32);
    gateway.stop().await;
}

#[tokio::test]
async fn reflection_v1alpha_lists_and_describes_the_services() {
    let upstream = Upstream::grpc().start().await;
    let gateway = gateway_over(&upstream, "", "").await;
    let channel = gateway.channel().await;

    let services = v1alpha::list_services(channel.clone()).await;
    assert_lists(
        &services,
        &[
            SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ],
    );
    let files = v1alpha::file_containing_symbol(channel.clone(), SERVICE)
        .await
        .expect("a file for the service");
    assert!(
        defines_service(&files, "aggregator.v1", "Aggregator"),
        "{files:?}"
    );
    let missing = v1alpha::file_containing_symbol(channel, "no.such.Symbol").await;
    assert_eq!(missing.unwrap_err(), Code::NotFound as i32);
    gateway.stop().await;
}

// ---- graceful shutdown ----

#[tokio::test]
async fn shutdown_reports_not_serving_and_drains_in_flight_calls() {
    // The call stays in flight until the gate opens, after shutdown began.
    let gate = Gate::new();
    let upstream = Upstream::grpc().gated(&gate).start().await;
    let gateway = gateway_over(&upstream, "drain_timeout = \"30s\"", "").await;
    let addr = gateway.addr;
    // One connection carries the health watches and the in-flight call.
    let channel = gateway.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let mut watches = Vec::new();
    let services = ["", SERVICE, "aggregator.v1.Aggregator/dash"];
    for service in services {
        let mut watch = health
            .watch(health_request(service))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
        watches.push(watch);
    }

    let mut client = AggregatorClient::new(channel.clone());
    let call = tokio::spawn(async move { client.aggregate(dash_request("7")).await });
    assert!(
        upstream.log.wait_for(PATIENCE, |s| s.started == 1).await,
        "the upstream never saw the call"
    );
    gateway.signal_stop();

    for (service, watch) in services.iter().zip(&mut watches) {
        assert_eq!(
            next_status(watch).await,
            ServingStatus::NotServing,
            "Watch({service:?}) while draining"
        );
    }
    // A watch never ends by itself; the client lets go so the connection can drain.
    drop(watches);
    assert_eq!(upstream.log.stats().in_flight(), 1, "drained nothing");
    gate.open();

    let response = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the in-flight call finished in time")
        .unwrap()
        .expect("the in-flight call completes OK")
        .into_inner();
    assert!(response.complete, "{response:?}");
    let profile = field(response.data.as_ref().unwrap(), "profile");
    assert_eq!(str_field(as_struct(profile), "user_id"), "7");
    assert_eq!(upstream.log.stats().finished, 1);
    assert_eq!(upstream.log.stats().cancelled, 0);

    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted after shutdown"
    );

    drop((health, channel));
    // Drained connections end `run` at once, well before the 30 s drain timeout.
    tokio::time::timeout(PATIENCE, gateway.stop())
        .await
        .expect("run returns once every connection has drained");
}

#[tokio::test]
async fn drain_timeout_bounds_shutdown() {
    let upstream = Upstream::grpc()
        .delay(Duration::from_secs(10))
        .start()
        .await;
    let gateway = gateway_over(&upstream, "drain_timeout = \"200ms\"", "timeout = \"30s\"").await;
    let mut client = gateway.client().await;
    let call = tokio::spawn(async move { client.aggregate(dash_request("7")).await });
    assert!(
        upstream.log.wait_for(PATIENCE, |s| s.started == 1).await,
        "the upstream never saw the call"
    );

    let started = Instant::now();
    tokio::time::timeout(PATIENCE, gateway.stop())
        .await
        .expect("run returns after the drain timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "returned before the drain timeout: {took:?}"
    );
    // The call would have been answered after 10 s.
    assert!(
        took < Duration::from_secs(5),
        "run waited for the call instead of the drain timeout: {took:?}"
    );

    let result = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the aborted call ends with its connection")
        .unwrap();
    assert!(
        result.is_err(),
        "an aborted call cannot succeed: {result:?}"
    );
    // Closing the connection drops the call, and with it the upstream request.
    // Answered, it would count as finished, never as cancelled.
    assert!(
        upstream.log.wait_for(PATIENCE, |s| s.cancelled == 1).await,
        "the upstream call outlived the gateway: {:?}",
        upstream.log.stats()
    );
}

// ---- the built-in demo ----

fn field<'a>(data: &'a Struct, name: &str) -> &'a Value {
    data.fields
        .get(name)
        .unwrap_or_else(|| panic!("no field `{name}` in {data:?}"))
}

fn as_struct(value: &Value) -> &Struct {
    match &value.kind {
        Some(Kind::StructValue(s)) => s,
        other => panic!("expected an object, got {other:?}"),
    }
}

fn str_field<'a>(data: &'a Struct, name: &str) -> &'a str {
    match &field(data, name).kind {
        Some(Kind::StringValue(s)) => s,
        other => panic!("`{name}`: expected a string, got {other:?}"),
    }
}

#[tokio::test]
async fn demo_dashboard_merges_profile_and_orders() {
    let demo = Demo::start().await;
    let response = demo
        .client()
        .await
        .aggregate(AggregateRequest {
            payload: None,
            aggregation: "user_dashboard".into(),
            params: params(&[("user_id", "42")]),
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert!(response.complete, "{response:?}");
    let sources: Vec<(&str, i32)> = response
        .sources
        .iter()
        .map(|s| (s.source.as_str(), s.code))
        .collect();
    assert_eq!(sources, [("profile", 0), ("orders", 0)]);

    let data = response.data.as_ref().unwrap();
    let profile = as_struct(field(data, "profile"));
    assert_eq!(str_field(profile, "user_id"), "42");
    assert!(!str_field(profile, "name").is_empty(), "{profile:?}");
    assert!(str_field(profile, "email").contains('@'), "{profile:?}");

    let orders = as_struct(field(data, "orders"));
    let Some(Kind::ListValue(list)) = &field(orders, "orders").kind else {
        panic!("orders.orders is not a list: {orders:?}");
    };
    let Some(Kind::NumberValue(count)) = field(orders, "count").kind else {
        panic!("orders.count is not a number: {orders:?}");
    };
    assert!(!list.values.is_empty());
    assert_eq!(count, list.values.len() as f64);
    assert_eq!(str_field(orders, "user_id"), "42");
    demo.stop().await;
}

#[tokio::test]
async fn demo_unknown_user_fails_naming_the_source() {
    let demo = Demo::start().await;
    let mut client = demo.client().await;

    // User 0 has no profile (NOT_FOUND) but an empty order list.
    let status = client
        .aggregate(AggregateRequest {
            payload: None,
            aggregation: "user_dashboard".into(),
            params: params(&[("user_id", "0")]),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "source 'profile': no user '0'");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["source"], "profile");

    // With orders optional, only profile can fail the call.
    let status = client
        .aggregate(AggregateRequest {
            payload: None,
            aggregation: "user_profile".into(),
            params: params(&[("user_id", "0")]),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("source 'profile'"), "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["source"], "profile");

    // Best effort reports each source's own failure.
    let response = client
        .fetch_all(FetchAllRequest {
            payload: None,
            aggregation: "user_dashboard".into(),
            params: params(&[("user_id", "0")]),
            sources: vec![],
            mode: Mode::BestEffort as i32,
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert!(!response.complete);
    let results: Vec<(&str, i32)> = response
        .results
        .iter()
        .map(|r| (r.source.as_str(), r.code))
        .collect();
    assert_eq!(
        results,
        [
            ("profile", Code::NotFound as i32),
            ("orders", Code::Ok as i32)
        ]
    );

    // User 7's orders are down: user_profile degrades, user_dashboard fails.
    let response = client
        .aggregate(AggregateRequest {
            payload: None,
            aggregation: "user_profile".into(),
            params: params(&[("user_id", "7")]),
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert!(!response.complete);
    let orders = &response.sources[1];
    assert_eq!(
        (orders.source.as_str(), orders.code),
        ("orders", Code::Unavailable as i32)
    );
    let status = client
        .aggregate(AggregateRequest {
            payload: None,
            aggregation: "user_dashboard".into(),
            params: params(&[("user_id", "7")]),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("source 'orders': "),
        "{status:?}"
    );
    demo.stop().await;
}

#[tokio::test]
async fn demo_profile_aggregation_answers_for_a_known_user() {
    let demo = Demo::start().await;
    let response = demo
        .client()
        .await
        .aggregate(AggregateRequest {
            payload: None,
            aggregation: "user_profile".into(),
            params: params(&[("user_id", "42")]),
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert!(response.complete, "{response:?}");
    let profile = as_struct(field(response.data.as_ref().unwrap(), "profile"));
    assert_eq!(str_field(profile, "user_id"), "42");
    demo.stop().await;
}

// ---- the binary ----

/// Runs the built binary to completion; bounded, as a config wrongly
/// accepted would start a server that never exits.
async fn run_binary(args: &[&str]) -> std::process::Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the binary exits")
        .expect("the binary's output")
}

/// A config file unique to this test process, removed on drop.
struct TempConfig(std::path::PathBuf);

impl TempConfig {
    fn new(name: &str, text: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("aggregator-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn binary_refuses_a_missing_config_file() {
    let output = run_binary(&["--config", "/nonexistent.toml"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains("/nonexistent.toml"), "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[tokio::test]
async fn binary_refuses_a_config_with_an_unknown_key() {
    let config = TempConfig::new(
        "unknown-key",
        "[server]\nlisten = \"127.0.0.1:0\"\nlisten_backlog = 5\n",
    );
    let output = run_binary(&["--config", config.path()]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains(config.path()), "{stderr}");
    assert!(stderr.contains("listen_backlog"), "{stderr}");
}

#[tokio::test]
async fn binary_refuses_an_invalid_config_naming_the_key() {
    let config = TempConfig::new(
        "invalid",
        "[server]\nlisten = \"127.0.0.1:0\"\n[sources.p]\nkind = \"http\"\nurl = \"http://h/x\"\ntimeout = \"0s\"\n",
    );
    let output = run_binary(&["--config", config.path()]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains(config.path()), "{stderr}");
    assert!(stderr.contains("sources.p.timeout"), "{stderr}");
}
