//! Traces against a real OTLP receiver: each call is a server span under
//! the caller's, each upstream request (retries included) a client span
//! under it that the upstream receives as its parent; the caller's sampled
//! flag is followed; a collector that is down costs nothing but a counter.

mod support;

use std::time::Duration;

use aggregator::pb::aggregator::v1::AggregateRequest;
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, any_value},
    trace::v1::{Span, span::SpanKind},
};
use support::*;
use tonic::metadata::MetadataValue;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn call(traceparent: &str) -> tonic::Request<AggregateRequest> {
    let mut request = tonic::Request::new(AggregateRequest {
        payload: None,
        aggregation: "dash".into(),
        params: params(&[("user_id", "7")]),
    });
    request
        .metadata_mut()
        .insert("traceparent", MetadataValue::try_from(traceparent).unwrap());
    request
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<any_value::Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone())
        .and_then(|v: AnyValue| v.value)
}

fn text(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(any_value::Value::StringValue(s)) => s,
        other => panic!("{key}: {other:?} in {}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(any_value::Value::IntValue(n)) => n,
        other => panic!("{key}: {other:?} in {}", span.name),
    }
}

#[tokio::test]
async fn calls_and_their_upstream_requests_are_spans_with_links_and_attributes() {
    let collector = Collector::start().await;
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().fail_first(1, 503, None).start().await;
    let gw = Gateway::start(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"gw-test\"\n{}{}retry = {{ attempts = 2, backoff = \"1ms\" }}\n{}",
        collector.endpoint(),
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], "")
    ))
    .await;
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    gw.client()
        .await
        .aggregate(call(&traceparent))
        .await
        .unwrap();
    // Stopping flushes what is queued.
    gw.stop().await;

    let spans = collector.spans();
    let server: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(server.len(), 1, "{spans:#?}");
    let server = server[0];
    assert_eq!(server.name, "aggregator.v1.Aggregator/Aggregate");
    assert_eq!(hex(&server.trace_id), TRACE);
    assert_eq!(
        hex(&server.parent_span_id),
        CALLER_SPAN,
        "a child of the caller's span"
    );
    assert_eq!(text(server, "aggregator.aggregation"), "dash");
    assert_eq!(int(server, "rpc.grpc.status_code"), 0);
    let events: Vec<_> = server.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(events, ["source", "source"]);

    let clients: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    // profile once, orders twice (a 503, then the retry).
    assert_eq!(clients.len(), 3, "{clients:#?}");
    for span in &clients {
        assert_eq!(hex(&span.trace_id), TRACE);
        assert_eq!(
            span.parent_span_id, server.span_id,
            "{} is not under the call",
            span.name
        );
        assert_eq!(text(span, "aggregator.aggregation"), "dash");
    }
    let grpc = clients
        .iter()
        .find(|s| text(s, "aggregator.source") == "profile")
        .unwrap();
    assert_eq!(grpc.name, "demo.v1.Profiles/GetProfile");
    assert_eq!(text(grpc, "rpc.method"), "demo.v1.Profiles/GetProfile");
    assert_eq!(int(grpc, "rpc.grpc.status_code"), 0);
    assert_eq!(int(grpc, "aggregator.attempt"), 1);
    let mut http: Vec<&&Span> = clients
        .iter()
        .filter(|s| text(s, "aggregator.source") == "orders")
        .collect();
    http.sort_by_key(|s| int(s, "aggregator.attempt"));
    assert_eq!(
        http.iter()
            .map(|s| (
                int(s, "aggregator.attempt"),
                int(s, "http.response.status_code")
            ))
            .collect::<Vec<_>>(),
        [(1, 503), (2, 200)]
    );
    assert_eq!(text(http[0], "http.request.method"), "GET");

    // Each upstream request carried its own client span as parent.
    let sent = |upstream: &Running| -> Vec<String> {
        upstream
            .log
            .requests()
            .iter()
            .map(|s| s.headers["traceparent"].to_str().unwrap().to_owned())
            .collect()
    };
    for (seen, spans) in [
        (sent(&profile), vec![*grpc]),
        (sent(&orders), http.iter().map(|s| **s).collect()),
    ] {
        assert_eq!(seen.len(), spans.len());
        for (traceparent, span) in seen.iter().zip(spans) {
            assert_eq!(
                traceparent,
                &format!("00-{TRACE}-{}-01", hex(&span.span_id)),
                "the upstream's parent is not its client span"
            );
        }
    }
}

#[tokio::test]
async fn a_caller_that_does_not_sample_gets_no_spans_but_a_context() {
    let collector = Collector::start().await;
    let profile = Upstream::grpc().start().await;
    let gw = Gateway::start(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nsample_ratio = 1.0\n{}{}",
        collector.endpoint(),
        grpc_source("profile", &profile),
        aggregation("dash", &["profile"], "")
    ))
    .await;
    gw.client()
        .await
        .aggregate(call(&format!("00-{TRACE}-{CALLER_SPAN}-00")))
        .await
        .unwrap();
    gw.stop().await;
    assert!(collector.spans().is_empty(), "{:#?}", collector.spans());
    let seen = &profile.log.requests()[0].headers["traceparent"];
    let seen = seen.to_str().unwrap();
    assert!(
        seen.starts_with(&format!("00-{TRACE}-")) && seen.ends_with("-00"),
        "{seen}"
    );
}

#[tokio::test]
async fn a_collector_that_is_down_never_fails_a_call() {
    let (_held, down) = refusing_addr();
    let profile = Upstream::grpc().start().await;
    let (gw, metrics) = Gateway::start_with_metrics(&format!(
        "[telemetry]\notlp_endpoint = \"http://{down}\"\n{}{}",
        grpc_source("profile", &profile),
        aggregation("dash", &["profile"], "")
    ))
    .await;
    let mut client = gw.client().await;
    for _ in 0..20 {
        client
            .aggregate(call(&format!("00-{TRACE}-{CALLER_SPAN}-01")))
            .await
            .unwrap();
    }
    // The batch goes out on the exporter's schedule (5 s), and fails.
    let failed = async {
        loop {
            let (_, text) = scrape(metrics, None).await;
            if sample(&text, "aggregator_trace_export_failures_total").is_some_and(|n| n >= 1.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), failed)
        .await
        .expect("no export failure counted");
    client
        .aggregate(call(&format!("00-{TRACE}-{CALLER_SPAN}-01")))
        .await
        .unwrap();
}
