//! Shaping answers: `transform` (JMESPath) on a source and on an
//! aggregation, and `keys` placing each source in the merged document.
//! Filters are bounded: one that could blow its input up is refused at
//! load, and a result over the size cap fails instead of growing.

mod support;

use std::{path::Path, time::Duration};

use aggregator::{config::Config, pb::aggregator::v1::AggregateRequest};
use serde_json::json;
use support::*;
use tonic::Code;

fn call(aggregation: &str) -> AggregateRequest {
    aggregate_request(aggregation, &[("user_id", "7")])
}

async fn profile_and_orders() -> (Running, Running) {
    let profile = Upstream::http()
        .json(json!({"name": "Ada", "email": "ada@example.com", "id": 7, "internal": {"x": 1}}))
        .start()
        .await;
    let orders = Upstream::http()
        .json(json!({"count": 2, "orders": [{"id": 1, "total": 5}, {"id": 2, "total": 50}]}))
        .start()
        .await;
    (profile, orders)
}

#[tokio::test]
async fn transforms_and_keys_shape_the_answer() {
    let (profile, orders) = profile_and_orders().await;
    let seen = Upstream::http().start().await;
    let gateway = Gateway::start(
        &[
            http_source("profile", &profile, "/p"),
            "transform = \"{name: name, email: email}\"\n".into(),
            http_source("orders", &orders, "/o"),
            "transform = \"{count: count, big: orders[?total > `10`].id}\"\n".into(),
            // A dependent sees the transformed result.
            http_source("greeting", &seen, "/hello/{$profile.name}"),
            aggregation(
                "shaped",
                &["profile", "orders", "greeting"],
                "keys = { profile = \"user\", orders = \"\" }",
            ),
            aggregation(
                "final",
                &["profile", "orders"],
                "transform = \"{who: profile.name, orders: orders.count}\"",
            ),
        ]
        .concat(),
    )
    .await;
    let mut client = gateway.client().await;
    let response = client
        .aggregate(call("shaped"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert_eq!(
        json_of(response.data.as_ref().unwrap()),
        json!({
            "user": {"name": "Ada", "email": "ada@example.com"},
            "count": 2,
            "big": [2],
            "greeting": {"ok": true},
        })
    );
    assert_eq!(seen.log.requests()[0].target, "/hello/Ada");

    let response = client
        .aggregate(call("final"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert_eq!(
        json_of(response.data.as_ref().unwrap()),
        json!({"who": "Ada", "orders": 2})
    );
}

#[tokio::test]
async fn shaping_failures_are_internal_and_name_what_failed() {
    let (profile, orders) = profile_and_orders().await;
    let gateway = Gateway::start(
        &[
            http_source("profile", &profile, "/p"),
            http_source("orders", &orders, "/o"),
            http_source("broken", &profile, "/p"),
            "transform = \"abs(name)\"\n".into(),
            // `count` of orders merges at the top level, onto profile's key.
            aggregation(
                "collide",
                &["profile", "orders"],
                "keys = { profile = \"count\", orders = \"\" }",
            ),
            aggregation("filter", &["broken"], ""),
            aggregation("not_object", &["profile"], "transform = \"profile.name\""),
        ]
        .concat(),
    )
    .await;
    let mut client = gateway.client().await;
    let status = client.aggregate(call("collide")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(
        status.message(),
        "sources 'profile' and 'orders' both put 'count' in the answer"
    );

    let status = client.aggregate(call("filter")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("source 'broken': transform `abs(name)` failed:"),
        "{status:?}"
    );

    let status = client.aggregate(call("not_object")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("must be an object"), "{status:?}");
}

#[tokio::test]
async fn a_looping_or_exploding_filter_cannot_hang_the_gateway() {
    let up = Upstream::http().start().await;
    let load = |transform: &str| {
        let toml = [
            http_source("a", &up, "/a"),
            format!("transform = '{transform}'\n"),
        ]
        .concat();
        Config::parse(&toml, "test", Path::new(".")).map(|_| ())
    };
    // JMESPath has no loops: jq's `repeat(.)` is not even valid syntax.
    let looping = load("repeat(.)").unwrap_err().to_string();
    assert!(looping.contains("`sources.a.transform`"), "{looping}");
    // Each `[@, @]` doubles the input: nine of them could make it 512 times larger.
    let exploding = load(&["[@, @]"; 9].join(" | ")).unwrap_err().to_string();
    assert!(exploding.contains("512 times larger"), "{exploding}");

    // Within the bound, a result over the size cap fails fast, and the
    // gateway goes on serving.
    let big = Upstream::http()
        .json(json!({"text": "x".repeat(200_000)}))
        .start()
        .await;
    let gateway = Gateway::start(
        &[
            http_source("big", &big, "/big"),
            format!("transform = '{}'\n", ["[@, @]"; 8].join(" | ")),
            aggregation("big", &["big"], ""),
            http_source("fine", &up, "/fine"),
            aggregation("fine", &["fine"], ""),
        ]
        .concat(),
    )
    .await;
    let mut client = gateway.client().await;
    let status = client
        .aggregate(with_timeout(call("big"), Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("max_response_bytes"),
        "{status:?}"
    );
    client
        .aggregate(call("fine"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
}

#[test]
fn landing_collisions_known_at_load_are_refused() {
    let toml = "[sources.a]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/a\"\n\
                [sources.b]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/b\"\n\
                [aggregations.x]\nsources = [\"a\", \"b\"]\nkeys = { a = \"b\" }\n";
    let error = Config::parse(toml, "test", Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(error.contains("`aggregations.x.keys`"), "{error}");
    assert!(
        error.contains("sources 'a' and 'b' both land at 'b'"),
        "{error}"
    );
}
