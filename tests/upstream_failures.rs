mod support;

use std::time::{Duration, Instant};

use aggregator::pb::aggregator::v1::{
    AggregateRequest, AggregateResponse, FetchAllRequest, aggregator_client::AggregatorClient,
};
use prost_types::value::Kind;
use support::*;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

/// Far above any failure below, so an answer within it is not a timeout:
/// half the 5 s source timeouts below (the aggregations' is 10 s).
const QUICK: Duration = Duration::from_millis(2500);

fn request(aggregation: &str, user_id: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", user_id)]),
    }
}

/// Asserts the call failed with `code`, naming `source` in the message and
/// in the ErrorInfo.
fn expect_source_failure<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, Status>,
    code: Code,
    source: &str,
) -> Status {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert_names_source(&status, source);
    status
}

fn assert_names_source(status: &Status, source: &str) {
    assert!(
        status.message().contains(&format!("'{source}'")),
        "message {:?} does not name source {source:?}",
        status.message()
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["source"], source);
}

/// Calls `aggregation` and returns the outcome with its duration.
async fn timed(
    client: &mut AggregatorClient<Channel>,
    aggregation: &str,
    user_id: &str,
) -> (Result<tonic::Response<AggregateResponse>, Status>, Duration) {
    let started = Instant::now();
    let result = client.aggregate(request(aggregation, user_id)).await;
    (result, started.elapsed())
}

#[tokio::test]
async fn http_statuses_map_to_grpc_codes_naming_the_source() {
    let cases = [
        (400, Code::InvalidArgument),
        (401, Code::Unauthenticated),
        (403, Code::PermissionDenied),
        (404, Code::NotFound),
        (409, Code::Aborted),
        (429, Code::ResourceExhausted),
        (500, Code::Internal),
        (501, Code::Unimplemented),
        (502, Code::Unavailable),
        (503, Code::Unavailable),
        (504, Code::DeadlineExceeded),
    ];
    let mut upstreams = Vec::new();
    let mut toml = String::new();
    for (status, _) in cases {
        let upstream = Upstream::http().status(status).start().await;
        let name = format!("http{status}");
        toml += &http_source(&name, &upstream, "/x/{user_id}");
        toml += &aggregation(&name, &[&name], "");
        upstreams.push(upstream);
    }
    let gateway = Gateway::start(&toml).await;
    let mut client = gateway.client().await;

    for (status, code) in cases {
        let name = format!("http{status}");
        let result = client.aggregate(request(&name, "7")).await;
        let answer = result.expect_err("an HTTP error status should fail the call");
        assert_eq!(answer.code(), code, "HTTP {status}: {answer:?}");
        assert_names_source(&answer, &name);
        assert!(
            answer.message().contains(&status.to_string()),
            "HTTP {status}: message {:?} does not give the status",
            answer.message()
        );
    }
    for upstream in &upstreams {
        assert_eq!(upstream.log.stats().started, 1);
    }
}

