mod support;

use std::time::{Duration, Instant};

use aggregator::pb::aggregator::v1::{AggregateRequest, FetchAllRequest, Mode};
use prost_types::{Value, value::Kind};
use support::*;
use tonic::Code;
use tonic_types::StatusExt;

/// Bounds every wait so a regression fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

fn dash(aggregation: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", "7")]),
    }
}

fn fetch(aggregation: &str, sources: &[&str], mode: Mode) -> FetchAllRequest {
    FetchAllRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", "7")]),
        sources: sources.iter().map(|s| s.to_string()).collect(),
        mode: mode as i32,
    }
}

fn config(parts: &[String]) -> String {
    parts.concat()
}

/// Decodes a `grpc-timeout` value (at most 8 digits and a unit).
fn grpc_timeout(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    assert!(
        !digits.is_empty() && digits.len() <= 8,
        "malformed grpc-timeout {value:?}"
    );
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("malformed grpc-timeout {value:?}"));
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("unknown grpc-timeout unit in {value:?}"),
    }
}

fn seen_grpc_timeout(upstream: &Running) -> Duration {
    let requests = upstream.log.requests();
    let header = requests[0]
        .headers
        .get("grpc-timeout")
        .expect("the upstream request carries grpc-timeout");
    grpc_timeout(header.to_str().unwrap())
}

fn struct_field<'a>(value: &'a Value, field: &str) -> &'a Value {
    match &value.kind {
        Some(Kind::StructValue(s)) => s
            .fields
            .get(field)
            .unwrap_or_else(|| panic!("no field {field:?} in {value:?}")),
        other => panic!("expected a struct, got {other:?}"),
    }
}

/// The common checks on a fail-fast error caused by one source.
fn assert_source_failure(status: &tonic::Status, code: Code, source: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status
            .message()
            .starts_with(&format!("source '{source}': ")),
        "message does not name {source}: {:?}",
        status.message()
    );
    let info = status
        .get_details_error_info()
        .expect("a google.rpc.ErrorInfo detail");
    assert_eq!(
        info.metadata.get("source").map(String::as_str),
        Some(source)
    );
}

#[tokio::test]
async fn sources_run_in_parallel() {
    // Neither upstream answers before the gate opens: a gateway calling its
    // sources one after the other would never send the second request.
    let gate = Gate::new();
    let profile = Upstream::grpc()
        .delay(Duration::from_millis(100))
        .gated(&gate)
        .start()
        .await;
    let orders = Upstream::http()
        .delay(Duration::from_millis(100))
        .gated(&gate)
        .start()
        .await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], ""),
    ]))
    .await;
    let mut client = gateway.client().await;

    let started = Instant::now();
    let (response, ()) = tokio::join!(client.aggregate(dash("dash")), async {
        let both = profile.log.wait_for(PATIENCE, |s| s.started == 1).await
            && orders.log.wait_for(PATIENCE, |s| s.started == 1).await;
        assert!(
            both,
            "not parallel: profile {:?}, orders {:?}",
            profile.log.stats(),
            orders.log.stats()
        );
        gate.open();
    });
    let elapsed = started.elapsed();

    let response = response.unwrap().into_inner();
    assert!(response.complete);
    assert!(
        elapsed >= Duration::from_millis(100),
        "faster than the upstreams: {elapsed:?}"
    );
}

#[tokio::test]
async fn a_slow_source_fails_the_call_at_the_callers_deadline_and_is_cancelled() {
    let profile = Upstream::grpc()
        .delay(Duration::from_secs(10))
        .start()
        .await;
    let orders = Upstream::http().start().await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], ""),
    ]))
    .await;
    let mut client = gateway.lenient_client();

    let started = Instant::now();
    let status = client
        .aggregate(with_timeout(dash("dash"), Duration::from_secs(1)))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // Not before the deadline, and far from the 10 s the upstream takes.
    assert!(
        elapsed >= Duration::from_millis(950) && elapsed < Duration::from_secs(4),
        "answered after {elapsed:?}, expected about 1 s"
    );
    assert!(
        profile.log.wait_for(PATIENCE, |s| s.cancelled == 1).await,
        "the slow upstream was not cancelled: {:?}",
        profile.log.stats()
    );
}

