//! Dependent calls: `{$source.path}` references make an aggregation a graph.
//! Each source starts once the sources it reads have finished, under the one
//! deadline; references are substituted exactly; a failed or incomplete
//! dependency stops its dependents; bad graphs are refused at load.

mod support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aggregator::{
    config::Config,
    pb::aggregator::v1::{AggregateRequest, FetchAllRequest, Mode},
};
use serde_json::json;
use support::*;
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(10);

fn call(aggregation: &str) -> AggregateRequest {
    aggregate_request(aggregation, &[("user_id", "7")])
}

fn fetch(aggregation: &str, sources: &[&str], mode: Mode) -> FetchAllRequest {
    FetchAllRequest {
        aggregation: aggregation.into(),
        params: params(&[("user_id", "7")]),
        sources: sources.iter().map(|s| s.to_string()).collect(),
        mode: mode as i32,
        payload: None,
    }
}

/// A gateway serving `parts`, and the status of `call("dash")`, which must fail.
async fn failing_call(parts: &[String]) -> tonic::Status {
    let gateway = Gateway::start(&parts.concat()).await;
    let mut client = gateway.client().await;
    client.aggregate(call("dash")).await.unwrap_err()
}

/// An HTTP upstream answering `/orders/{user}` with the orders of that user
/// (SKUs `sku-1`..`sku-n`) and `/stock/{sku}` with that SKU's stock.
fn shop(orders: usize) -> HttpUpstream {
    Upstream::http().answer_with(move |target, _| {
        if let Some(user) = target.strip_prefix("/orders/") {
            let orders: Vec<_> = (1..=orders)
                .map(|n| json!({"id": n, "sku": format!("sku-{n}")}))
                .collect();
            return (200, json!({"user": user, "orders": orders}));
        }
        match target.strip_prefix("/stock/") {
            Some(sku) => (200, json!({"sku": sku, "available": sku.len()})),
            None => (404, json!({"error": "no such path"})),
        }
    })
}

