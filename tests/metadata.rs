//! Caller metadata: what a source names in `forward_metadata` reaches its
//! upstream (and nothing else does), templates read it as `{@name}`, it is
//! part of what makes two requests the same, the W3C trace context always
//! passes, and every call has a request id that comes back to the caller.

mod support;

use std::time::Duration;

use aggregator::pb::aggregator::v1::AggregateRequest;
use futures_util::future::join_all;
use support::*;
use tonic::{Code, metadata::MetadataValue};
use tonic_types::StatusExt;

const PATIENCE: Duration = Duration::from_secs(20);

fn call(aggregation: &str, metadata: &[(&'static str, &str)]) -> tonic::Request<AggregateRequest> {
    let mut request = tonic::Request::new(AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", "7")]),
    });
    for (name, value) in metadata {
        request
            .metadata_mut()
            .insert(*name, MetadataValue::try_from(*value).unwrap());
    }
    request
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).map(|v| v.to_str().unwrap())
}

/// A gRPC `profile` and an HTTP `orders` source in aggregation `dash`, with
/// `defaults` and extra TOML lines for each source.
async fn dash(
    defaults: &str,
    profile_extra: &str,
    orders_extra: &str,
) -> (Running, Running, Gateway) {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().start().await;
    let gw = Gateway::start(&format!(
        "{defaults}{}{profile_extra}{}{orders_extra}{}",
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], "")
    ))
    .await;
    (profile, orders, gw)
}

#[tokio::test]
async fn only_named_metadata_is_forwarded_to_grpc_and_http_upstreams() {
    let defaults = "[defaults]\nforward_metadata = [\"Authorization\", \"x-request-id\"]\n";
    let (profile, orders, gw) = dash(defaults, "", "").await;
    let mut client = gw.client().await;
    let metadata = [
        ("authorization", "Bearer abc"),
        ("x-request-id", "req-1"),
        ("x-secret", "never forwarded"),
    ];
    client.aggregate(call("dash", &metadata)).await.unwrap();
    for upstream in [&profile, &orders] {
        let seen = &upstream.log.requests()[0];
        assert_eq!(header(seen, "authorization"), Some("Bearer abc"));
        assert_eq!(header(seen, "x-request-id"), Some("req-1"));
        assert_eq!(header(seen, "x-secret"), None);
    }
}

#[tokio::test]
async fn without_forward_metadata_nothing_of_the_callers_is_sent() {
    let (profile, orders, gw) = dash("", "", "").await;
    let mut client = gw.client().await;
    client
        .aggregate(call(
            "dash",
            &[("authorization", "Bearer abc"), ("x-request-id", "r")],
        ))
        .await
        .unwrap();
    for upstream in [&profile, &orders] {
        let seen = &upstream.log.requests()[0];
        assert_eq!(header(seen, "authorization"), None);
        assert_eq!(header(seen, "x-request-id"), None);
    }
}