#[tokio::test]
async fn the_aggregation_timeout_caps_a_call_without_a_deadline() {
    let profile = Upstream::grpc()
        .delay(Duration::from_secs(10))
        .start()
        .await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        aggregation("dash", &["profile"], "timeout = \"300ms\""),
    ]))
    .await;
    let mut client = gateway.client().await;

    let started = Instant::now();
    let status = client.aggregate(dash("dash")).await.unwrap_err();
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // Not before the timeout, and far from the 10 s the upstream takes.
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}, expected about 300 ms"
    );
}

#[tokio::test]
async fn a_failing_source_cancels_a_slow_grpc_source() {
    let profile = Upstream::grpc()
        .delay(Duration::from_secs(10))
        .start()
        .await;
    // Held until the slow request is surely in flight, then fails.
    let gate = Gate::new();
    let orders = Upstream::http().status(503).gated(&gate).start().await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], ""),
    ]))
    .await;
    let mut client = gateway.client().await;

    let started = Instant::now();
    let (result, ()) = tokio::join!(client.aggregate(dash("dash")), async {
        assert!(
            profile.log.wait_for(PATIENCE, |s| s.started == 1).await,
            "the slow request never left: {:?}",
            profile.log.stats()
        );
        gate.open();
    });
    let status = result.unwrap_err();
    let elapsed = started.elapsed();

    // The slow source would have answered after 10 s.
    assert!(
        elapsed < Duration::from_secs(5),
        "the error waited for the slow source: {elapsed:?}"
    );
    assert_source_failure(&status, Code::Unavailable, "orders");
    assert_eq!(
        profile.log.stats().started,
        1,
        "the slow request never left"
    );
    assert!(
        profile.log.wait_for(PATIENCE, |s| s.cancelled == 1).await,
        "the slow gRPC upstream was not cancelled: {:?}",
        profile.log.stats()
    );
}

#[tokio::test]
async fn a_failing_source_cancels_a_slow_http_source() {
    // Held until the slow request is surely in flight, then fails.
    let gate = Gate::new();
    let profile = Upstream::grpc()
        .fail_with(Code::NotFound, "no such user")
        .gated(&gate)
        .start()
        .await;
    let orders = Upstream::http()
        .delay(Duration::from_secs(10))
        .start()
        .await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], ""),
    ]))
    .await;
    let mut client = gateway.client().await;

    let started = Instant::now();
    let (result, ()) = tokio::join!(client.aggregate(dash("dash")), async {
        assert!(
            orders.log.wait_for(PATIENCE, |s| s.started == 1).await,
            "the slow request never left: {:?}",
            orders.log.stats()
        );
        gate.open();
    });
    let status = result.unwrap_err();
    let elapsed = started.elapsed();

    // The slow source would have answered after 10 s.
    assert!(
        elapsed < Duration::from_secs(5),
        "the error waited for the slow source: {elapsed:?}"
    );
    assert_source_failure(&status, Code::NotFound, "profile");
    assert!(status.message().contains("no such user"), "{status:?}");
    assert_eq!(orders.log.stats().started, 1, "the slow request never left");
    assert!(
        orders.log.wait_for(PATIENCE, |s| s.cancelled == 1).await,
        "the slow HTTP upstream was not cancelled: {:?}",
        orders.log.stats()
    );
}

#[tokio::test]
async fn the_first_failure_wins() {
    let missing = Upstream::grpc()
        .delay(Duration::from_millis(20))
        .fail_with(Code::NotFound, "no such user")
        .start()
        .await;
    // Fails too, but far later than `missing` could, however slow the machine.
    let denied = Upstream::grpc()
        .delay(Duration::from_secs(10))
        .fail_with(Code::PermissionDenied, "go away")
        .start()
        .await;
    let gateway = Gateway::start(&config(&[
        grpc_source("denied", &denied),
        grpc_source("missing", &missing),
        // The later failure is listed first: order must not decide.
        aggregation("dash", &["denied", "missing"], ""),
    ]))
    .await;

    let status = gateway
        .client()
        .await
        .aggregate(dash("dash"))
        .await
        .unwrap_err();

    assert_source_failure(&status, Code::NotFound, "missing");
}

#[tokio::test]
async fn the_callers_deadline_travels_to_grpc_upstreams() {
    let profile = Upstream::grpc().start().await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        aggregation("dash", &["profile"], ""),
    ]))
    .await;

    gateway
        .client()
        .await
        .aggregate(with_timeout(dash("dash"), Duration::from_secs(8)))
        .await
        .unwrap();

    // What is left of the caller's 8 s (not the aggregation's 10 s default);
    // the lower bound leaves seconds for getting there.
    let seen = seen_grpc_timeout(&profile);
    assert!(
        seen > Duration::from_secs(4) && seen <= Duration::from_secs(8),
        "upstream saw grpc-timeout {seen:?}"
    );
}

