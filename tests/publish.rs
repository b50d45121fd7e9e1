//! Publishing: one `FetchAll` POSTs the caller's payload to several webhook
//! targets at once, best-effort, `min_success` deciding the call. Also the
//! demo's `publish_alert`, and the payload's size cap.

mod support;

use aggregator::pb::aggregator::v1::{FetchAllRequest, Mode};
use serde_json::json;
use support::*;
use tonic::Code;

fn publish(aggregation: &str, alert: serde_json::Value) -> FetchAllRequest {
    FetchAllRequest {
        aggregation: aggregation.into(),
        params: params(&[]),
        sources: vec![],
        mode: Mode::Unspecified as i32,
        payload: payload(alert),
    }
}

/// Five webhook targets, the last `failing` of them answering 503, and an
/// aggregation publishing to all of them.
async fn targets(failing: usize) -> (Vec<Running>, Gateway) {
    let mut targets = Vec::new();
    let mut toml = String::from("[server]\nmax_payload_bytes = 4096\n");
    for i in 0..5 {
        let status = if i >= 5 - failing { 503 } else { 200 };
        let target = Upstream::http()
            .answer_with(move |_, _| (status, json!({ "accepted": status == 200 })))
            .start()
            .await;
        toml += &http_source(&format!("hook{i}"), &target, "/hook");
        toml += "method = \"POST\"\nbody = \"{$payload}\"\n";
        targets.push(target);
    }
    let names: Vec<String> = (0..5).map(|i| format!("hook{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    toml += &aggregation("alert", &names, "mode = \"best_effort\"\nmin_success = 3");
    (targets, Gateway::start(&toml).await)
}

#[tokio::test]
async fn one_call_posts_the_payload_to_every_target() {
    let (targets, gateway) = targets(1).await;
    let alert = json!({"alert": {"id": "a-1", "severity": "page", "count": 3, "tags": ["db"]}});
    let response = gateway
        .client()
        .await
        .fetch_all(publish("alert", alert.clone()))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert!(!response.complete);
    let codes: Vec<Code> = response
        .results
        .iter()
        .map(|r| Code::from(r.code))
        .collect();
    assert_eq!(codes[..4], [Code::Ok; 4]);
    assert_eq!(codes[4], Code::Unavailable);
    assert!(response.results.iter().all(|r| r.elapsed.is_some()));
    for target in &targets {
        let seen = target.log.requests();
        assert_eq!(seen.len(), 1, "a POST is sent once, never retried");
        let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
        assert_eq!(body, alert, "the body is the payload, whole");
    }
}

#[tokio::test]
async fn too_few_targets_taking_it_fail_the_call() {
    let (_targets, gateway) = targets(3).await;
    let status = gateway
        .client()
        .await
        .fetch_all(publish("alert", json!({"alert": {"id": "a-2"}})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "2 of 5 sources succeeded (min_success = 3)"
    );
}

#[tokio::test]
async fn a_payload_over_max_payload_bytes_is_refused_before_any_request() {
    let (targets, gateway) = targets(0).await;
    let status = gateway
        .client()
        .await
        .fetch_all(publish("alert", json!({"blob": "x".repeat(5000)})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_payload_bytes"), "{status:?}");
    assert!(targets.iter().all(|t| t.log.stats().started == 0));
}

#[tokio::test]
async fn the_demo_publishes_an_alert_with_its_pager_target_down() {
    let demo = Demo::start().await;
    let alert = json!({"alert": {"id": "a-1"}});
    let response = demo
        .client()
        .await
        .fetch_all(publish("publish_alert", alert.clone()))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let results: Vec<(&str, Code)> = response
        .results
        .iter()
        .map(|r| (r.source.as_str(), Code::from(r.code)))
        .collect();
    assert_eq!(
        results,
        [
            ("hook_ops", Code::Ok),
            ("hook_chat", Code::Ok),
            ("hook_audit", Code::Ok),
            ("hook_mail", Code::Ok),
            ("hook_pager", Code::Unavailable),
        ]
    );
    let ops = json_of(match &response.results[0].data.as_ref().unwrap().kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        other => panic!("{other:?}"),
    });
    let bytes = alert.to_string().len();
    assert_eq!(
        ops,
        json!({"target": "ops", "accepted": true, "bytes": bytes})
    );
    demo.stop().await;
}
