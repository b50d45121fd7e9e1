//! Overload must cost refused calls, not memory: a sustained flood against a
//! source capped at a few requests in flight leaves the gateway's memory
//! flat. Its own test binary, so no other test's allocations blur the
//! process's resident size.

mod support;

use aggregator::pb::aggregator::v1::AggregateRequest;
use futures_util::future::join_all;
use support::*;
use tonic::Code;

/// Resident memory of this process (gateway, upstream and client), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sustained_flood_is_shed_with_flat_memory() {
    let stuck = Upstream::http().hang().on_its_own_thread().start().await;
    let gateway = Gateway::start(&format!(
        "{}max_concurrent = 4\nmax_connections = 4\nqueue_timeout = \"5ms\"\n{}",
        http_source("stuck", &stuck, "/u/{user_id}"),
        aggregation("stuck", &["stuck"], "timeout = \"100ms\""),
    ))
    .await;
    let client = gateway.client().await;
    let wave = || {
        join_all((0..500).map(|i| {
            let mut client = client.clone();
            async move {
                let request = AggregateRequest {
                    payload: None,
                    aggregation: "stuck".into(),
                    params: params(&[("user_id", &i.to_string())]),
                };
                client.aggregate(request).await.unwrap_err().code()
            }
        }))
    };

    // Warm up pools, buffers and the allocator.
    for _ in 0..4 {
        wave().await;
    }
    let before = rss_kib();
    let mut shed = 0;
    for _ in 0..20 {
        let codes = wave().await;
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, Code::ResourceExhausted | Code::DeadlineExceeded))
        );
        shed += codes
            .iter()
            .filter(|c| **c == Code::ResourceExhausted)
            .count();
    }
    let after = rss_kib();
    // 10,000 calls, nearly all refused: the cap holds whatever the machine's
    // speed (how many deadline windows fit in a wave is not asserted).
    assert!(shed >= 9_000, "{shed} of 10000 shed");
    let seen = stuck.log.stats();
    assert!(
        seen.peak <= 4,
        "the upstream saw {} at once: {seen:?}",
        seen.peak
    );
    assert!(seen.started >= 4, "the cap was never filled: {seen:?}");
    let grown = after.saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "RSS grew {grown} KiB over 10,000 calls ({before} -> {after})"
    );
}