#[tokio::test]
async fn a_source_timeout_shortens_the_propagated_deadline() {
    let profile = Upstream::grpc().start().await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        "timeout = \"5s\"\n".to_owned(),
        aggregation("dash", &["profile"], "timeout = \"30s\""),
    ]))
    .await;

    gateway
        .client()
        .await
        .aggregate(dash("dash"))
        .await
        .unwrap();

    // The source's 5 s, not the aggregation's 30 s; the lower bound leaves
    // seconds for getting there.
    let seen = seen_grpc_timeout(&profile);
    assert!(
        seen > Duration::from_millis(2500) && seen <= Duration::from_secs(5),
        "upstream saw grpc-timeout {seen:?}"
    );
}

#[tokio::test]
async fn a_caller_that_goes_away_cancels_every_upstream() {
    let profile = Upstream::grpc()
        .delay(Duration::from_secs(10))
        .start()
        .await;
    let orders = Upstream::http()
        .delay(Duration::from_secs(10))
        .start()
        .await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], ""),
    ]))
    .await;
    let mut client = gateway.client().await;

    // Leave once both requests are in flight (neither can finish for 10 s).
    tokio::select! {
        result = client.aggregate(dash("dash")) => {
            panic!("the call should still be running: {result:?}")
        }
        in_flight = async {
            profile.log.wait_for(PATIENCE, |s| s.started == 1).await
                && orders.log.wait_for(PATIENCE, |s| s.started == 1).await
        } => assert!(
            in_flight,
            "not both in flight: {:?}, {:?}",
            profile.log.stats(),
            orders.log.stats()
        ),
    }

    // Well before the upstreams would have answered (10 s); an answered
    // request counts as finished, never as cancelled.
    let (profile_cancelled, orders_cancelled) = tokio::join!(
        profile
            .log
            .wait_for(Duration::from_secs(5), |s| s.cancelled == 1),
        orders
            .log
            .wait_for(Duration::from_secs(5), |s| s.cancelled == 1),
    );
    assert!(
        profile_cancelled,
        "gRPC upstream not cancelled: {:?}",
        profile.log.stats()
    );
    assert!(
        orders_cancelled,
        "HTTP upstream not cancelled: {:?}",
        orders.log.stats()
    );
}

#[tokio::test]
async fn an_optional_source_failure_degrades_the_answer() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().status(500).start().await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], "optional = [\"orders\"]"),
    ]))
    .await;

    let response = gateway
        .client()
        .await
        .aggregate(dash("dash"))
        .await
        .unwrap()
        .into_inner();

    assert!(!response.complete);
    let data = response.data.unwrap();
    assert!(data.fields.contains_key("profile"));
    assert!(!data.fields.contains_key("orders"));
    let codes: Vec<(&str, i32)> = response
        .sources
        .iter()
        .map(|s| (s.source.as_str(), s.code))
        .collect();
    assert_eq!(codes, [("profile", 0), ("orders", Code::Internal as i32)]);
    assert!(!response.sources[1].message.is_empty());
    assert!(response.sources[0].message.is_empty());
}

#[tokio::test]
async fn best_effort_reports_failures_per_source_and_the_request_mode_overrides() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().status(503).start().await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("lenient", &["profile", "orders"], "mode = \"best_effort\""),
        aggregation("strict", &["profile", "orders"], ""),
    ]))
    .await;
    let mut client = gateway.client().await;
    let unavailable = Code::Unavailable as i32;

    let response = client
        .aggregate(dash("lenient"))
        .await
        .unwrap()
        .into_inner();
    assert!(!response.complete);
    let codes: Vec<(&str, i32)> = response
        .sources
        .iter()
        .map(|s| (s.source.as_str(), s.code))
        .collect();
    assert_eq!(codes, [("profile", 0), ("orders", unavailable)]);
    assert!(response.data.unwrap().fields.contains_key("profile"));

    let response = client
        .fetch_all(fetch("strict", &[], Mode::BestEffort))
        .await
        .unwrap()
        .into_inner();
    assert!(!response.complete);
    let codes: Vec<(&str, i32)> = response
        .results
        .iter()
        .map(|s| (s.source.as_str(), s.code))
        .collect();
    assert_eq!(codes, [("profile", 0), ("orders", unavailable)]);
    assert!(response.results[0].data.is_some());
    assert!(response.results[1].data.is_none());

    let status = client
        .fetch_all(fetch("lenient", &[], Mode::FailFast))
        .await
        .unwrap_err();
    assert_source_failure(&status, Code::Unavailable, "orders");
}

