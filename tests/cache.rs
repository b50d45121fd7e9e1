//! A source's response cache, end to end, with each store: in this process
//! and in a real `redis-server`. Every scenario runs against both, so the
//! memory store is held to what the shared one does.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering::SeqCst},
    },
    time::Duration,
};

use aggregator::pb::aggregator::v1::{AggregateResponse, SourceResult};
use serde_json::json;
use support::*;
use tonic::Code;

with_each_store!(
    a_hit_sends_nothing_upstream,
    an_entry_expires_after_its_ttl,
    stale_while_revalidate_serves_at_once_and_refreshes_once,
    stale_if_error_stands_in_for_a_failed_call,
    cache_control_no_store_is_not_stored,
    different_credentials_never_share_an_entry,
);

/// A gateway with one cached HTTP source, `profile`, in aggregation `a`.
async fn gateway(store: &Backing, upstream: &Running, cache: &str, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "{}{}coalesce = false\ncache = {cache}\n{extra}\n{}",
        store.server(),
        http_source("profile", upstream, "/users/{user_id}"),
        aggregation("a", &["profile"], ""),
    ))
    .await
}

async fn call(gateway: &Gateway, user: &str) -> (AggregateResponse, SourceResult) {
    let response = gateway
        .client()
        .await
        .aggregate(aggregate_request("a", &[("user_id", user)]))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let source = response.sources[0].clone();
    (response, source)
}

/// An upstream answering `{"n": N}`, N counting its requests.
fn counting() -> (Arc<AtomicU32>, HttpUpstream) {
    let n = Arc::new(AtomicU32::new(0));
    let count = n.clone();
    let upstream = Upstream::http().answer_with(move |_, _| {
        let n = count.fetch_add(1, SeqCst) + 1;
        (200, json!({ "n": n }))
    });
    (n, upstream)
}

fn n_of(response: &AggregateResponse) -> serde_json::Value {
    json_of(response.data.as_ref().unwrap())["profile"]["n"].clone()
}

