//! Replicas sharing one real `redis-server`: a cache entry one fills, the
//! other serves; a limit holds for both together. And Redis misbehaving:
//! stopped, restarted, paused (SIGSTOP), the gateway keeps answering within
//! its store budget and recovers by itself.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use aggregator::pb::aggregator::v1::SourceResult;
use serde_json::json;
use support::*;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// An upstream answering `{"n": N}`, N counting its requests.
async fn counting() -> Running {
    let n = Arc::new(AtomicU32::new(0));
    Upstream::http()
        .answer_with(move |_, _| (200, json!({ "n": n.fetch_add(1, SeqCst) + 1 })))
        .start()
        .await
}

fn config(redis: &Redis, store_timeout: &str, upstream: &Running, extra: &str) -> String {
    format!(
        "[server]\nstore = \"{}\"\nstore_timeout = \"{store_timeout}\"\n{}coalesce = false\ncache = {{ ttl = \"60s\" }}\n{}{}{extra}",
        redis.url(),
        http_source("profile", upstream, "/users/{user_id}"),
        aggregation("open", &["profile"], "timeout = \"30s\""),
        aggregation("strict", &["profile"], "timeout = \"30s\""),
    )
}

/// Generous limits that refuse nothing while Redis answers: one that lets
/// calls through when it cannot ask Redis, one that refuses them.
const LIMITS: &str = "
[rate_limits.lenient]
key = \"{@x-api-key}\"
rate = \"1000/s\"
burst = 1000
aggregations = [\"open\"]

[rate_limits.careful]
key = \"{@x-api-key}\"
rate = \"1000/s\"
burst = 1000
aggregations = [\"strict\"]
on_store_error = \"deny\"
";

async fn call(
    client: &mut aggregator::pb::aggregator::v1::aggregator_client::AggregatorClient<
        tonic::transport::Channel,
    >,
    aggregation: &str,
) -> Result<SourceResult, Status> {
    let mut request = tonic::Request::new(aggregate_request(aggregation, &[("user_id", "7")]));
    request
        .metadata_mut()
        .insert("x-api-key", "alice".parse().unwrap());
    let response = client.aggregate(request).await?.into_inner();
    Ok(response.sources[0].clone())
}

#[tokio::test]
async fn a_miss_on_one_replica_is_a_hit_on_the_other() {
    let redis = Redis::start().await;
    let upstream = counting().await;
    let toml = config(&redis, "2s", &upstream, "");
    let (a, b) = (
        Process::start(&toml, &[]).await,
        Process::start(&toml, &[]).await,
    );
    let filled = call(&mut a.client().await, "open").await.unwrap();
    assert!(!filled.cached);
    let served = call(&mut b.client().await, "open").await.unwrap();
    assert!(served.cached, "replica B found A's entry: {served:?}");
    assert_eq!(served.attempts, 0);
    assert_eq!(
        upstream.log.stats().started,
        1,
        "the upstream counted one request"
    );
}

#[tokio::test]
async fn a_limit_holds_across_two_replicas() {
    let redis = Redis::start().await;
    let upstream = Upstream::http().start().await;
    let (rate, burst) = (20.0, 30.0);
    let toml = format!(
        "[server]\nstore = \"{}\"\nstore_timeout = \"2s\"\n{}coalesce = false\n{}
[rate_limits.per_key]
key = \"{{@x-api-key}}\"
rate = \"20/s\"
burst = 30
",
        redis.url(),
        http_source("profile", &upstream, "/users/{user_id}"),
        aggregation("open", &["profile"], "timeout = \"30s\""),
    );
    let (a, b) = (
        Process::start(&toml, &[]).await,
        Process::start(&toml, &[]).await,
    );
    let clients = [a.client().await, b.client().await];
    let started = Instant::now();
    let calls = (0..100).map(|i| {
        let mut client = clients[i % 2].clone();
        async move { call(&mut client, "open").await }
    });
    let results = futures_util::future::join_all(calls).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut allowed = 0.0;
    for result in &results {
        match result {
            Ok(_) => allowed += 1.0,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.get_details_retry_info().is_some());
            }
        }
    }
    // The burst at once, then 20 a second for as long as the calls took,
    // give or take one: two buckets (one per replica) would let through
    // twice the burst.
    let most = burst + (rate * elapsed).ceil() + 1.0;
    assert!(
        (burst..=most).contains(&allowed),
        "{allowed} let through in {elapsed:.3}s; expected {burst} to {most}"
    );
    assert_eq!(f64::from(upstream.log.stats().started), allowed);
}

#[tokio::test]
async fn a_stopped_redis_costs_misses_not_failures_and_recovers_by_itself() {
    let mut redis = Redis::start().await;
    let upstream = counting().await;
    let (gateway, metrics) =
        Gateway::start_with_metrics(&config(&redis, "250ms", &upstream, LIMITS)).await;
    let mut client = gateway.client().await;
    call(&mut client, "open").await.unwrap();
    assert!(call(&mut client, "open").await.unwrap().cached);

    redis.stop().await;
    let before = upstream.log.stats().started;
    for _ in 0..3 {
        let result = call(&mut client, "open")
            .await
            .expect("calls keep succeeding");
        assert!(!result.cached, "a store error is a miss");
    }
    assert_eq!(upstream.log.stats().started, before + 3);
    let refused = call(&mut client, "strict").await.expect_err("deny");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("rate limit 'careful' cannot be checked")
    );
    assert_eq!(
        upstream.log.stats().started,
        before + 3,
        "no upstream was called"
    );
    let (_, text) = scrape(metrics, None).await;
    let errors = |op: &str| {
        sample(
            &text,
            &format!("aggregator_store_errors_total{{store=\"redis\",op=\"{op}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(
        errors("get") >= 3.0 && errors("rate_limit") >= 4.0,
        "{text}"
    );

    redis.restart().await;
    let mut recovered = false;
    for _ in 0..300 {
        let strict = call(&mut client, "strict").await;
        let open = call(&mut client, "open").await.unwrap();
        if strict.is_ok() && open.cached {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the gateway found Redis again by itself");
}

#[tokio::test]
async fn a_paused_redis_costs_no_more_than_the_store_budget() {
    let redis = Redis::start().await;
    let upstream = counting().await;
    let gateway = Gateway::start(&config(&redis, "100ms", &upstream, LIMITS)).await;
    let mut client = gateway.client().await;
    call(&mut client, "open").await.unwrap();
    assert!(call(&mut client, "open").await.unwrap().cached);

    redis.pause();
    // Three store operations (the limit, the lookup, the fill) at 100 ms
    // each, against a 30 s deadline: far below it, however slow the machine.
    let started = Instant::now();
    let result = call(&mut client, "open").await.expect("the call succeeds");
    let took = started.elapsed();
    assert!(!result.cached);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let started = Instant::now();
    let refused = call(&mut client, "strict").await.expect_err("deny");
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(5));
    redis.resume();
    let mut recovered = false;
    for _ in 0..100 {
        if call(&mut client, "strict").await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "answers again once Redis runs");
}
