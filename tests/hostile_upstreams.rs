//! Hostile upstreams get deliberate answers: answers that blow up when
//! converted, bursts that would open a socket per call, URLs no upstream
//! could take, upstreams without reflection, and connection failures named
//! once and clearly.

mod support;

use std::time::{Duration, Instant};

use aggregator::pb::aggregator::v1::{AggregateRequest, FetchAllRequest, Mode};
use bytes::Bytes;
use futures_util::future::join_all;
use support::*;
use tonic::Code;
use tonic_types::StatusExt;

const GENEROUS: Duration = Duration::from_secs(20);

fn request(aggregation: &str, pairs: &[(&str, &str)]) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(pairs),
    }
}

/// `[sources.NAME]` for `evil.v1.Evil/Find` at `upstream`, schema from
/// tests/protos/evil.proto, with `request` as its template.
fn evil_source(name: &str, upstream: &Running, request: &str) -> String {
    format!(
        "[sources.{name}]\nkind = \"grpc\"\nendpoint = \"{}\"\nmethod = \"evil.v1.Evil/Find\"\n\
         protos = [\"tests/protos/evil.proto\"]\nimport_paths = [\"tests/protos\"]\nrequest = {request}\n",
        upstream.grpc_endpoint()
    )
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_small_answer_that_explodes_into_json_is_refused() {
    // 50,000 empty `Wide` messages: 100 KB on the wire, every one of their
    // twenty fields written out in JSON.
    let answer: Vec<u8> = std::iter::repeat_n([0x0a, 0x00], 50_000)
        .flatten()
        .collect();
    assert_eq!(answer.len(), 100_000);
    let upstream = grpc_answering(Bytes::from(answer)).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        evil_source("evil", &upstream, "{ name = \"x\" }"),
        aggregation("evil", &["evil"], "")
    ))
    .await;
    let mut client = gw.client().await;
    let before = rss_kib();
    let status = client.aggregate(request("evil", &[])).await.unwrap_err();
    let grown = rss_kib().saturating_sub(before);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("source 'evil': ")
            && status.message().contains("bytes of JSON"),
        "{}",
        status.message()
    );
    assert!(grown < 64 * 1024, "converting it cost {grown} KiB");
    // A source with room for it gets it whole (tens of MB: a debug-build
    // client on a loaded machine may take longer than the default
    // send_timeout to read them).
    let roomy = Gateway::start(&format!(
        "[server]\nmax_answer_bytes = 67108864\nsend_timeout = \"10m\"\n{}max_response_bytes = 67108864\n{}",
        evil_source("evil", &upstream, "{ name = \"x\" }"),
        aggregation("evil", &["evil"], "")
    ))
    .await;
    let response = roomy
        .client()
        .await
        .max_decoding_message_size(64 << 20)
        .aggregate(request("evil", &[]))
        .await
        .unwrap();
    assert!(response.into_inner().complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_slow_calls_opens_at_most_max_connections() {
    let upstream = Upstream::http()
        .delay(Duration::from_millis(200))
        .on_its_own_thread()
        .start()
        .await;
    let gw = Gateway::start(&format!(
        "{}max_connections = 8\npool_max_idle = 2\npool_idle_timeout = \"500ms\"\ncoalesce = false\n{}",
        http_source("slow", &upstream, "/u/{user_id}"),
        aggregation("slow", &["slow"], "timeout = \"60s\"")
    ))
    .await;
    let client = gw.client().await;
    let calls = (0..200).map(|i| {
        let mut client = client.clone();
        async move {
            let user = i.to_string();
            client
                .aggregate(request("slow", &[("user_id", &user)]))
                .await
        }
    });
    for result in join_all(calls).await {
        result.unwrap();
    }
    let seen = upstream.log.stats();
    assert_eq!(seen.started, 200);
    assert!(seen.peak_connections <= 8, "{seen:?}");
    assert!(seen.peak >= 2, "calls did not overlap at all: {seen:?}");
    // The idle pool keeps two, then none once they have idled out.
    assert!(
        upstream
            .log
            .wait_for(GENEROUS, |s| s.connections <= 2)
            .await,
        "{:?}",
        upstream.log.stats()
    );
    assert!(
        upstream
            .log
            .wait_for(GENEROUS, |s| s.connections == 0)
            .await,
        "{:?}",
        upstream.log.stats()
    );
}

#[tokio::test]
async fn a_call_that_waits_out_its_deadline_for_a_connection_is_resource_exhausted() {
    let upstream = Upstream::http().hang().start().await;
    let gw = Gateway::start(&format!(
        "{}max_connections = 2\ncoalesce = false\n{}",
        http_source("stuck", &upstream, "/u/{user_id}"),
        aggregation("stuck", &["stuck"], "timeout = \"60s\"")
    ))
    .await;
    let client = gw.lenient_client();
    let holders: Vec<_> = (0..2)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let r = with_timeout(request("stuck", &[("user_id", &i.to_string())]), GENEROUS);
                client.aggregate(r).await
            })
        })
        .collect();
    assert!(upstream.log.wait_for(GENEROUS, |s| s.started == 2).await);
    let mut client = client.clone();
    let third = with_timeout(
        request("stuck", &[("user_id", "third")]),
        Duration::from_millis(500),
    );
    let status = client.aggregate(third).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_connections = 2"),
        "{}",
        status.message()
    );
    assert_eq!(upstream.log.stats().started, 2, "the third was sent");
    for holder in holders {
        holder.abort();
    }
}