#[tokio::test]
async fn grpc_status_passes_through_naming_the_source() {
    let profile = Upstream::grpc()
        .fail_with(Code::PermissionDenied, "nope")
        .start()
        .await;
    let gateway = Gateway::start(&format!(
        "{}{}",
        grpc_source("profile", &profile),
        aggregation("profile", &["profile"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    let status = expect_source_failure(
        client.aggregate(request("profile", "7")).await,
        Code::PermissionDenied,
        "profile",
    );
    assert!(status.message().contains("nope"), "{status:?}");
}

#[tokio::test]
async fn http_body_that_is_not_json_is_internal() {
    let page = Upstream::http()
        .body("<html><body>oops</body></html>")
        .start()
        .await;
    let gateway = Gateway::start(&format!(
        "{}{}",
        http_source("page", &page, "/u/{user_id}"),
        aggregation("page", &["page"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    expect_source_failure(
        client.aggregate(request("page", "7")).await,
        Code::Internal,
        "page",
    );
}

#[tokio::test]
async fn http_upstream_speaking_garbage_or_closing_is_unavailable_at_once() {
    let garbage = raw_tcp(b"garbage\r\n\r\n").await;
    let closing = raw_tcp(b"").await;
    let healthy = Upstream::http().start().await;
    let gateway = Gateway::start(&format!(
        "{}timeout = \"5s\"\n{}timeout = \"5s\"\n{}{}{}{}",
        http_source("garbage", &garbage, "/u/{user_id}"),
        http_source("closing", &closing, "/u/{user_id}"),
        http_source("healthy", &healthy, "/u/{user_id}"),
        aggregation("garbage", &["garbage"], ""),
        aggregation("closing", &["closing"], ""),
        aggregation("healthy", &["healthy"], ""),
    ))
    .await;
    let mut client = gateway.client().await;

    for name in ["garbage", "closing"] {
        let (result, elapsed) = timed(&mut client, name, "7").await;
        expect_source_failure(result, Code::Unavailable, name);
        assert!(elapsed < QUICK, "{name}: took {elapsed:?}");
    }
    client.aggregate(request("healthy", "7")).await.unwrap();
}

/// Descriptors for a gRPC source, so its schema is known without reflection.
/// The path is absolute: it must not depend on how `protos` are resolved.
fn demo_protos() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    format!("protos = [\"{root}/proto/demo/v1/demo.proto\"]\nimport_paths = [\"{root}/proto\"]\n")
}

#[tokio::test]
async fn grpc_endpoint_speaking_garbage_fails_quickly_naming_the_source() {
    let garbage = raw_tcp(b"garbage\r\n\r\n").await;
    let profile = Upstream::grpc().start().await;
    // `garbage` fails while learning the schema by reflection; `garbage_typed`
    // knows its schema, so it fails on the call itself.
    let gateway = Gateway::start(&format!(
        "{}timeout = \"5s\"\n{}timeout = \"5s\"\n{}{}{}{}{}",
        grpc_source("garbage", &garbage),
        grpc_source("garbage_typed", &garbage),
        demo_protos(),
        grpc_source("profile", &profile),
        aggregation("garbage", &["garbage"], ""),
        aggregation("garbage_typed", &["garbage_typed"], ""),
        aggregation("profile", &["profile"], ""),
    ))
    .await;
    let mut client = gateway.client().await;

    for name in ["garbage", "garbage_typed"] {
        let (result, elapsed) = timed(&mut client, name, "7").await;
        let status = result.expect_err("a garbage gRPC upstream should fail the call");
        // A broken connection, not tonic's CANCELLED for a local failure.
        assert_eq!(status.code(), Code::Unavailable, "{name}: {status:?}");
        assert_names_source(&status, name);
        assert!(elapsed < QUICK, "{name}: took {elapsed:?}");
    }
    client.aggregate(request("profile", "7")).await.unwrap();
}

#[tokio::test]
async fn refused_connections_are_unavailable_and_the_gateway_keeps_serving() {
    // Held for the whole test: the port cannot go to another test's server.
    let (_reserved, refused) = refusing_addr();
    let down = format!("http://{refused}");
    let profile = Upstream::grpc().start().await;
    let gateway = Gateway::start(&format!(
        "[sources.down_http]\nkind = \"http\"\nurl = \"{down}/u/{{user_id}}\"\ntimeout = \"5s\"\n\
         [sources.down_grpc]\nkind = \"grpc\"\nendpoint = \"{down}\"\nmethod = \"demo.v1.Profiles/GetProfile\"\n\
         request = {{ user_id = \"{{user_id}}\" }}\ntimeout = \"5s\"\n{}{}{}{}",
        grpc_source("profile", &profile),
        aggregation("down_http", &["down_http"], ""),
        aggregation("down_grpc", &["down_grpc"], ""),
        aggregation("profile", &["profile"], ""),
    ))
    .await;
    let mut client = gateway.client().await;

    for name in ["down_http", "down_grpc"] {
        let (result, elapsed) = timed(&mut client, name, "7").await;
        let status = expect_source_failure(result, Code::Unavailable, name);
        assert!(
            status.message().contains("cannot connect to upstream")
                && status.message().contains("refused"),
            "{name}: {status:?}"
        );
        assert!(elapsed < QUICK, "{name}: took {elapsed:?}");
    }
    client.aggregate(request("profile", "7")).await.unwrap();
}

#[tokio::test]
async fn hanging_http_upstream_times_out_at_the_source_timeout_and_is_cancelled() {
    let stuck = Upstream::http().hang().start().await;
    // Time enough for the request to reach the upstream, so that its
    // cancellation can be seen.
    let gateway = Gateway::start(&format!(
        "{}timeout = \"500ms\"\n{}",
        http_source("stuck", &stuck, "/u/{user_id}"),
        aggregation("stuck", &["stuck"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    let (result, elapsed) = timed(&mut client, "stuck", "7").await;
    let status = expect_source_failure(result, Code::DeadlineExceeded, "stuck");
    assert!(status.message().contains("500ms"), "{status:?}");
    // Not before the source timeout, and far from the aggregation's 10 s.
    assert!(
        elapsed >= Duration::from_millis(490) && elapsed < QUICK,
        "answered after {elapsed:?}"
    );
    assert!(
        stuck.log.wait_for(QUICK, |s| s.cancelled == 1).await,
        "the hanging upstream was not cancelled: {:?}",
        stuck.log.stats()
    );
}

#[tokio::test]
async fn slow_grpc_upstream_times_out_at_the_source_timeout_and_is_cancelled() {
    // The channel enforces the grpc-timeout it forwards at the same instant as
    // the source timeout; either way the answer is the source's timeout.
    let slow = Upstream::grpc()
        .delay(Duration::from_secs(10))
        .start()
        .await;
    // Time enough for the request (the first after learning the schema) to
    // reach the upstream, so that its cancellation can be seen.
    let gateway = Gateway::start(&format!(
        "{}timeout = \"500ms\"\n{}",
        grpc_source("slow", &slow),
        aggregation("slow", &["slow"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    for attempt in 1..=3 {
        let (result, elapsed) = timed(&mut client, "slow", "7").await;
        let status = expect_source_failure(result, Code::DeadlineExceeded, "slow");
        assert!(status.message().contains("500ms"), "{status:?}");
        // Not before the source timeout, and far from the aggregation's 10 s.
        assert!(
            elapsed >= Duration::from_millis(490) && elapsed < QUICK,
            "answered after {elapsed:?}"
        );
        assert!(
            slow.log.wait_for(QUICK, |s| s.cancelled == attempt).await,
            "the slow upstream was not cancelled: {:?}",
            slow.log.stats()
        );
    }
}

#[tokio::test]
async fn http_response_over_the_size_cap_is_resource_exhausted() {
    let big = Upstream::http()
        .json(serde_json::json!({ "blob": "x".repeat(4096) }))
        .start()
        .await;
    let gateway = Gateway::start(&format!(
        "{}max_response_bytes = 1024\n{}",
        http_source("big", &big, "/u/{user_id}"),
        aggregation("big", &["big"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    expect_source_failure(
        client.aggregate(request("big", "7")).await,
        Code::ResourceExhausted,
        "big",
    );
}

#[tokio::test]
async fn grpc_response_over_the_size_cap_is_resource_exhausted() {
    let profile = Upstream::grpc().start().await;
    let gateway = Gateway::start(&format!(
        "{}max_response_bytes = 16\n{}",
        grpc_source("profile", &profile),
        aggregation("profile", &["profile"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    // The Profile echoes user_id three times, far beyond 16 bytes.
    let long_id = "u".repeat(100);
    expect_source_failure(
        client.aggregate(request("profile", &long_id)).await,
        Code::ResourceExhausted,
        "profile",
    );
    assert_eq!(profile.log.stats().started, 1);
}

#[tokio::test]
async fn grpc_upstream_without_reflection_needs_descriptors() {
    let profile = Upstream::grpc().without_reflection().start().await;

    let blind = Gateway::start(&format!(
        "{}{}",
        grpc_source("profile", &profile),
        aggregation("profile", &["profile"], "")
    ))
    .await;
    let mut client = blind.client().await;
    let (result, elapsed) = timed(&mut client, "profile", "7").await;
    let status = result.expect_err("no schema: the call should fail");
    assert!(
        matches!(
            status.code(),
            Code::Unimplemented | Code::FailedPrecondition
        ),
        "unexpected status: {status:?}"
    );
    assert_names_source(&status, "profile");
    assert!(elapsed < QUICK, "took {elapsed:?}");
    assert_eq!(profile.log.stats().started, 0);

    let informed = Gateway::start(&format!(
        "{}protos = [\"proto/demo/v1/demo.proto\"]\nimport_paths = [\"proto\"]\n{}",
        grpc_source("profile", &profile),
        aggregation("profile", &["profile"], "")
    ))
    .await;
    let response = informed
        .client()
        .await
        .aggregate(request("profile", "7"))
        .await
        .unwrap()
        .into_inner();
    assert!(response.complete);
    assert_eq!(profile.log.requests()[0].target, "7");
}

#[tokio::test]
async fn http_204_no_content_is_ok_with_null_data() {
    let empty = Upstream::http().status(204).body("").start().await;
    let gateway = Gateway::start(&format!(
        "{}{}",
        http_source("empty", &empty, "/u/{user_id}"),
        aggregation("empty", &["empty"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    let response = client
        .fetch_all(FetchAllRequest {
            payload: None,
            aggregation: "empty".into(),
            params: params(&[("user_id", "7")]),
            sources: vec![],
            mode: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.complete);
    let result = &response.results[0];
    assert_eq!(result.source, "empty");
    assert_eq!(result.code, 0);
    let data = result.data.as_ref().expect("data is set, to null");
    assert!(
        matches!(data.kind, Some(Kind::NullValue(_))),
        "expected null, got {data:?}"
    );
}