#[tokio::test]
async fn templates_read_metadata_and_a_missing_one_is_the_callers_error() {
    let (profile, orders, gw) = dash(
        "",
        "metadata = { x-tenant = \"t-{@x-tenant}\" }\n",
        "headers = { authorization = \"Bearer {@x-token}\" }\n",
    )
    .await;
    let mut client = gw.client().await;
    client
        .aggregate(call("dash", &[("x-tenant", "acme"), ("x-token", "s3cret")]))
        .await
        .unwrap();
    assert_eq!(
        header(&profile.log.requests()[0], "x-tenant"),
        Some("t-acme")
    );
    assert_eq!(
        header(&orders.log.requests()[0], "authorization"),
        Some("Bearer s3cret")
    );
    let status = client
        .aggregate(call("dash", &[("x-tenant", "acme")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), "missing metadata 'x-token'");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.reason, "MISSING_METADATA");
    assert_eq!(info.metadata["metadata"], "x-token");
    assert_eq!(profile.log.stats().started, 1, "an upstream was called");
    assert_eq!(orders.log.stats().started, 1, "an upstream was called");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_with_different_credentials_never_share_a_request() {
    let gate = Gate::new();
    let profile = Upstream::grpc().gated(&gate).start().await;
    let gw = Gateway::start(&format!(
        "{}forward_metadata = [\"authorization\"]\n{}",
        grpc_source("profile", &profile),
        aggregation("p", &["profile"], "")
    ))
    .await;
    let client = gw.client().await;
    // Two callers as alice and two as bob, at once.
    let calls = ["alice", "alice", "bob", "bob"].map(|who| {
        let mut client = client.clone();
        let token = format!("Bearer {who}");
        async move {
            client
                .aggregate(call("p", &[("authorization", &token)]))
                .await
        }
    });
    let (results, ()) = tokio::join!(join_all(calls), async {
        assert!(profile.log.wait_for(PATIENCE, |s| s.started == 2).await);
        gate.open();
    });
    for result in results {
        result.unwrap();
    }
    // One request per credential, never one for all.
    let mut seen: Vec<_> = profile
        .log
        .requests()
        .iter()
        .map(|s| header(s, "authorization").unwrap().to_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["Bearer alice", "Bearer bob"]);
}

#[tokio::test]
async fn the_trace_context_always_reaches_upstreams_verbatim() {
    let (profile, orders, gw) = dash("", "", "").await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut client = gw.client().await;
    client
        .aggregate(call(
            "dash",
            &[("traceparent", traceparent), ("tracestate", "vendor=1")],
        ))
        .await
        .unwrap();
    for upstream in [&profile, &orders] {
        let seen = &upstream.log.requests()[0];
        assert_eq!(header(seen, "traceparent"), Some(traceparent));
        assert_eq!(header(seen, "tracestate"), Some("vendor=1"));
    }
}

#[tokio::test]
async fn every_call_has_a_request_id_that_comes_back() {
    let profile = Upstream::grpc().start().await;
    let gw = Gateway::start(&format!(
        "{}forward_metadata = [\"x-request-id\"]\n{}",
        grpc_source("profile", &profile),
        aggregation("p", &["profile"], "")
    ))
    .await;
    let mut client = gw.client().await;
    let response = client
        .aggregate(call("p", &[("x-request-id", "abc-123")]))
        .await
        .unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "abc-123");
    // Malformed (a space, too long): replaced by one made here, and that
    // one is what the upstream got.
    for bad in ["has space", &"x".repeat(129)] {
        let response = client
            .aggregate(call("p", &[("x-request-id", bad)]))
            .await
            .unwrap();
        let id = response
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(id.len(), 32, "{id}");
        let last = profile.log.requests().last().cloned().unwrap();
        assert_eq!(header(&last, "x-request-id"), Some(id));
    }
    // Errors carry it too, with no answer headers (in the trailers).
    let status = client
        .aggregate(call("nope", &[("x-request-id", "err-9")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "err-9");
    // So do the errors of the edge, answered before the call is read.
    let small = Gateway::start(&format!(
        "[server]\nmax_request_bytes = 64\n{}{}",
        grpc_source("profile", &profile),
        aggregation("p", &["profile"], "")
    ))
    .await;
    let mut request = call("p", &[("x-request-id", "big-1")]);
    request
        .get_mut()
        .params
        .insert("user_id".into(), "9".repeat(100));
    let status = small.client().await.aggregate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "big-1");
}

#[tokio::test]
async fn the_request_id_is_in_the_calls_log_line() {
    let profile = Upstream::grpc().start().await;
    let gw = Process::start(
        &format!(
            "{}{}",
            grpc_source("profile", &profile),
            aggregation("p", &["profile"], "")
        ),
        &[],
    )
    .await;
    let mut client = gw.client().await;
    client
        .aggregate(call("p", &[("x-request-id", "log-me-7")]))
        .await
        .unwrap();
    let line = gw
        .wait_for_line(PATIENCE, |l| l.contains("aggregation completed"))
        .await
        .unwrap();
    assert!(
        line.contains("request_id=\"log-me-7\"") || line.contains("request_id=log-me-7"),
        "{line}"
    );
}
