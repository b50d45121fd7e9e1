//! Request metrics: calls by RPC, aggregation and code, incomplete calls,
//! latency histograms, calls in flight and shed, every request sent to a
//! source by code (retries and hedges included), coalescing waits, and the
//! process's own; in the classic text format or OpenMetrics, as asked, and
//! valid for Prometheus's own `promtool check metrics`.

mod support;

use std::time::Duration;

use aggregator::pb::aggregator::v1::{AggregateRequest, FetchAllRequest, Mode};
use futures_util::future::join_all;
use support::*;
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(20);

fn call(aggregation: &str, user: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", user)]),
    }
}

#[tokio::test]
async fn calls_are_counted_by_rpc_aggregation_and_code() {
    let ok = Upstream::http().start().await;
    let down = Upstream::http().status(503).start().await;
    let (gw, metrics) = Gateway::start_with_metrics(&format!(
        "{}{}{}{}",
        http_source("ok", &ok, "/ok/{user_id}"),
        http_source("down", &down, "/down/{user_id}"),
        aggregation("good", &["ok"], ""),
        aggregation("mixed", &["ok", "down"], "optional = [\"down\"]"),
    ))
    .await;
    let mut client = gw.client().await;
    for i in 0..3 {
        client
            .aggregate(call("good", &i.to_string()))
            .await
            .unwrap();
    }
    client.aggregate(call("mixed", "1")).await.unwrap();
    let fetch = FetchAllRequest {
        payload: None,
        aggregation: "mixed".into(),
        params: params(&[("user_id", "2")]),
        sources: vec!["down".into()],
        mode: Mode::Unspecified as i32,
    };
    assert_eq!(
        client.fetch_all(fetch).await.unwrap_err().code(),
        Code::Unavailable
    );
    // Unknown names never become labels.
    for name in ["nope", "also-nope"] {
        client.aggregate(call(name, "1")).await.unwrap_err();
    }
    let (_, text) = scrape(metrics, None).await;
    let value =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(
        value("aggregator_calls_total{rpc=\"Aggregate\",aggregation=\"good\",code=\"OK\"}"),
        3.0
    );
    assert_eq!(
        value("aggregator_calls_total{rpc=\"Aggregate\",aggregation=\"mixed\",code=\"OK\"}"),
        1.0
    );
    assert_eq!(
        value("aggregator_calls_incomplete_total{rpc=\"Aggregate\",aggregation=\"mixed\"}"),
        1.0
    );
    assert_eq!(
        value(
            "aggregator_calls_total{rpc=\"FetchAll\",aggregation=\"mixed\",code=\"UNAVAILABLE\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            "aggregator_calls_total{rpc=\"Aggregate\",aggregation=\"unknown\",code=\"NOT_FOUND\"}"
        ),
        2.0
    );
    assert!(!text.contains("nope"), "a caller's name became a label");
    assert_eq!(
        value("aggregator_call_duration_seconds_count{rpc=\"Aggregate\",aggregation=\"good\"}"),
        3.0
    );
    assert_eq!(
        value("aggregator_source_requests_total{source=\"ok\",code=\"OK\"}"),
        4.0
    );
    assert_eq!(
        value("aggregator_source_requests_total{source=\"down\",code=\"UNAVAILABLE\"}"),
        2.0
    );
    assert_eq!(
        value("aggregator_source_request_duration_seconds_count{source=\"down\"}"),
        2.0
    );
    assert_eq!(value("aggregator_calls_in_flight"), 0.0);
    assert!(
        value(&format!(
            "aggregator_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )) == 1.0
    );
    assert!(value("process_resident_memory_bytes") > 0.0);
    assert!(value("process_open_fds") > 0.0);
    assert!(
        sample(&text, "process_cpu_seconds_total").is_some(),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_shed_retries_hedges_skips_and_coalescing_waits_are_counted() {
    let gate = Gate::new();
    let held = Upstream::grpc().gated(&gate).start().await;
    let flaky = Upstream::http().fail_first(1, 503, None).start().await;
    let slow = Upstream::http()
        .slow_first(1, Duration::from_secs(10))
        .start()
        .await;
    let down = Upstream::http().status(500).start().await;
    let (gw, metrics) = Gateway::start_with_metrics(&format!(
        "[server]\nmax_concurrent_calls = 3\nqueue_timeout = \"10ms\"\n{}{}retry = {{ attempts = 3, backoff = \"1ms\" }}\n{}hedge = {{ delay = \"200ms\" }}\n{}breaker = {{ failures = 1, cool_down = \"1h\", max_cool_down = \"1h\" }}\n{}{}{}{}",
        grpc_source("held", &held),
        http_source("flaky", &flaky, "/f"),
        http_source("slow", &slow, "/s"),
        http_source("down", &down, "/d"),
        aggregation("held", &["held"], ""),
        aggregation("flaky", &["flaky"], ""),
        aggregation("slow", &["slow"], ""),
        aggregation("down", &["down"], ""),
    ))
    .await;
    let client = gw.client().await;
    let mut c = client.clone();
    // A retry, then a hedge that wins.
    c.aggregate(call("flaky", "1")).await.unwrap();
    c.aggregate(call("slow", "1")).await.unwrap();
    // The breaker opens on the first failure; the second call is skipped.
    c.aggregate(call("down", "1")).await.unwrap_err();
    c.aggregate(call("down", "1")).await.unwrap_err();
    // Three identical calls share one held request (two wait on it); a
    // fourth call finds the gateway at its cap.
    let held_calls: Vec<_> = (0..3)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.aggregate(call("held", "x")).await })
        })
        .collect();
    assert!(held.log.wait_for(PATIENCE, |s| s.started == 1).await);
    let waiting = async {
        loop {
            let (_, text) = scrape(metrics, None).await;
            if sample(&text, "aggregator_calls_in_flight") == Some(3.0) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("3 calls in flight");
    let status = c.aggregate(call("flaky", "2")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    gate.open();
    for call in join_all(held_calls).await {
        call.unwrap().unwrap();
    }
    let (_, text) = scrape(metrics, None).await;
    let value =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(
        value("aggregator_source_retries_total{source=\"flaky\"}"),
        1.0
    );
    assert_eq!(
        value("aggregator_source_requests_total{source=\"flaky\",code=\"UNAVAILABLE\"}"),
        1.0
    );
    assert_eq!(
        value("aggregator_source_requests_total{source=\"flaky\",code=\"OK\"}"),
        1.0
    );
    assert_eq!(
        value("aggregator_source_hedges_total{source=\"slow\"}"),
        1.0
    );
    // The hedge won; the first request was cancelled.
    assert_eq!(
        value("aggregator_source_requests_total{source=\"slow\",code=\"OK\"}"),
        1.0
    );
    assert_eq!(
        value("aggregator_source_requests_total{source=\"slow\",code=\"CANCELLED\"}"),
        1.0
    );
    assert_eq!(
        value("aggregator_source_skipped_total{source=\"down\"}"),
        1.0
    );
    assert_eq!(value("aggregator_calls_shed_total"), 1.0);
    assert_eq!(
        value(
            "aggregator_calls_total{rpc=\"Aggregate\",aggregation=\"flaky\",code=\"RESOURCE_EXHAUSTED\"}"
        ),
        1.0
    );
    assert_eq!(
        value("aggregator_coalesce_wait_seconds_count{source=\"held\"}"),
        2.0
    );
    assert_eq!(
        value("aggregator_coalesce_joined_calls_total{source=\"held\"}"),
        2.0
    );
    assert_eq!(value("aggregator_calls_in_flight"), 0.0);
}

#[tokio::test]
async fn the_scrapers_accept_header_picks_the_format_and_promtool_accepts_both() {
    let ok = Upstream::http().start().await;
    let (gw, metrics) = Gateway::start_with_metrics(&format!(
        "{}{}",
        http_source("ok", &ok, "/ok/{user_id}"),
        aggregation("good", &["ok"], ""),
    ))
    .await;
    gw.client()
        .await
        .aggregate(call("good", "1"))
        .await
        .unwrap();
    let (classic_type, classic) = scrape(metrics, None).await;
    assert!(
        classic_type.starts_with("text/plain; version=0.0.4"),
        "{classic_type}"
    );
    assert!(!classic.contains("# EOF"));
    assert!(
        classic.contains("# TYPE aggregator_calls_total counter"),
        "{classic}"
    );
    // What Prometheus itself sends.
    let accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3";
    let (om_type, om) = scrape(metrics, Some(accept)).await;
    assert!(
        om_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{om_type}"
    );
    assert!(om.trim_end().ends_with("# EOF"));
    assert!(om.contains("# TYPE aggregator_calls counter"), "{om}");
    promtool(&classic);
}

/// `promtool check metrics` on `text`, where promtool is installed (CI
/// installs it and sets AGGREGATOR_REQUIRE_PROMTOOL, so that it cannot be
/// skipped there).
fn promtool(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if std::env::var_os("AGGREGATOR_REQUIRE_PROMTOOL").is_none() => {
            eprintln!("promtool not run ({e}): install Debian's `prometheus` to check the format");
            return;
        }
        Err(e) => panic!("promtool is required here: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