async fn a_hit_sends_nothing_upstream(store: Backing) {
    let (_, upstream) = counting();
    let upstream = upstream.start().await;
    let (gateway, metrics) = Gateway::start_with_metrics(&format!(
        "{}{}coalesce = false\ncache = {{ ttl = \"60s\" }}\n{}",
        store.server(),
        http_source("profile", &upstream, "/users/{user_id}"),
        aggregation("a", &["profile"], ""),
    ))
    .await;
    let (first, source) = call(&gateway, "7").await;
    assert!(!source.cached && source.age.is_none(), "{source:?}");
    assert_eq!(source.attempts, 1);
    let (second, source) = call(&gateway, "7").await;
    assert!(source.cached, "{source:?}");
    assert_eq!((source.code, source.attempts), (0, 0), "{source:?}");
    assert!(source.age.is_some());
    assert_eq!(n_of(&first), json!(1));
    assert_eq!(n_of(&second), json!(1), "the same answer, from the cache");
    assert_eq!(upstream.log.stats().started, 1, "a hit sends nothing");
    // Another request is another entry.
    let (other, _) = call(&gateway, "8").await;
    assert_eq!(n_of(&other), json!(2));

    let (_, text) = scrape(metrics, None).await;
    let count = |result: &str| {
        let series =
            format!("aggregator_cache_requests_total{{source=\"profile\",result=\"{result}\"}}");
        sample(&text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(
        (count("hit"), count("miss"), count("stale")),
        (1.0, 2.0, 0.0)
    );
    if let Backing::Redis(redis) = &store {
        let keys = redis.keys("aggregator:cache:profile:").await;
        assert_eq!(keys.len(), 2, "one key per request: {keys:?}");
    }
}

async fn an_entry_expires_after_its_ttl(store: Backing) {
    let (_, upstream) = counting();
    let upstream = upstream.start().await;
    let gateway = gateway(&store, &upstream, "{ ttl = \"300ms\" }", "").await;
    let (first, _) = call(&gateway, "7").await;
    // Past the ttl by a wide margin, whatever the machine's speed.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (again, source) = call(&gateway, "7").await;
    assert!(!source.cached, "{source:?}");
    assert_eq!((n_of(&first), n_of(&again)), (json!(1), json!(2)));
}

async fn stale_while_revalidate_serves_at_once_and_refreshes_once(store: Backing) {
    let (_, upstream) = counting();
    // The refresh (every request after the first) waits at the gate, so
    // every call below is made while it is in flight.
    let gate = Gate::new();
    let upstream = upstream.gated_after(1, &gate).start().await;
    let gateway = gateway(
        &store,
        &upstream,
        "{ ttl = \"300ms\", stale_while_revalidate = \"60s\" }",
        "",
    )
    .await;
    call(&gateway, "7").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let calls = (0..10).map(|_| call(&gateway, "7"));
    for (response, source) in futures_util::future::join_all(calls).await {
        assert!(source.cached, "stale, served at once: {source:?}");
        assert_eq!((source.code, source.attempts), (0, 0));
        let age = Duration::try_from(source.age.unwrap()).unwrap();
        assert!(age >= Duration::from_millis(300), "past its ttl: {age:?}");
        assert_eq!(n_of(&response), json!(1));
    }
    assert!(
        upstream
            .log
            .wait_for(Duration::from_secs(10), |s| s.started == 2)
            .await,
        "one refresh was sent"
    );
    // A second refresh would start at once, on the next stale call; give
    // one a moment to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.log.stats().started, 2, "and only one");
    gate.open();
    // Once the refresh has landed, calls get its answer.
    let mut refreshed = false;
    for _ in 0..200 {
        let (response, _) = call(&gateway, "7").await;
        if n_of(&response) == json!(2) {
            refreshed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refreshed, "the refreshed answer replaced the stale one");
}

async fn stale_if_error_stands_in_for_a_failed_call(store: Backing) {
    let failing = Arc::new(AtomicBool::new(false));
    let down = failing.clone();
    let upstream = Upstream::http()
        .answer_with(move |_, _| match down.load(SeqCst) {
            true => (503, json!({})),
            false => (200, json!({"n": 1})),
        })
        .start()
        .await;
    let gateway = gateway(
        &store,
        &upstream,
        "{ ttl = \"300ms\", stale_if_error = \"60s\" }",
        "",
    )
    .await;
    call(&gateway, "7").await;
    failing.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (response, source) = call(&gateway, "7").await;
    assert_eq!(n_of(&response), json!(1), "the stale entry answered");
    assert!(source.cached, "{source:?}");
    assert_eq!(source.code, 0, "OK, with the failure in the message");
    assert!(source.message.contains("HTTP 503"), "{source:?}");
    assert_eq!(source.attempts, 1, "the upstream was asked first");
    assert!(response.complete);
    // Without an entry, the failure is the caller's to see.
    let failed = gateway
        .client()
        .await
        .aggregate(aggregate_request("a", &[("user_id", "8")]))
        .await
        .expect_err("no entry to stand in");
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
}

async fn cache_control_no_store_is_not_stored(store: Backing) {
    let (_, upstream) = counting();
    let upstream = upstream.header("cache-control", "no-store").start().await;
    let gateway = gateway(&store, &upstream, "{ ttl = \"60s\" }", "").await;
    call(&gateway, "7").await;
    let (again, source) = call(&gateway, "7").await;
    assert!(!source.cached);
    assert_eq!(n_of(&again), json!(2));
    assert_eq!(upstream.log.stats().started, 2);
}

async fn different_credentials_never_share_an_entry(store: Backing) {
    let (_, upstream) = counting();
    let upstream = upstream.start().await;
    let gateway = gateway(
        &store,
        &upstream,
        "{ ttl = \"60s\" }",
        "forward_metadata = [\"authorization\"]",
    )
    .await;
    let mut client = gateway.client().await;
    let mut as_caller = async |token: &str| {
        let mut request = tonic::Request::new(aggregate_request("a", &[("user_id", "7")]));
        request
            .metadata_mut()
            .insert("authorization", token.parse().unwrap());
        let response = client.aggregate(request).await.unwrap().into_inner();
        (n_of(&response), response.sources[0].cached)
    };
    assert_eq!(as_caller("Bearer alice").await, (json!(1), false));
    assert_eq!(
        as_caller("Bearer bob").await,
        (json!(2), false),
        "bob is not served alice's"
    );
    assert_eq!(as_caller("Bearer alice").await, (json!(1), true));
    assert_eq!(as_caller("Bearer bob").await, (json!(2), true));
    assert_eq!(upstream.log.stats().started, 2);
}

#[tokio::test]
async fn the_memory_store_holds_at_most_max_entries() {
    let (_, upstream) = counting();
    let upstream = upstream.start().await;
    let (gateway, metrics) = Gateway::start_with_metrics(&format!(
        "{}coalesce = false\ncache = {{ ttl = \"60s\", max_entries = 2 }}\n{}",
        http_source("profile", &upstream, "/users/{user_id}"),
        aggregation("a", &["profile"], ""),
    ))
    .await;
    for user in 0..50 {
        call(&gateway, &user.to_string()).await;
    }
    let (_, text) = scrape(metrics, None).await;
    let entries = sample(&text, "aggregator_cache_entries{source=\"profile\"}")
        .unwrap_or_else(|| panic!("no aggregator_cache_entries in\n{text}"));
    assert!(entries <= 2.0, "{entries} entries kept, max_entries = 2");
    assert!(entries >= 1.0, "the cache keeps something: {entries}");
}

#[tokio::test]
async fn the_caching_example_runs_against_the_demo_upstreams() {
    let demo = Demo::example("caching.toml").await;
    let client = demo.client().await;
    let call = |key: &'static str| {
        let mut client = client.clone();
        async move {
            let mut request =
                tonic::Request::new(aggregate_request("user_dashboard", &[("user_id", "42")]));
            request
                .metadata_mut()
                .insert("x-api-key", key.parse().unwrap());
            client.aggregate(request).await.map(|r| r.into_inner())
        }
    };
    let first = call("alice").await.unwrap_or_else(|s| panic!("{s:?}"));
    assert!(first.sources.iter().all(|s| !s.cached), "{first:?}");
    let second = call("alice").await.unwrap_or_else(|s| panic!("{s:?}"));
    assert!(second.sources.iter().all(|s| s.cached), "{second:?}");
    assert_eq!(first.data, second.data);

    // 60 calls at once on one key: the burst of 20, and 10 a second for as
    // long as they took, get through (2 of alice's are spent above).
    let started = std::time::Instant::now();
    let results = futures_util::future::join_all((0..60).map(|_| call("bob"))).await;
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = results.iter().filter(|r| r.is_ok()).count() as f64;
    let most = 20.0 + (10.0 * elapsed).ceil() + 1.0;
    assert!(
        (20.0..=most).contains(&allowed),
        "{allowed} in {elapsed:.3}s"
    );
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    demo.stop().await;
}

#[tokio::test]
async fn caches_that_cannot_work_are_startup_errors() {
    let source = "[sources.s]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\n";
    let cases = [
        ("cache = { ttl = \"0s\" }", "sources.s.cache.ttl"),
        (
            "cache = { ttl = \"1s\", max_entries = 0 }",
            "sources.s.cache.max_entries",
        ),
        ("cache = { stale_if_error = \"1s\" }", "ttl"),
        ("cache = { ttl = \"1s\", stale = \"1s\" }", "stale"),
    ];
    for (line, key) in cases {
        let text = format!("{source}{line}\n[aggregations.a]\nsources = [\"s\"]\n");
        let error = startup_error(&text);
        assert!(error.contains(key), "{line}: {error}");
    }
    let store = "[server]\nstore = \"http://127.0.0.1:1\"\n";
    let error = startup_error(store);
    assert!(error.contains("server.store"), "{error}");
}
