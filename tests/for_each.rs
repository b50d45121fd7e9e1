//! `for_each`: one request per element of a list from another source or
//! from the caller's payload, at most `max_parallel` at a time, results in
//! the list's order, the list's length capped by `max_items`.

mod support;

use std::time::Duration;

use aggregator::pb::aggregator::v1::{AggregateRequest, FetchAllRequest, Mode};
use serde_json::json;
use support::*;
use tonic::Code;
use tonic_types::StatusExt;

const PATIENCE: Duration = Duration::from_secs(10);

fn call(aggregation: &str, payload_json: Option<serde_json::Value>) -> AggregateRequest {
    AggregateRequest {
        aggregation: aggregation.into(),
        params: params(&[]),
        payload: payload_json.and_then(payload),
    }
}

/// A list source answering `{"skus": [...]}` with `n` SKUs, and an item
/// source answering `/stock/{sku}` (and failing `sku-fail`).
async fn list_and_items(n: usize, items: HttpUpstream, extra: &str) -> (Running, Running, Gateway) {
    let skus: Vec<String> = (0..n).map(|i| format!("sku-{i}")).collect();
    let list = Upstream::http().json(json!({ "skus": skus })).start().await;
    let items = items
        .answer_with(|target, _| match target.strip_prefix("/stock/") {
            Some("sku-fail") => (500, json!({"error": "boom"})),
            Some(sku) => (200, json!({ "sku": sku })),
            None => (404, json!({})),
        })
        .start()
        .await;
    let gateway = Gateway::start(
        &[
            http_source("list", &list, "/list"),
            http_source("stock", &items, "/stock/{$item}"),
            format!("for_each = \"$list.skus\"\n{extra}\n"),
            aggregation("stock", &["list", "stock"], ""),
            http_source("mine", &items, "/stock/{$item.sku}"),
            "for_each = \"$payload.mine\"\nmax_items = 3\n".into(),
            aggregation("mine", &["mine"], ""),
        ]
        .concat(),
    )
    .await;
    (list, items, gateway)
}

#[tokio::test]
async fn fifty_items_four_at_a_time_all_arrive_in_order() {
    // The gate holds the first requests until four are in flight at once;
    // max_parallel must keep a fifth from ever starting alongside them.
    let gate = Gate::new();
    let (_list, items, gateway) =
        list_and_items(50, Upstream::http().gated(&gate), "max_parallel = 4").await;
    let mut client = gateway.client().await;
    let (response, ()) = tokio::join!(client.aggregate(call("stock", None)), async {
        assert!(items.log.wait_for(PATIENCE, |s| s.started == 4).await);
        gate.open();
    });
    let response = response.unwrap_or_else(|s| panic!("{s:?}")).into_inner();
    let stats = items.log.stats();
    assert_eq!(stats.peak, 4, "{stats:?}");
    assert_eq!(stats.started, 50);
    let expected: Vec<_> = (0..50)
        .map(|i| json!({ "sku": format!("sku-{i}") }))
        .collect();
    let data = json_of(response.data.as_ref().unwrap());
    assert_eq!(data["stock"], json!(expected));
    let mut targets: Vec<String> = items.log.requests().into_iter().map(|r| r.target).collect();
    targets.sort();
    let mut sent: Vec<String> = (0..50).map(|i| format!("/stock/sku-{i}")).collect();
    sent.sort();
    assert_eq!(targets, sent, "every item was requested once");
    assert_eq!(response.sources[1].attempts, 50);
}

#[tokio::test]
async fn a_list_over_max_items_is_refused_before_any_request() {
    let (_list, items, gateway) = list_and_items(101, Upstream::http(), "").await;
    let mut client = gateway.client().await;
    let status = client.aggregate(call("stock", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.message(),
        "source 'stock': `$list.skus` has 101 items, over max_items = 100 (for_each)"
    );
    // From the caller, the same is the caller's error.
    let mine: Vec<_> = (0..4).map(|i| json!({ "sku": format!("m-{i}") })).collect();
    let status = client
        .aggregate(call("mine", Some(json!({ "mine": mine }))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("has 4 items, over max_items = 3"),
        "{status:?}"
    );
    assert_eq!(items.log.stats().started, 0);
}

#[tokio::test]
async fn an_empty_list_gives_an_empty_result_without_a_request() {
    let (_list, items, gateway) = list_and_items(0, Upstream::http(), "").await;
    let response = gateway
        .client()
        .await
        .aggregate(call("stock", None))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let data = json_of(response.data.as_ref().unwrap());
    assert_eq!(data["stock"], json!([]));
    assert_eq!(response.sources[1].attempts, 0);
    assert_eq!(items.log.stats().started, 0);
}

#[tokio::test]
async fn items_from_the_payload_and_a_failing_item_named_by_index() {
    let (_list, _items, gateway) = list_and_items(0, Upstream::http(), "").await;
    let mut client = gateway.client().await;
    let mine = json!({ "mine": [{"sku": "a"}, {"sku": "b"}] });
    let response = client
        .aggregate(call("mine", Some(mine)))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let data = json_of(response.data.as_ref().unwrap());
    assert_eq!(data["mine"], json!([{"sku": "a"}, {"sku": "b"}]));

    let mine = json!({ "mine": [{"sku": "a"}, {"sku": "sku-fail"}] });
    let status = client
        .aggregate(call("mine", Some(mine)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("source 'mine': item 1: upstream answered HTTP 500"),
        "{status:?}"
    );

    // An item without the field its template reads is the caller's error.
    let mine = json!({ "mine": [{"sku": "a"}, {"name": "x"}] });
    let status = client
        .aggregate(call("mine", Some(mine)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "source 'mine': item 1: missing path '$item.sku'"
    );

    // Not a list.
    let status = client
        .aggregate(call("mine", Some(json!({ "mine": "abc" }))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("is a string, not a list"),
        "{status:?}"
    );

    // No payload at all: the path is missing, before anything is sent.
    let response = client
        .fetch_all(FetchAllRequest {
            aggregation: "mine".into(),
            params: params(&[]),
            sources: vec![],
            mode: Mode::BestEffort as i32,
            payload: None,
        })
        .await;
    let status = response.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("'$payload.mine'"), "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.metadata["path"].as_str()),
        ("MISSING_PATH", "$payload.mine")
    );
}

#[tokio::test]
async fn the_items_answers_together_are_capped_by_max_response_bytes() {
    let (_list, items, gateway) =
        list_and_items(50, Upstream::http(), "max_response_bytes = 200").await;
    let status = gateway
        .client()
        .await
        .aggregate(call("stock", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "source 'stock': response converts to more than 200 bytes of JSON (max_response_bytes)"
    );
    assert!(
        items.log.stats().started < 50,
        "the rest of the list was not sent"
    );
}