#[tokio::test]
async fn fetch_all_answers_in_aggregation_order() {
    // The first source answers last: 1 s is far longer than the other takes.
    let profile = Upstream::grpc().delay(Duration::from_secs(1)).start().await;
    let orders = Upstream::http()
        .json(serde_json::json!({"count": 2}))
        .start()
        .await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], ""),
    ]))
    .await;

    let response = gateway
        .client()
        .await
        .fetch_all(fetch("dash", &[], Mode::Unspecified))
        .await
        .unwrap()
        .into_inner();

    assert!(response.complete);
    let names: Vec<&str> = response.results.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(names, ["profile", "orders"]);
    let elapsed = |i: usize| {
        Duration::try_from(response.results[i].elapsed.unwrap()).expect("a positive duration")
    };
    assert!(elapsed(0) > elapsed(1), "profile did not finish last");
    let profile_data = response.results[0].data.as_ref().expect("profile data");
    assert_eq!(
        struct_field(profile_data, "user_id").kind,
        Some(Kind::StringValue("7".into()))
    );
    let orders_data = response.results[1].data.as_ref().expect("orders data");
    assert_eq!(
        struct_field(orders_data, "count").kind,
        Some(Kind::NumberValue(2.0))
    );
}

#[tokio::test]
async fn fetch_all_calls_only_the_requested_sources_in_aggregation_order() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().start().await;
    let extra = Upstream::http().start().await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        http_source("extra", &extra, "/extra/{user_id}"),
        aggregation("dash", &["profile", "orders", "extra"], ""),
    ]))
    .await;
    let mut client = gateway.client().await;

    let response = client
        .fetch_all(fetch("dash", &["orders"], Mode::Unspecified))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = response.results.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(names, ["orders"]);
    assert_eq!(profile.log.stats().started, 0);
    assert_eq!(extra.log.stats().started, 0);

    let response = client
        .fetch_all(fetch("dash", &["extra", "profile"], Mode::Unspecified))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = response.results.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(names, ["profile", "extra"]);
    assert_eq!(orders.log.stats().started, 1);
}

#[tokio::test]
async fn the_gateway_keeps_serving_after_failures() {
    let profile = Upstream::grpc().start().await;
    let slow = Upstream::http().delay(Duration::from_secs(5)).start().await;
    let broken = Upstream::http().status(503).start().await;
    let orders = Upstream::http().start().await;
    // Every aggregation shares the gRPC source, so its channel is reused
    // after the failed calls.
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("slow", &slow, "/slow/{user_id}"),
        http_source("broken", &broken, "/broken/{user_id}"),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("late", &["profile", "slow"], "timeout = \"200ms\""),
        aggregation("failing", &["profile", "broken"], ""),
        aggregation("dash", &["profile", "orders"], ""),
    ]))
    .await;
    let mut client = gateway.client().await;

    let status = client.aggregate(dash("late")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let status = client.aggregate(dash("failing")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let response = client.aggregate(dash("dash")).await.unwrap().into_inner();
    assert!(response.complete);
    let data = response.data.unwrap();
    assert!(data.fields.contains_key("profile"));
    assert!(data.fields.contains_key("orders"));
}

#[tokio::test]
async fn a_source_timeout_fails_the_call_naming_the_source() {
    let profile = Upstream::grpc().start().await;
    let stuck = Upstream::http().hang().start().await;
    let gateway = Gateway::start(&config(&[
        grpc_source("profile", &profile),
        http_source("stuck", &stuck, "/stuck/{user_id}"),
        "timeout = \"150ms\"\n".to_owned(),
        aggregation("dash", &["profile", "stuck"], "timeout = \"5s\""),
    ]))
    .await;
    let mut client = gateway.client().await;

    let started = Instant::now();
    let status = client.aggregate(dash("dash")).await.unwrap_err();
    let elapsed = started.elapsed();

    assert_source_failure(&status, Code::DeadlineExceeded, "stuck");
    // Not before the source's timeout, and far from the aggregation's 5 s.
    assert!(
        elapsed >= Duration::from_millis(150) && elapsed < Duration::from_millis(2500),
        "answered after {elapsed:?}, expected about 150 ms"
    );
}