#[tokio::test]
async fn a_url_no_upstream_could_take_is_refused_before_anything_is_sent() {
    let upstream = Upstream::http().start().await;
    let gw = Gateway::start(&format!(
        "{}{}",
        http_source("p", &upstream, "/a/{x}/{y}/{z}"),
        aggregation("p", &["p"], "")
    ))
    .await;
    let mut client = gw.client().await;
    let slashes = "/".repeat(8 * 1024);
    let status = client
        .aggregate(request(
            "p",
            &[("x", &slashes), ("y", &slashes), ("z", &slashes)],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("rendered URL")
            && status.message().contains("x, y, z")
            && status.message().contains("16384-byte limit"),
        "{}",
        status.message()
    );
    assert_eq!(upstream.log.stats().started, 0);
    // And it keeps serving.
    client
        .aggregate(request("p", &[("x", "1"), ("y", "2"), ("z", "3")]))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_without_reflection_is_asked_once_and_the_error_says_what_to_do() {
    let upstream = Upstream::grpc().without_reflection().start().await;
    let gw = Gateway::start(&format!(
        "{}{}",
        grpc_source("p", &upstream),
        aggregation("p", &["p"], "")
    ))
    .await;
    let client = gw.client().await;
    let first = Instant::now();
    let calls = (0..20).map(|i| {
        let mut client = client.clone();
        async move {
            let user = i.to_string();
            client.aggregate(request("p", &[("user_id", &user)])).await
        }
    });
    for result in join_all(calls).await {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("`protos` or `descriptor_set`"),
            "{}",
            status.message()
        );
    }
    let reflection = "/grpc.reflection.";
    // One lookup for 20 concurrent calls: v1, then the v1alpha fallback.
    assert_eq!(upstream.log.paths_starting(reflection), 2);
    let mut client = client.clone();
    for i in 0..20 {
        let user = format!("again-{i}");
        client
            .aggregate(request("p", &[("user_id", &user)]))
            .await
            .unwrap_err();
    }
    // Backoffs of 1, 2, 4... s: at most one more lookup per backoff elapsed.
    let elapsed = first.elapsed().as_secs_f64();
    let lookups_allowed = 1 + (elapsed + 1.0).log2().ceil() as usize;
    let lookups = upstream.log.paths_starting(reflection) / 2;
    assert!(
        lookups <= lookups_allowed,
        "{lookups} lookups in {elapsed:.1} s for 40 calls"
    );
    assert_eq!(
        upstream.log.stats().started,
        0,
        "a call got through without a schema"
    );
}

#[tokio::test]
async fn a_refused_connection_is_named_once() {
    let (_held, addr) = refusing_addr();
    let gw = Gateway::start(&format!(
        "[sources.p]\nkind = \"grpc\"\nendpoint = \"http://{addr}\"\nmethod = \"demo.v1.Profiles/GetProfile\"\n\
         protos = [\"proto/demo/v1/demo.proto\"]\nimport_paths = [\"proto\"]\nrequest = {{ user_id = \"{{user_id}}\" }}\n{}",
        aggregation("p", &["p"], "")
    ))
    .await;
    let mut client = gw.client().await;
    let status = client
        .aggregate(request("p", &[("user_id", "1")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let message = status.message();
    assert!(message.contains("refused"), "{message}");
    for part in message.split(": ") {
        assert_eq!(
            message.matches(part).count(),
            1,
            "`{part}` is said twice in: {message}"
        );
    }
}

#[tokio::test]
async fn a_parameter_that_cannot_fill_its_field_is_the_callers_error() {
    let evil = grpc_answering(Bytes::new()).await;
    let other = Upstream::http().start().await;
    let gw = Gateway::start(&format!(
        "{}{}{}",
        evil_source(
            "evil",
            &evil,
            "{ count = \"{count}\", name = \"n-{count}\", inner = { level = \"{level}\" } }"
        ),
        http_source("other", &other, "/o"),
        aggregation("both", &["other", "evil"], "mode = \"best_effort\"")
    ))
    .await;
    let mut client = gw.client().await;
    let status = client
        .aggregate(request("both", &[("count", "abc"), ("level", "1")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("parameter 'count'")
            && status.message().contains("`evil.v1.Query.count` (int32)"),
        "{}",
        status.message()
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "INVALID_PARAMETER");
    assert_eq!(info.metadata["parameter"], "count");
    // In a nested message, and in FetchAll too.
    let fetch = FetchAllRequest {
        payload: None,
        aggregation: "both".into(),
        params: params(&[("count", "3"), ("level", "high")]),
        sources: vec![],
        mode: Mode::BestEffort as i32,
    };
    let status = client.fetch_all(fetch).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("parameter 'level'")
            && status.message().contains("`evil.v1.Inner.level` (int32)"),
        "{}",
        status.message()
    );
    // No upstream was called for either.
    assert_eq!(evil.log.stats().started, 0);
    assert_eq!(other.log.stats().started, 0);
    // Values that fit are sent.
    let response = client
        .aggregate(request("both", &[("count", "3"), ("level", "7")]))
        .await
        .unwrap()
        .into_inner();
    assert!(response.complete, "{response:?}");
    assert_eq!(evil.log.stats().started, 1);
}

#[tokio::test]
async fn a_reflection_service_that_never_answers_is_asked_once() {
    let upstream = grpc_hanging().await;
    let gw = Gateway::start(&format!(
        "{}{}",
        grpc_source("p", &upstream),
        aggregation("p", &["p"], "timeout = \"200ms\"")
    ))
    .await;
    let mut client = gw.client().await;
    for i in 0..10 {
        let user = i.to_string();
        let status = client
            .aggregate(request("p", &[("user_id", &user)]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    // The one lookup outlives the calls that gave up on it.
    assert_eq!(upstream.log.paths_starting("/grpc.reflection."), 1);
}
