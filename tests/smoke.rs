mod support;

use aggregator::pb::aggregator::v1::AggregateRequest;
use support::*;

#[tokio::test]
async fn merges_a_grpc_and_an_http_source() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http()
        .json(serde_json::json!({"count": 2}))
        .start()
        .await;
    let gateway = Gateway::start(&format!(
        "{}{}{}",
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], "")
    ))
    .await;
    let response = gateway
        .client()
        .await
        .aggregate(AggregateRequest {
            payload: None,
            aggregation: "dash".into(),
            params: params(&[("user_id", "7")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.complete);
    let data = response.data.unwrap();
    assert!(data.fields.contains_key("profile"));
    assert!(data.fields.contains_key("orders"));
    assert_eq!(orders.log.requests()[0].target, "/users/7/orders");
    assert_eq!(profile.log.requests()[0].target, "7");
}
