//! `http2 = true` on an HTTP source: h2c with prior knowledge over plain
//! TCP, ALPN over TLS (h2 when the server offers it, else HTTP/1.1). Calls
//! in flight then share one connection instead of taking one each.
//! (Coalescing is off: the calls are identical, and must each be sent.)

mod support;

use std::time::Duration;

use http::Version;
use support::*;

const PATIENCE: Duration = Duration::from_secs(10);

fn call() -> aggregator::pb::aggregator::v1::AggregateRequest {
    aggregate_request("o", &[])
}

/// Every version the upstream saw requests come over.
fn versions(upstream: &Running) -> Vec<Version> {
    let mut seen: Vec<Version> = upstream.log.requests().iter().map(|r| r.version).collect();
    seen.dedup();
    seen
}

#[tokio::test]
async fn h2c_carries_every_call_in_flight_on_one_connection() {
    const CALLS: u32 = 20;
    let gate = Gate::new();
    let upstream = Upstream::http().gated(&gate).start().await;
    let gateway = Gateway::start(
        &[
            http_source("o", &upstream, "/o"),
            "http2 = true\ncoalesce = false\n".into(),
            aggregation("o", &["o"], ""),
        ]
        .concat(),
    )
    .await;
    let client = gateway.client().await;
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.aggregate(call()).await })
        })
        .collect();
    // All of them in flight at the upstream at once, then let them answer.
    assert!(
        upstream
            .log
            .wait_for(PATIENCE, |s| s.started == CALLS)
            .await
    );
    gate.open();
    for call in calls {
        call.await.unwrap().unwrap_or_else(|s| panic!("{s:?}"));
    }
    assert_eq!(versions(&upstream), [Version::HTTP_2]);
    assert_eq!(
        upstream.log.stats().peak_connections,
        1,
        "{:?}",
        upstream.log.stats()
    );
}

#[tokio::test]
async fn without_http2_each_call_in_flight_takes_a_connection() {
    let gate = Gate::new();
    let upstream = Upstream::http().gated(&gate).start().await;
    let gateway = Gateway::start(
        &[
            http_source("o", &upstream, "/o"),
            "coalesce = false\n".into(),
            aggregation("o", &["o"], ""),
        ]
        .concat(),
    )
    .await;
    let client = gateway.client().await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.aggregate(call()).await })
        })
        .collect();
    assert!(upstream.log.wait_for(PATIENCE, |s| s.started == 3).await);
    gate.open();
    for call in calls {
        call.await.unwrap().unwrap_or_else(|s| panic!("{s:?}"));
    }
    assert_eq!(versions(&upstream), [Version::HTTP_11]);
    assert_eq!(upstream.log.stats().peak_connections, 3);
}

/// A gateway with one `http2 = true` source over TLS to `upstream`.
async fn over_tls(pki: &Pki, upstream: &Running) -> Gateway {
    Gateway::start(&format!(
        "[sources.o]\nkind = \"http\"\nurl = \"https://localhost:{}/o\"\n\
         tls = {{ ca = \"{}\" }}\nhttp2 = true\n{}",
        upstream.addr.port(),
        pki.path("ca.crt"),
        aggregation("o", &["o"], "")
    ))
    .await
}

#[tokio::test]
async fn over_tls_alpn_picks_h2_when_offered_and_http1_otherwise() {
    let pki = Pki::new();
    let h2 = Upstream::http()
        .tls(pki.server_config(&["h2", "http/1.1"], false))
        .start()
        .await;
    let gateway = over_tls(&pki, &h2).await;
    let mut client = gateway.client().await;
    for _ in 0..3 {
        client
            .aggregate(call())
            .await
            .unwrap_or_else(|s| panic!("{s:?}"));
    }
    assert_eq!(versions(&h2), [Version::HTTP_2]);
    assert_eq!(h2.log.stats().connections_accepted, 1);

    let http1 = Upstream::http()
        .tls(pki.server_config(&["http/1.1"], false))
        .start()
        .await;
    let gateway = over_tls(&pki, &http1).await;
    gateway
        .client()
        .await
        .aggregate(call())
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(versions(&http1), [Version::HTTP_11]);
}

#[tokio::test]
async fn http2_is_a_key_of_http_sources_only() {
    let upstream = Upstream::grpc().start().await;
    let toml = [grpc_source("p", &upstream), "http2 = true\n".into()].concat();
    let error = aggregator::config::Config::parse(&toml, "test", std::path::Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`sources.p.http2`: not a key of grpc sources"),
        "{error}"
    );
}