#[tokio::test]
async fn a_three_level_chain_takes_the_sum_of_its_levels_and_no_more() {
    const LEVEL: Duration = Duration::from_millis(200);
    let profile = Upstream::grpc().delay(LEVEL).start().await;
    let orders = shop(3).delay(LEVEL).start().await;
    let stock = shop(0).delay(LEVEL).start().await;
    let gateway = Gateway::start(
        &[
            grpc_source("profile", &profile),
            http_source("orders", &orders, "/orders/{$profile.user_id}"),
            http_source("stock", &stock, "/stock/{$item.sku}"),
            "for_each = \"$orders.orders\"\n".into(),
            aggregation("chain", &["profile", "orders", "stock"], ""),
        ]
        .concat(),
    )
    .await;

    let started = Instant::now();
    let response = gateway
        .client()
        .await
        .aggregate(call("chain"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let elapsed = started.elapsed();
    let data = json_of(response.data.as_ref().unwrap());
    assert_eq!(
        data["orders"]["user"], "7",
        "orders read the profile: {data}"
    );
    assert_eq!(
        data["stock"],
        json!([
            {"sku": "sku-1", "available": 5},
            {"sku": "sku-2", "available": 5},
            {"sku": "sku-3", "available": 5}
        ])
    );
    let attempts: Vec<u32> = response.sources.iter().map(|s| s.attempts).collect();
    assert_eq!(attempts, [1, 1, 3], "attempts count every request sent");
    assert_eq!(orders.log.requests()[0].target, "/orders/7");
    // Three levels one after the other: at least their sum. The three
    // stock lookups run together, so not much more (a generous margin).
    assert!(elapsed >= 3 * LEVEL, "levels overlapped: {elapsed:?}");
    assert!(
        elapsed < 3 * LEVEL + Duration::from_secs(3),
        "the chain took far more than its levels: {elapsed:?}"
    );
}

#[tokio::test]
async fn a_source_starts_when_its_own_dependencies_finish_not_in_waves() {
    // `slow` is held by a gate; `fast` answers; `after_fast` reads `fast`.
    // In waves, `after_fast` would wait for `slow` too.
    let gate = Gate::new();
    let slow = Upstream::http().gated(&gate).start().await;
    let fast = Upstream::http().json(json!({"id": 5})).start().await;
    let after_fast = Upstream::http().start().await;
    let gateway = Gateway::start(
        &[
            http_source("slow", &slow, "/slow"),
            http_source("fast", &fast, "/fast"),
            http_source("after_fast", &after_fast, "/after/{$fast.id}"),
            aggregation("graph", &["slow", "fast", "after_fast"], ""),
        ]
        .concat(),
    )
    .await;
    let mut client = gateway.client().await;
    let (response, ()) = tokio::join!(client.aggregate(call("graph")), async {
        let overlapped = after_fast.log.wait_for(PATIENCE, |s| s.started == 1).await;
        assert!(overlapped, "after_fast waited for slow");
        assert_eq!(
            slow.log.stats().in_flight(),
            1,
            "slow and fast ran together"
        );
        gate.open();
    });
    response.unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(after_fast.log.requests()[0].target, "/after/5");
}

#[tokio::test]
async fn referenced_values_arrive_exactly() {
    let name = "Ada \"the first\" / Lovelace";
    let profile = Upstream::http()
        .json(json!({"account": {"id": 42, "name": name}, "tags": ["a", "b"]}))
        .start()
        .await;
    let sink = Upstream::http()
        .answer_with(|_, _| (200, json!({})))
        .start()
        .await;
    let gateway = Gateway::start(
        &[
            http_source("profile", &profile, "/profile"),
            http_source(
                "sink",
                &sink,
                "/accounts/{$profile.account.name}?id={$profile.account.id}",
            ),
            "method = \"POST\"\n".into(),
            "headers = { x-account = \"{$profile.account.id}\" }\n".into(),
            "body = { id = \"{$profile.account.id}\", name = \"{$profile.account.name}\", \
         label = \"user {$profile.account.id}: {$profile.account.name}\", \
         tags = \"{$profile.tags}\", account = \"{$profile.account}\" }\n"
                .into(),
            aggregation("exact", &["profile", "sink"], ""),
        ]
        .concat(),
    )
    .await;
    gateway
        .client()
        .await
        .aggregate(call("exact"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    let seen = &sink.log.requests()[0];
    let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    // A whole-value reference keeps its type; inside a string it is text.
    assert_eq!(
        body,
        json!({
            "id": 42,
            "name": name,
            "label": format!("user 42: {name}"),
            "tags": ["a", "b"],
            "account": {"id": 42, "name": name},
        })
    );
    // URLs and headers take text, escaped for where it lands.
    assert_eq!(
        seen.target,
        "/accounts/Ada%20%22the%20first%22%20%2F%20Lovelace?id=42"
    );
    assert_eq!(seen.headers["x-account"], "42");
}

#[tokio::test]
async fn a_path_missing_from_a_dependency_fails_the_dependent() {
    let profile = Upstream::http().json(json!({"account": {}})).start().await;
    let orders = Upstream::http().start().await;
    let status = failing_call(&[
        http_source("profile", &profile, "/profile"),
        http_source("orders", &orders, "/orders/{$profile.account.id}"),
        aggregation("dash", &["profile", "orders"], ""),
    ])
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.message(),
        "source 'orders': missing path '$profile.account.id'"
    );
    assert_eq!(orders.log.stats().started, 0);
}

#[tokio::test]
async fn a_failed_dependency_skips_its_dependents() {
    let profile = Upstream::http().status(503).start().await;
    let orders = Upstream::http().start().await;
    let other = Upstream::http().start().await;
    let gateway = Gateway::start(
        &[
            http_source("profile", &profile, "/profile"),
            http_source("orders", &orders, "/orders/{$profile.id}"),
            http_source("other", &other, "/other"),
            aggregation("dash", &["profile", "orders", "other"], ""),
            aggregation(
                "lenient",
                &["profile", "orders", "other"],
                "optional = [\"profile\"]",
            ),
        ]
        .concat(),
    )
    .await;
    let mut client = gateway.client().await;

    let response = client
        .fetch_all(fetch("dash", &[], Mode::BestEffort))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let results: Vec<_> = response
        .results
        .iter()
        .map(|r| {
            (
                r.source.as_str(),
                Code::from(r.code),
                r.skipped,
                r.message.as_str(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            (
                "profile",
                Code::Unavailable,
                false,
                "upstream answered HTTP 503 Service Unavailable"
            ),
            (
                "orders",
                Code::FailedPrecondition,
                true,
                "dependency 'profile' failed"
            ),
            ("other", Code::Ok, false, ""),
        ]
    );
    assert_eq!(
        orders.log.stats().started,
        0,
        "a skipped source is not called"
    );

    // A required source that cannot run because its optional dependency
    // failed fails the call in fail-fast mode.
    let status = client.aggregate(call("lenient")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.message(),
        "source 'orders': dependency 'profile' failed"
    );
    assert_eq!(orders.log.stats().started, 0);
}

#[tokio::test]
async fn fetch_all_of_a_dependent_runs_and_reports_its_dependencies() {
    let profile = Upstream::http().json(json!({"id": 3})).start().await;
    let orders = Upstream::http().start().await;
    let unrelated = Upstream::http().start().await;
    let gateway = Gateway::start(
        &[
            http_source("profile", &profile, "/profile"),
            http_source("orders", &orders, "/orders/{$profile.id}"),
            http_source("unrelated", &unrelated, "/x"),
            aggregation(
                "dash",
                &["unrelated", "profile", "orders"],
                "min_success = 2",
            ),
        ]
        .concat(),
    )
    .await;
    let response = gateway
        .client()
        .await
        .fetch_all(fetch("dash", &["orders"], Mode::Unspecified))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let names: Vec<&str> = response.results.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(names, ["profile", "orders"]);
    assert!(response.complete);
    assert_eq!(orders.log.requests()[0].target, "/orders/3");
    assert_eq!(unrelated.log.stats().started, 0);
}

#[tokio::test]
async fn a_caller_leaving_mid_chain_cancels_the_level_in_flight_and_starts_no_other() {
    // profile answers; orders, which reads it, is held; stock reads orders.
    let gate = Gate::new();
    let profile = Upstream::http().json(json!({"id": 1})).start().await;
    let orders = Upstream::http()
        .json(json!({"id": 2}))
        .gated(&gate)
        .start()
        .await;
    let stock = Upstream::http().start().await;
    let gateway = Gateway::start(
        &[
            http_source("profile", &profile, "/profile"),
            http_source("orders", &orders, "/orders/{$profile.id}"),
            http_source("stock", &stock, "/stock/{$orders.id}"),
            aggregation("chain", &["profile", "orders", "stock"], ""),
        ]
        .concat(),
    )
    .await;
    let mut client = gateway.client().await;
    let pending = tokio::spawn(async move { client.aggregate(call("chain")).await });
    assert!(orders.log.wait_for(PATIENCE, |s| s.started == 1).await);
    pending.abort();
    // The level in flight is aborted on the wire: nothing is left to
    // answer it, so nothing is left to start the next level either.
    assert!(
        orders.log.wait_for(PATIENCE, |s| s.cancelled == 1).await,
        "the request in flight was not aborted: {:?}",
        orders.log.stats()
    );
    gate.open();
    assert_eq!(profile.log.stats().finished, 1);
    assert_eq!(stock.log.stats().started, 0);

    // The deadline reaches a dependent too: it gets what is left of it.
    let gate = Gate::new();
    let slow = Upstream::http()
        .json(json!({"id": 1}))
        .delay(Duration::from_millis(300))
        .start()
        .await;
    let hanging = Upstream::http().gated(&gate).start().await;
    let gateway = Gateway::start(
        &[
            http_source("slow", &slow, "/slow"),
            http_source("hanging", &hanging, "/h/{$slow.id}"),
            aggregation("dash", &["slow", "hanging"], "timeout = \"800ms\""),
        ]
        .concat(),
    )
    .await;
    let started = Instant::now();
    let status = gateway
        .client()
        .await
        .aggregate(call("dash"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert!(hanging.log.wait_for(PATIENCE, |s| s.cancelled == 1).await);
}

fn load_error(toml: &str) -> String {
    Config::parse(toml, "test", Path::new(env!("CARGO_MANIFEST_DIR")))
        .expect_err("the config must be refused")
        .to_string()
}

#[tokio::test]
async fn bad_graphs_are_refused_at_load_naming_the_chain_or_the_key() {
    let up = Upstream::http().start().await;
    let cycle = load_error(
        &[
            http_source("a", &up, "/a/{$b.id}"),
            http_source("b", &up, "/b/{$c.id}"),
            http_source("c", &up, "/c/{$a.id}"),
            aggregation("loop", &["a", "b", "c"], ""),
        ]
        .concat(),
    );
    assert!(cycle.contains("`aggregations.loop.sources`"), "{cycle}");
    assert!(cycle.contains("a → b → c → a"), "{cycle}");

    let outside = load_error(
        &[
            http_source("a", &up, "/a/{$b.id}"),
            http_source("b", &up, "/b"),
            aggregation("alone", &["a"], ""),
        ]
        .concat(),
    );
    assert!(
        outside.contains("source 'a' reads `$b.id`, but 'b' is not a source of this aggregation"),
        "{outside}"
    );

    // With descriptors, a path a Profile cannot have is known at load.
    let profile = Upstream::grpc().start().await;
    let schema = load_error(
        &[
            grpc_source("profile", &profile),
            "protos = [\"proto/demo/v1/demo.proto\"]\nimport_paths = [\"proto\"]\n".into(),
            http_source("orders", &up, "/orders/{$profile.acount.id}"),
            aggregation("dash", &["profile", "orders"], ""),
        ]
        .concat(),
    );
    assert!(schema.contains("`sources.orders`"), "{schema}");
    assert!(
        schema.contains("`demo.v1.Profile` has no field `acount`"),
        "{schema}"
    );

    // A gRPC `for_each` source's result is a list of its answers.
    let per_item = |path: &str| {
        [
            grpc_source("profiles", &profile).replace("{user_id}", "{$item}"),
            "protos = [\"proto/demo/v1/demo.proto\"]\nimport_paths = [\"proto\"]\n".into(),
            "for_each = \"$payload.ids\"\n".into(),
            http_source("names", &up, path),
            aggregation("dash", &["profiles", "names"], ""),
        ]
        .concat()
    };
    Config::parse(
        &per_item("/n/{$profiles.0.name}"),
        "test",
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let listed = load_error(&per_item("/n/{$profiles.name}"));
    assert!(
        listed.contains("its result is a list: `name` is not an index"),
        "{listed}"
    );

    let filter = load_error(
        &[
            http_source("a", &up, "/a"),
            "transform = \"{name: }\"\n".into(),
        ]
        .concat(),
    );
    assert!(filter.contains("`sources.a.transform`"), "{filter}");

    let reserved = load_error(&http_source("payload", &up, "/a"));
    assert!(reserved.contains("`payload` is reserved"), "{reserved}");

    let item = load_error(&http_source("a", &up, "/a/{$item.sku}"));
    assert!(item.contains("set `for_each`"), "{item}");

    let body = load_error(
        &[
            http_source("a", &up, "/a"),
            "method = \"POST\"\nbody = \"{x}\"\n".into(),
        ]
        .concat(),
    );
    assert!(body.contains("exactly one reference"), "{body}");
}

#[tokio::test]
async fn the_composition_example_runs_against_the_demo_upstreams() {
    let demo = Demo::example("composition.toml").await;
    let mut client = demo.client().await;
    let response = client
        .aggregate(AggregateRequest {
            aggregation: "order_status".into(),
            params: params(&[("user_id", "42")]),
            payload: None,
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let data = json_of(response.data.as_ref().unwrap());
    assert_eq!(data["user"]["email"], "grace@example.com", "{data}");
    let count = data["count"].as_u64().unwrap_or_else(|| panic!("{data}")) as usize;
    let stock = data["stock"].as_array().unwrap_or_else(|| panic!("{data}"));
    assert_eq!(stock.len(), count, "one stock lookup per order: {data}");
    assert!(
        stock
            .iter()
            .all(|s| s["sku"].is_string() && s["available"].is_number())
    );

    let response = client
        .aggregate(AggregateRequest {
            aggregation: "stock_check".into(),
            params: params(&[]),
            payload: payload(json!({"skus": ["sku-1", "sku-2"]})),
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let data = json_of(response.data.as_ref().unwrap());
    let skus: Vec<&str> = data["stock_for_caller"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sku"].as_str().unwrap())
        .collect();
    assert_eq!(skus, ["sku-1", "sku-2"]);
    demo.stop().await;
}

#[tokio::test]
async fn a_number_referenced_into_a_string_field_of_a_grpc_request_is_its_text() {
    let account = Upstream::http().json(json!({"id": 42})).start().await;
    let profile = Upstream::grpc().start().await;
    let gateway = Gateway::start(
        &[
            http_source("account", &account, "/account"),
            grpc_source("profile", &profile).replace("{user_id}", "{$account.id}"),
            aggregation("dash", &["account", "profile"], ""),
        ]
        .concat(),
    )
    .await;
    let response = gateway
        .client()
        .await
        .aggregate(call("dash"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    assert_eq!(profile.log.requests()[0].target, "42");
    let data = json_of(response.data.as_ref().unwrap());
    assert_eq!(data["profile"]["user_id"], "42");
}

#[tokio::test]
async fn a_huge_value_referenced_as_text_is_refused_naming_its_path() {
    let big = Upstream::http()
        .json(json!({"blob": "x".repeat(10_000)}))
        .start()
        .await;
    let reader = Upstream::http().start().await;
    let status = failing_call(&[
        http_source("big", &big, "/big"),
        http_source("reader", &reader, "/r"),
        "headers = { x-blob = \"{$big.blob}\" }\n".into(),
        aggregation("dash", &["big", "reader"], ""),
    ])
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.message(),
        "source 'reader': path '$big.blob' is longer than 8192 bytes as text"
    );
    assert_eq!(reader.log.stats().started, 0);
}
