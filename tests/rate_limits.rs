//! `[rate_limits.NAME]`, end to end, with each store: in this process and
//! in a real `redis-server`. A refused call reaches no upstream and says
//! when to come back.

mod support;

use std::time::Duration;

use support::*;
use tonic::{Code, Status};
use tonic_types::StatusExt;

with_each_store!(
    over_the_limit_a_call_is_refused_and_told_when_to_come_back,
    a_missing_key_is_invalid_argument_unless_shared,
    a_limit_applies_to_its_aggregations_only,
);

/// A gateway whose aggregations `limited` and `free` read one upstream,
/// with the `[rate_limits.per_key]` table `limit`.
async fn gateway(store: &Backing, upstream: &Running, limit: &str) -> Gateway {
    Gateway::start(&format!(
        "{}{}coalesce = false\n{}{}[rate_limits.per_key]\n{limit}\n",
        store.server(),
        http_source("profile", upstream, "/users/{user_id}"),
        aggregation("limited", &["profile"], ""),
        aggregation("free", &["profile"], ""),
    ))
    .await
}

async fn call(gateway: &Gateway, aggregation: &str, key: Option<&str>) -> Result<(), Status> {
    let mut request = tonic::Request::new(aggregate_request(aggregation, &[("user_id", "7")]));
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("x-api-key", key.parse().unwrap());
    }
    gateway.client().await.aggregate(request).await.map(drop)
}

async fn over_the_limit_a_call_is_refused_and_told_when_to_come_back(store: Backing) {
    let upstream = Upstream::http().start().await;
    // Two at once, then one a minute: the third call is over, whatever
    // the machine's speed.
    let gateway = gateway(
        &store,
        &upstream,
        "key = \"{@x-api-key}\"\nrate = \"1/m\"\nburst = 2",
    )
    .await;
    call(&gateway, "limited", Some("alice")).await.unwrap();
    call(&gateway, "limited", Some("alice")).await.unwrap();
    let refused = call(&gateway, "limited", Some("alice"))
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("rate limit 'per_key'"),
        "{refused:?}"
    );
    let retry = refused.get_details_retry_info().expect("RetryInfo");
    let delay = retry.retry_delay.expect("a delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(60),
        "{delay:?}"
    );
    let quota = refused.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "rate_limits.per_key");
    assert_eq!(quota.violations[0].description, "1/m, burst 2");
    assert_eq!(
        upstream.log.stats().started,
        2,
        "no upstream was called for it"
    );
    // Another caller has a bucket of its own.
    call(&gateway, "limited", Some("bob")).await.unwrap();
    assert_eq!(upstream.log.stats().started, 3);
}

async fn a_missing_key_is_invalid_argument_unless_shared(store: Backing) {
    let upstream = Upstream::http().start().await;
    let strict = gateway(&store, &upstream, "key = \"{@x-api-key}\"\nrate = \"1/m\"").await;
    let refused = call(&strict, "limited", None)
        .await
        .expect_err("no key to count against");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(
        refused.message(),
        "rate limit 'per_key': missing metadata 'x-api-key'"
    );
    assert_eq!(upstream.log.stats().started, 0);

    let shared = gateway(
        &store,
        &upstream,
        "key = \"{@x-api-key}\"\nrate = \"1/m\"\nburst = 1\nkey_missing = \"shared\"",
    )
    .await;
    // Every caller without a key shares one bucket; keyed callers do not
    // join it.
    call(&shared, "limited", None).await.unwrap();
    let second = call(&shared, "limited", None)
        .await
        .expect_err("the bucket is empty");
    assert_eq!(second.code(), Code::ResourceExhausted);
    call(&shared, "limited", Some("alice")).await.unwrap();
}

async fn a_limit_applies_to_its_aggregations_only(store: Backing) {
    let upstream = Upstream::http().start().await;
    let gateway = gateway(
        &store,
        &upstream,
        "key = \"{@x-api-key}\"\nrate = \"1/m\"\nburst = 1\naggregations = [\"limited\"]",
    )
    .await;
    call(&gateway, "limited", Some("alice")).await.unwrap();
    assert_eq!(
        call(&gateway, "limited", Some("alice"))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    for _ in 0..3 {
        call(&gateway, "free", Some("alice")).await.unwrap();
    }
}

#[tokio::test]
async fn limits_that_cannot_work_are_startup_errors() {
    let base = "[sources.s]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\n[aggregations.a]\nsources = [\"s\"]\n";
    let cases = [
        ("key = \"{@k}\"\nrate = \"fast\"", "rate_limits.l.rate"),
        ("key = \"{@k}\"\nrate = \"0/s\"", "rate_limits.l.rate"),
        (
            "key = \"{@k}\"\nrate = \"1/s\"\nburst = 0",
            "rate_limits.l.burst",
        ),
        ("key = \"{$s.id}\"\nrate = \"1/s\"", "rate_limits.l.key"),
        (
            "key = \"{@k}\"\nrate = \"1/s\"\naggregations = [\"b\"]",
            "rate_limits.l.aggregations",
        ),
        (
            "key = \"{@k}\"\nrate = \"1/s\"\non_store_error = \"maybe\"",
            "on_store_error",
        ),
    ];
    for (table, key) in cases {
        let text = format!("{base}[rate_limits.l]\n{table}\n");
        let error = startup_error(&text);
        assert!(error.contains(key), "{table}: {error}");
    }
}

#[tokio::test]
async fn a_reload_applies_the_new_settings_and_keeps_the_buckets() {
    let upstream = Upstream::http().start().await;
    let toml = |applies_to: &str| {
        format!(
            "{}coalesce = false\n{}{}[rate_limits.per_key]\nkey = \"{{@x-api-key}}\"\nrate = \"1/m\"\nburst = 1\naggregations = [\"{applies_to}\"]\n",
            http_source("profile", &upstream, "/users/{user_id}"),
            aggregation("limited", &["profile"], ""),
            aggregation("free", &["profile"], ""),
        )
    };
    let gateway = Gateway::start(&toml("limited")).await;
    call(&gateway, "limited", Some("alice")).await.unwrap();
    let refused = call(&gateway, "limited", Some("alice")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    gateway.reload(&toml("free")).await.unwrap();
    // The limit now applies to `free` only...
    call(&gateway, "limited", Some("alice")).await.unwrap();
    // ...and alice's bucket, spent before the reload, is still spent.
    let refused = call(&gateway, "free", Some("alice")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
}
