//! Protecting upstreams and callers: concurrency caps (per source and
//! gateway-wide) that shed a flood with RESOURCE_EXHAUSTED instead of queueing
//! it, and fallbacks that stand in for a failed optional source.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use aggregator::pb::aggregator::v1::{
    AggregateRequest, AggregateResponse, FetchAllRequest, Mode, aggregator_client::AggregatorClient,
};
use futures_util::{StreamExt, future::join_all, stream::FuturesUnordered};
use prost_types::value::Kind;
use support::*;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

/// Far longer than a refusal takes (the queue times below are 10-20 ms): a
/// call refused within it was shed, not made to wait.
const PROMPT: Duration = Duration::from_secs(2);

/// Far longer than any wait for an upstream to see a request.
const QUICK_WAIT: Duration = Duration::from_secs(5);

fn request(aggregation: &str, user_id: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", user_id)]),
    }
}

/// For an aggregation whose failing source's result a test reads: the call
/// answers with it instead of failing for want of a success.
const REPORT_ONLY: &str = "min_success = 0";

/// A gateway over one source (its TOML), in an aggregation of the same name.
async fn one_source(source: String, name: &str, aggregation_extra: &str) -> Gateway {
    Gateway::start(&format!(
        "{source}{}",
        aggregation(name, &[name], aggregation_extra)
    ))
    .await
}

/// Sends `n` Aggregate calls at once; each result with its latency.
async fn flood(
    client: &AggregatorClient<Channel>,
    aggregation: &str,
    n: usize,
) -> Vec<(Result<tonic::Response<AggregateResponse>, Status>, Duration)> {
    join_all((0..n).map(|i| {
        let mut client = client.clone();
        async move {
            let t0 = Instant::now();
            let result = client.aggregate(request(aggregation, &i.to_string())).await;
            (result, t0.elapsed())
        }
    }))
    .await
}

/// Like `flood`, to an upstream that `gate` holds: opens the gate once all
/// but `held` calls are answered, so those were answered while `held`
/// requests were still in flight. Panics if they are not answered in time.
async fn flood_held(
    client: &AggregatorClient<Channel>,
    aggregation: &str,
    n: usize,
    gate: &Gate,
    held: usize,
) -> Vec<(Result<tonic::Response<AggregateResponse>, Status>, Duration)> {
    let mut calls: FuturesUnordered<_> = (0..n)
        .map(|i| {
            let mut client = client.clone();
            async move {
                let t0 = Instant::now();
                let result = client.aggregate(request(aggregation, &i.to_string())).await;
                (i, result, t0.elapsed())
            }
        })
        .collect();
    let mut results: Vec<_> = (0..n).map(|_| None).collect();
    let mut answered = 0;
    while answered < n {
        let Ok(Some((i, result, elapsed))) = tokio::time::timeout(QUICK_WAIT, calls.next()).await
        else {
            panic!("{answered} of {n} calls answered while {held} were held");
        };
        results[i] = Some((result, elapsed));
        answered += 1;
        if answered == n - held {
            gate.open();
        }
    }
    results.into_iter().map(Option::unwrap).collect()
}

/// The refused calls of a flood: RESOURCE_EXHAUSTED, promptly.
fn refused(
    results: &[(Result<tonic::Response<AggregateResponse>, Status>, Duration)],
) -> Vec<&Status> {
    results
        .iter()
        .filter_map(|(result, elapsed)| {
            let status = result.as_ref().err()?;
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(
                *elapsed < PROMPT,
                "refused after {elapsed:?}, not shed at once: {status:?}"
            );
            Some(status)
        })
        .collect()
}

/// Polls the gateway's metrics until `line` is among them; whether it was,
/// within `QUICK_WAIT`. (The interval only paces the polls: every one
/// checks the condition.)
async fn wait_for_metric(metrics: SocketAddr, line: &str) -> bool {
    let give_up = Instant::now() + QUICK_WAIT;
    loop {
        let (_, text) = http_get(&format!("http://{metrics}/metrics")).await;
        if text.lines().any(|l| l == line) {
            return true;
        }
        if Instant::now() > give_up {
            eprintln!("no `{line}` in:\n{text}");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn source_cap_sheds_a_flood_and_the_upstream_never_sees_more() {
    // The calls that get a slot hold it until every other call is answered.
    let gate = Gate::new();
    let slow = Upstream::grpc().gated(&gate).start().await;
    let gateway = one_source(
        format!(
            "{}max_concurrent = 2\nqueue_timeout = \"20ms\"\n",
            grpc_source("slow", &slow)
        ),
        "slow",
        "",
    )
    .await;
    let client = gateway.client().await;

    let results = flood_held(&client, "slow", 20, &gate, 2).await;
    let ok = results.iter().filter(|(r, _)| r.is_ok()).count();
    assert_eq!(ok, 2, "exactly the cap got through");
    let shed = refused(&results);
    assert_eq!(shed.len(), 18);
    for status in shed {
        assert!(
            status
                .message()
                .starts_with("source 'slow': source at capacity: 2 already in flight"),
            "{status:?}"
        );
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.metadata["source"], "slow");
    }
    assert_eq!(slow.log.stats().started, 2, "refused calls sent nothing");
    assert_eq!(slow.log.stats().peak, 2);

    // The flood has passed: the source is served again.
    client
        .clone()
        .aggregate(request("slow", "1"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_queued_call_takes_a_slot_freed_within_its_queue_time() {
    let delay = Duration::from_millis(200);
    let upstream = Upstream::grpc().delay(delay).start().await;
    let gateway = one_source(
        format!(
            "{}max_concurrent = 1\nqueue_timeout = \"5s\"\n",
            grpc_source("one", &upstream)
        ),
        "one",
        "",
    )
    .await;
    let client = gateway.client().await;

    let results = flood(&client, "one", 2).await;
    let mut latencies: Vec<Duration> = results
        .into_iter()
        .map(|(r, elapsed)| {
            r.expect("both are served");
            elapsed
        })
        .collect();
    latencies.sort();
    // One after the other, never two at once at the upstream.
    assert!(latencies[1] >= delay * 2, "{latencies:?}");
    assert_eq!(upstream.log.stats().finished, 2);
    assert_eq!(upstream.log.stats().peak, 1);
}

#[tokio::test]
async fn gateway_cap_sheds_calls_with_gateway_overloaded() {
    // The calls that get a slot hold it until every other call is answered.
    let gate = Gate::new();
    let slow = Upstream::grpc().gated(&gate).start().await;
    let gateway = Gateway::start(&format!(
        "[server]\nmax_concurrent_calls = 3\nqueue_timeout = \"20ms\"\n{}{}",
        grpc_source("slow", &slow),
        aggregation("slow", &["slow"], "")
    ))
    .await;
    let client = gateway.client().await;

    let results = flood_held(&client, "slow", 12, &gate, 3).await;
    assert_eq!(results.iter().filter(|(r, _)| r.is_ok()).count(), 3);
    let shed = refused(&results);
    assert_eq!(shed.len(), 9);
    for status in shed {
        assert!(
            status
                .message()
                .starts_with("gateway at capacity: 3 already in flight"),
            "{status:?}"
        );
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "GATEWAY_OVERLOADED");
        assert_eq!(info.metadata["max_concurrent_calls"], "3");
    }
    assert_eq!(slow.log.stats().started, 3);
}

#[tokio::test]
async fn optional_source_at_capacity_degrades_the_answer_with_nothing_sent() {
    // The first call holds the slot until the gate opens.
    let gate = Gate::new();
    let slow = Upstream::grpc().gated(&gate).start().await;
    let fast = Upstream::grpc().start().await;
    let gateway = Gateway::start(&format!(
        "{}max_concurrent = 1\nqueue_timeout = \"10ms\"\n{}{}",
        grpc_source("slow", &slow),
        grpc_source("fast", &fast),
        aggregation("both", &["fast", "slow"], "optional = [\"slow\"]")
    ))
    .await;
    let mut client = gateway.client().await;

    // One call holds the slow source's only slot...
    let holder = tokio::spawn({
        let mut client = client.clone();
        async move { client.aggregate(request("both", "1")).await }
    });
    assert!(slow.log.wait_for(QUICK_WAIT, |s| s.started == 1).await);
    // ...so the next one gets the fast source and a refusal for the slow one.
    let answer = client
        .fetch_all(FetchAllRequest {
            payload: None,
            aggregation: "both".into(),
            params: params(&[("user_id", "2")]),
            sources: vec![],
            mode: Mode::Unspecified as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.complete);
    let [fast_result, slow_result] = &answer.results[..] else {
        panic!("two results: {answer:?}");
    };
    assert_eq!(fast_result.code, Code::Ok as i32);
    assert_eq!(slow_result.code, Code::ResourceExhausted as i32);
    assert_eq!(slow_result.attempts, 0, "nothing was sent: {slow_result:?}");
    assert!(slow_result.message.contains("source at capacity"));
    gate.open();
    holder.await.unwrap().unwrap();
    assert_eq!(slow.log.stats().started, 1);
}

#[tokio::test]
async fn fallback_stands_in_for_a_failed_optional_source_with_the_real_status() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().status(503).start().await;
    let gateway = Gateway::start(&format!(
        "{}{}fallback = {{ orders = [], count = 0 }}\n{}{}",
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation(
            "degraded",
            &["profile", "orders"],
            "optional = [\"orders\"]"
        ),
        aggregation("strict", &["profile", "orders"], ""),
    ))
    .await;
    let mut client = gateway.client().await;

    let answer = client
        .aggregate(request("degraded", "7"))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.complete, "a fallback is not a success");
    let data = answer.data.expect("data").fields;
    let Some(Kind::StructValue(fallback)) = &data["orders"].kind else {
        panic!("orders: {:?}", data["orders"]);
    };
    assert!(
        matches!(&fallback.fields["orders"].kind, Some(Kind::ListValue(l)) if l.values.is_empty())
    );
    assert!(matches!(fallback.fields["count"].kind, Some(Kind::NumberValue(n)) if n == 0.0));
    assert!(data.contains_key("profile"));
    let orders_result = answer
        .sources
        .iter()
        .find(|s| s.source == "orders")
        .unwrap();
    assert_eq!(orders_result.code, Code::Unavailable as i32);
    assert!(
        orders_result.message.contains("HTTP 503"),
        "{orders_result:?}"
    );

    // FetchAll carries it as the source's data, next to the real code.
    let all = client
        .fetch_all(FetchAllRequest {
            payload: None,
            aggregation: "degraded".into(),
            params: params(&[("user_id", "7")]),
            // With profile: a fallback is not a success, and min_success is 1.
            sources: vec!["profile".into(), "orders".into()],
            mode: Mode::Unspecified as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.results[1].code, Code::Unavailable as i32);
    assert!(matches!(
        all.results[1].data.as_ref().and_then(|v| v.kind.as_ref()),
        Some(Kind::StructValue(_))
    ));

    // Where the source is required, a fallback does not hide the failure.
    let status = client
        .aggregate(request("strict", "7"))
        .await
        .expect_err("a required source failed");
    assert_eq!(status.code(), Code::Unavailable);
}

// ---- retries ----

async fn fetch_one(
    client: &mut AggregatorClient<Channel>,
    aggregation: &str,
    user_id: &str,
) -> Result<aggregator::pb::aggregator::v1::SourceResult, Status> {
    let mut response = client
        .fetch_all(FetchAllRequest {
            payload: None,
            aggregation: aggregation.into(),
            params: params(&[("user_id", user_id)]),
            sources: vec![],
            mode: Mode::BestEffort as i32,
        })
        .await?
        .into_inner();
    Ok(response.results.remove(0))
}

#[tokio::test]
async fn transient_failures_are_retried_and_counted() {
    let grpc = Upstream::grpc()
        .fail_first(2, Code::Unavailable)
        .start()
        .await;
    let http = Upstream::http().fail_first(1, 503, None).start().await;
    let gateway = Gateway::start(&format!(
        "[defaults]\nretry = {{ attempts = 3, backoff = \"5ms\" }}\n{}{}{}{}",
        grpc_source("grpc", &grpc),
        http_source("http", &http, "/u/{user_id}"),
        aggregation("grpc", &["grpc"], ""),
        aggregation("http", &["http"], ""),
    ))
    .await;
    let mut client = gateway.client().await;

    let grpc_result = fetch_one(&mut client, "grpc", "1").await.unwrap();
    assert_eq!(grpc_result.code, Code::Ok as i32, "{grpc_result:?}");
    assert_eq!(grpc_result.attempts, 3);
    assert_eq!(grpc.log.stats().started, 3);

    let http_result = fetch_one(&mut client, "http", "1").await.unwrap();
    assert_eq!(http_result.code, Code::Ok as i32, "{http_result:?}");
    assert_eq!(http_result.attempts, 2);
    assert_eq!(http.log.stats().started, 2);
}

#[tokio::test]
async fn failures_unsafe_to_repeat_are_not_retried() {
    let internal = Upstream::grpc()
        .fail_with(Code::Internal, "boom")
        .start()
        .await;
    let post = Upstream::http().fail_first(5, 503, None).start().await;
    let gateway = Gateway::start(&format!(
        "[defaults]\nretry = {{ attempts = 5, backoff = \"1ms\" }}\n{}{}method = \"POST\"\nbody = {{ id = \"{{user_id}}\" }}\n{}{}",
        grpc_source("internal", &internal),
        http_source("post", &post, "/u"),
        aggregation("internal", &["internal"], REPORT_ONLY),
        aggregation("post", &["post"], REPORT_ONLY),
    ))
    .await;
    let mut client = gateway.client().await;

    let result = fetch_one(&mut client, "internal", "1").await.unwrap();
    assert_eq!((result.code, result.attempts), (Code::Internal as i32, 1));
    // A POST inherits no retries: it may not be safe to send twice.
    let result = fetch_one(&mut client, "post", "1").await.unwrap();
    assert_eq!(
        (result.code, result.attempts),
        (Code::Unavailable as i32, 1)
    );
    assert_eq!(post.log.stats().started, 1);
}

#[tokio::test]
async fn retries_stop_before_the_deadline() {
    // Attempts long against a scheduling hiccup, so that the gateway's guess
    // of the next one's duration (twice the last) holds on a loaded machine.
    let down = Upstream::grpc()
        .delay(Duration::from_millis(200))
        .fail_with(Code::Unavailable, "down")
        .start()
        .await;
    let retry =
        "retry = { attempts = 1000, backoff = \"10ms\", max_backoff = \"10ms\", budget = 10.0 }";
    let timeout = Duration::from_secs(2);
    let gateway = one_source(
        format!("{}{retry}\n", grpc_source("down", &down)),
        "down",
        &format!("timeout = \"2s\"\n{REPORT_ONLY}"),
    )
    .await;
    let mut client = gateway.client().await;

    let result = fetch_one(&mut client, "down", "1").await.unwrap();
    // The last failure is reported, not the deadline: no attempt was started
    // that could not end in time.
    assert_eq!(result.code, Code::Unavailable as i32, "{result:?}");
    // As the gateway measured it against its own deadline.
    let elapsed = Duration::try_from(result.elapsed.unwrap()).unwrap();
    assert!(elapsed < timeout, "{elapsed:?}");
    let stats = down.log.stats();
    assert_eq!(result.attempts, stats.started);
    assert_eq!(stats.cancelled, 0, "no attempt was cut off: {stats:?}");
    // One after the other, and on while there was time: about 8 fit, and
    // after two attempts 1.5 s are left for one of 200 ms.
    assert_eq!(stats.peak, 1, "{stats:?}");
    assert!(stats.started >= 3, "{stats:?}");
}

#[tokio::test]
async fn retry_after_is_waited_for() {
    let busy = Upstream::http().fail_first(1, 429, Some("1")).start().await;
    let gateway = one_source(
        format!(
            "{}retry = {{ attempts = 2, backoff = \"1ms\" }}\n",
            http_source("busy", &busy, "/u")
        ),
        "busy",
        "",
    )
    .await;
    let mut client = gateway.client().await;

    let t0 = Instant::now();
    let result = fetch_one(&mut client, "busy", "1").await.unwrap();
    assert_eq!((result.code, result.attempts), (Code::Ok as i32, 2));
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    let down = Upstream::grpc()
        .fail_with(Code::Unavailable, "down")
        .start()
        .await;
    let gateway = one_source(
        format!(
            "{}retry = {{ attempts = 3, backoff = \"1ms\", budget = 0.1, min_per_second = 0 }}\n",
            grpc_source("down", &down)
        ),
        "down",
        REPORT_ONLY,
    )
    .await;
    let mut client = gateway.client().await;

    let mut attempts = 0;
    for i in 0..50 {
        let result = fetch_one(&mut client, "down", &i.to_string())
            .await
            .unwrap();
        assert_eq!(result.code, Code::Unavailable as i32);
        attempts += result.attempts;
    }
    // Without a budget: 150 requests. With 10% of requests: about 55.
    let sent = down.log.stats().started;
    assert_eq!(attempts, sent);
    assert!((50..=56).contains(&sent), "{sent} requests for 50 calls");
}

// ---- request coalescing ----

fn coalesced_count(answer: &AggregateResponse, source: &str) -> usize {
    answer
        .sources
        .iter()
        .filter(|s| s.source == source && s.coalesced)
        .count()
}

#[tokio::test]
async fn a_thundering_herd_reaches_each_upstream_once() {
    // The upstreams answer only once the whole herd is waiting.
    let gate = Gate::new();
    let profile = Upstream::grpc().gated(&gate).start().await;
    let orders = Upstream::http().gated(&gate).start().await;
    let (gateway, metrics) = Gateway::start_with_metrics(&format!(
        "{}{}{}",
        grpc_source("profile", &profile),
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], ""),
    ))
    .await;
    let client = gateway.client().await;

    let (answers, ()) = tokio::join!(
        join_all((0..100).map(|_| {
            let mut client = client.clone();
            async move { client.aggregate(request("dash", "42")).await }
        })),
        async {
            for source in ["profile", "orders"] {
                let line =
                    format!("aggregator_coalesce_joined_calls_total{{source=\"{source}\"}} 99");
                assert!(
                    wait_for_metric(metrics, &line).await,
                    "{source}: the herd did not join"
                );
            }
            gate.open();
        }
    );
    let answers: Vec<AggregateResponse> = answers
        .into_iter()
        .map(|r| r.expect("every caller is answered").into_inner())
        .collect();
    assert_eq!(profile.log.stats().started, 1);
    assert_eq!(orders.log.stats().started, 1);
    let first = &answers[0].data;
    assert!(
        answers.iter().all(|a| &a.data == first),
        "one answer for all"
    );
    for source in ["profile", "orders"] {
        let joined: usize = answers.iter().map(|a| coalesced_count(a, source)).sum();
        assert_eq!(joined, 99, "{source}");
    }
}

#[tokio::test]
async fn the_caller_that_started_a_shared_call_can_leave_without_failing_the_others() {
    // The shared call is answered only once the starter has left.
    let gate = Gate::new();
    let upstream = Upstream::grpc().gated(&gate).start().await;
    // The starter's other source, its alone: its request is cancelled once
    // the gateway has let the starter go.
    let other = Upstream::http().hang().start().await;
    let (gateway, metrics) = Gateway::start_with_metrics(&format!(
        "{}{}{}{}",
        grpc_source("p", &upstream),
        http_source("q", &other, "/q/{user_id}"),
        aggregation("p", &["p"], ""),
        aggregation("pq", &["p", "q"], ""),
    ))
    .await;
    let client = gateway.client().await;

    let starter = tokio::spawn({
        let mut client = client.clone();
        async move { client.aggregate(request("pq", "1")).await }
    });
    assert!(upstream.log.wait_for(QUICK_WAIT, |s| s.started == 1).await);
    assert!(other.log.wait_for(QUICK_WAIT, |s| s.started == 1).await);
    let others = tokio::spawn({
        let client = client.clone();
        async move {
            join_all((0..2).map(|_| {
                let mut client = client.clone();
                async move { client.aggregate(request("p", "1")).await }
            }))
            .await
        }
    });
    // Once they have joined, cancel the starter (its RPC is reset).
    assert!(
        wait_for_metric(
            metrics,
            "aggregator_coalesce_joined_calls_total{source=\"p\"} 2"
        )
        .await,
        "the others did not join"
    );
    starter.abort();
    assert!(
        other.log.wait_for(QUICK_WAIT, |s| s.cancelled == 1).await,
        "the starter's call did not end: {:?}",
        other.log.stats()
    );
    gate.open();
    for answer in others.await.unwrap() {
        let answer = answer.expect("the others are still answered").into_inner();
        assert_eq!(coalesced_count(&answer, "p"), 1);
    }
    let stats = upstream.log.stats();
    assert_eq!((stats.started, stats.cancelled), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn a_shared_call_is_cancelled_upstream_when_its_last_caller_leaves() {
    let upstream = Upstream::http().hang().start().await;
    let (gateway, metrics) = Gateway::start_with_metrics(&format!(
        "{}{}",
        http_source("stuck", &upstream, "/u/{user_id}"),
        aggregation("stuck", &["stuck"], "")
    ))
    .await;
    let client = gateway.client().await;

    // The last caller to leave starts the shared call...
    let last = tokio::spawn({
        let mut client = client.clone();
        async move { client.aggregate(request("stuck", "1")).await }
    });
    assert!(upstream.log.wait_for(QUICK_WAIT, |s| s.started == 1).await);
    // ...two more join it and leave at their own deadlines: answered, they
    // have surely left.
    let leavers = join_all((0..2).map(|_| {
        let mut client = gateway.lenient_client();
        async move {
            let request = with_timeout(request("stuck", "1"), Duration::from_millis(200));
            client.aggregate(request).await
        }
    }))
    .await;
    for left in leavers {
        let status = left.expect_err("the deadline passed");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    // They had joined, and the shared call outlived them.
    let (_, text) = http_get(&format!("http://{metrics}/metrics")).await;
    for line in [
        "aggregator_coalesce_joined_calls_total{source=\"stuck\"} 2",
        "aggregator_coalesce_keys_in_flight{source=\"stuck\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    assert_eq!(upstream.log.stats().cancelled, 0, "one caller still waits");
    last.abort();
    // The upstream never answers: only a cancellation ends its request.
    assert!(
        upstream
            .log
            .wait_for(QUICK_WAIT, |s| s.cancelled == 1)
            .await,
        "the upstream request was not cancelled"
    );
    assert_eq!(upstream.log.stats().started, 1);
}

#[tokio::test]
async fn waiters_with_time_left_get_a_fresh_call_when_the_shared_one_expires() {
    // Nothing is answered until the short deadline has passed.
    let gate = Gate::new();
    let upstream = Upstream::grpc().gated(&gate).start().await;
    let (gateway, metrics) = Gateway::start_with_metrics(&format!(
        "{}{}",
        grpc_source("p", &upstream),
        aggregation("p", &["p"], "")
    ))
    .await;
    let client = gateway.client().await;

    // Seconds for the long call to join before the shared call expires.
    let short = tokio::spawn({
        let mut client = gateway.lenient_client();
        async move {
            let request = with_timeout(request("p", "1"), Duration::from_secs(1));
            client.aggregate(request).await
        }
    });
    assert!(upstream.log.wait_for(QUICK_WAIT, |s| s.started == 1).await);
    let long = tokio::spawn({
        let mut client = client.clone();
        async move { client.aggregate(request("p", "1")).await }
    });
    assert!(
        wait_for_metric(
            metrics,
            "aggregator_coalesce_joined_calls_total{source=\"p\"} 1"
        )
        .await,
        "the long call did not join the shared one"
    );
    let status = short.await.unwrap().expect_err("the short deadline passed");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    // The long call goes again, and is answered by that second request.
    assert!(
        upstream.log.wait_for(QUICK_WAIT, |s| s.started == 2).await,
        "no fresh call: {:?}",
        upstream.log.stats()
    );
    gate.open();
    let answer = long
        .await
        .unwrap()
        .expect("a fresh call under its own budget")
        .into_inner();
    assert!(answer.complete);
    assert_eq!(upstream.log.stats().started, 2);
    // The first request carried the short budget.
    let first = &upstream.log.requests()[0];
    let timeout = first.headers["grpc-timeout"].to_str().unwrap();
    assert!(
        timeout.ends_with('m') || timeout.ends_with('u'),
        "{timeout}"
    );
}

#[tokio::test]
async fn only_identical_reads_are_coalesced() {
    // Each upstream holds its requests until all of them are in flight at
    // once: coalesced calls would never get there.
    let gates = [Gate::new(), Gate::new(), Gate::new()];
    let post = Upstream::http().gated(&gates[0]).start().await;
    let off = Upstream::grpc().gated(&gates[1]).start().await;
    let auth = Upstream::http().gated(&gates[2]).start().await;
    let gateway = Gateway::start(&format!(
        "{}method = \"POST\"\nbody = {{ id = \"{{user_id}}\" }}\n{}coalesce = false\n{}headers = {{ authorization = \"Bearer {{token}}\" }}\n{}{}{}",
        http_source("post", &post, "/u"),
        grpc_source("off", &off),
        http_source("auth", &auth, "/u/{user_id}"),
        aggregation("post", &["post"], ""),
        aggregation("off", &["off"], ""),
        aggregation("auth", &["auth"], ""),
    ))
    .await;
    let client = gateway.client().await;

    // Five identical calls each.
    for (name, upstream, gate) in [("post", &post, &gates[0]), ("off", &off, &gates[1])] {
        let calls = join_all((0..5).map(|_| {
            let mut client = client.clone();
            async move { client.aggregate(request(name, "1")).await }
        }));
        let (results, ()) = tokio::join!(calls, async {
            let all = upstream.log.wait_for(QUICK_WAIT, |s| s.started == 5).await;
            assert!(all, "{name}: {:?}", upstream.log.stats());
            gate.open();
        });
        assert!(results.iter().all(Result::is_ok));
    }
    assert_eq!(
        post.log.stats().started,
        5,
        "POST is not coalesced by default"
    );
    assert_eq!(off.log.stats().started, 5, "coalesce = false");

    // Different credentials never share a request.
    tokio::join!(
        join_all(["a", "b"].map(|token| {
            let mut client = client.clone();
            async move {
                let request = AggregateRequest {
                    payload: None,
                    aggregation: "auth".into(),
                    params: params(&[("user_id", "1"), ("token", token)]),
                };
                client.aggregate(request).await.unwrap()
            }
        })),
        async {
            let both = auth.log.wait_for(QUICK_WAIT, |s| s.started == 2).await;
            assert!(both, "{:?}", auth.log.stats());
            gates[2].open();
        }
    );
    assert_eq!(auth.log.stats().started, 2);
}

// ---- circuit breakers and aggregation health ----

#[tokio::test]
async fn a_breaker_opens_fails_fast_half_opens_and_closes_when_the_upstream_recovers() {
    // The first 3 requests take 1 s and answer 503, then it has recovered.
    let slow = Duration::from_secs(1);
    let cool_down = Duration::from_secs(1);
    let flaky = Upstream::http()
        .slow_first(3, slow)
        .fail_first(3, 503, None)
        .start()
        .await;
    let profile = Upstream::grpc().start().await;
    let gateway = Gateway::start(&format!(
        "{}breaker = {{ failures = 3, cool_down = \"1s\" }}\n{}{}",
        http_source("flaky", &flaky, "/u/{user_id}"),
        grpc_source("profile", &profile),
        aggregation("dash", &["profile", "flaky"], "optional = [\"flaky\"]"),
    ))
    .await;
    let mut client = gateway.client().await;
    let flaky_result = |answer: &AggregateResponse| {
        answer
            .sources
            .iter()
            .find(|s| s.source == "flaky")
            .cloned()
            .unwrap()
    };

    // At once, so that the three slow failures take 1 s together.
    let answers = join_all((0..3).map(|i| {
        let mut client = client.clone();
        async move { client.aggregate(request("dash", &i.to_string())).await }
    }))
    .await;
    for answer in answers {
        let result = flaky_result(&answer.unwrap().into_inner());
        assert_eq!(
            (result.code, result.skipped),
            (Code::Unavailable as i32, false)
        );
    }
    // Open: the source is skipped without waiting on the upstream, which
    // took 1 s a request while failing.
    let t0 = Instant::now();
    let answer = client
        .aggregate(request("dash", "9"))
        .await
        .unwrap()
        .into_inner();
    let took = t0.elapsed();
    let result = flaky_result(&answer);
    assert!(!answer.complete);
    assert!(result.skipped, "{result:?}");
    assert_eq!(
        (result.code, result.attempts),
        (Code::Unavailable as i32, 0)
    );
    assert!(
        result.message.contains("circuit open for source 'flaky'"),
        "{result:?}"
    );
    let refused_in = Duration::try_from(result.elapsed.unwrap()).unwrap();
    // Microseconds when the machine is idle; far below the upstream's 1 s.
    assert!(refused_in < slow / 2, "refused in {refused_in:?}");
    assert!(took < slow / 2, "the call took {took:?}");
    assert_eq!(flaky.log.stats().started, 3, "nothing was sent while open");

    // After the cool-down one probe goes through; it succeeds and closes it.
    tokio::time::sleep(cool_down + Duration::from_millis(200)).await;
    for i in 0..2 {
        let answer = client
            .aggregate(request("dash", &i.to_string()))
            .await
            .unwrap();
        let answer = answer.into_inner();
        assert!(answer.complete, "{answer:?}");
    }
    assert_eq!(flaky.log.stats().started, 5);
}

#[tokio::test]
async fn a_required_source_with_an_open_circuit_fails_the_call_at_once() {
    let down = Upstream::grpc()
        .fail_with(Code::Unavailable, "down")
        .start()
        .await;
    let gateway = one_source(
        format!(
            "{}breaker = {{ failures = 2, cool_down = \"10s\" }}\n",
            grpc_source("down", &down)
        ),
        "down",
        "",
    )
    .await;
    let mut client = gateway.client().await;
    for i in 0..2 {
        client
            .aggregate(request("down", &i.to_string()))
            .await
            .unwrap_err();
    }
    let status = client.aggregate(request("down", "3")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .starts_with("source 'down': circuit open for source 'down'"),
        "{status:?}"
    );
    assert_eq!(down.log.stats().started, 2);
}

#[tokio::test]
async fn aggregation_health_follows_the_breakers_of_its_required_sources() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let flaky = Upstream::http().fail_first(2, 503, None).start().await;
    let gateway = Gateway::start(&format!(
        "{}breaker = {{ failures = 2, cool_down = \"300ms\" }}\n{}{}",
        http_source("flaky", &flaky, "/u/{user_id}"),
        aggregation("strict", &["flaky"], ""),
        aggregation("lenient", &["flaky"], "optional = [\"flaky\"]"),
    ))
    .await;
    let channel = gateway.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let request_for = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let mut watch = health
        .watch(request_for("aggregator.v1.Aggregator/strict"))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        let message = tokio::time::timeout(QUICK_WAIT, watch.message()).await;
        ServingStatus::try_from(message.unwrap().unwrap().unwrap().status).unwrap()
    };
    assert_eq!(next().await, ServingStatus::Serving);

    let mut client = AggregatorClient::new(channel);
    for i in 0..2 {
        client
            .aggregate(request("strict", &i.to_string()))
            .await
            .unwrap_err();
    }
    assert_eq!(next().await, ServingStatus::NotServing);
    // An optional source's circuit does not make its aggregation unhealthy.
    let lenient = health
        .check(request_for("aggregator.v1.Aggregator/lenient"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lenient.status, ServingStatus::Serving as i32);

    // The upstream has recovered; the probe after the cool-down closes it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.aggregate(request("strict", "3")).await.unwrap();
    assert_eq!(next().await, ServingStatus::Serving);
}

#[tokio::test]
async fn a_failing_health_check_skips_the_source_before_any_caller_waits_on_it() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    // The first two requests (health checks) fail, then it is healthy: the
    // circuit is open for two intervals (1 s), far longer than the call
    // below takes.
    let orders = Upstream::http().fail_first(2, 503, None).start().await;
    let profile = Upstream::grpc().start().await;
    let gateway = Gateway::start(&format!(
        "{}health_check = {{ path = \"/healthz\", interval = \"500ms\" }}\n{}{}",
        http_source("orders", &orders, "/u/{user_id}"),
        grpc_source("profile", &profile),
        aggregation("dash", &["profile", "orders"], "optional = [\"orders\"]")
            + &aggregation("orders", &["orders"], ""),
    ))
    .await;
    let channel = gateway.channel().await;
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: "aggregator.v1.Aggregator/orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut until = async |wanted: ServingStatus| loop {
        let message = tokio::time::timeout(QUICK_WAIT, watch.message()).await;
        let status = message.expect("a status change in time").unwrap().unwrap();
        if status.status == wanted as i32 {
            return;
        }
    };
    let calls_seen = || {
        orders
            .log
            .requests()
            .iter()
            .filter(|r| r.target != "/healthz")
            .count()
    };

    until(ServingStatus::NotServing).await;
    let mut client = AggregatorClient::new(channel);
    let answer = client
        .aggregate(request("dash", "1"))
        .await
        .unwrap()
        .into_inner();
    let result = answer
        .sources
        .iter()
        .find(|s| s.source == "orders")
        .unwrap();
    assert!(result.skipped && !answer.complete, "{answer:?}");
    assert_eq!(calls_seen(), 0, "no caller waited on the failing upstream");

    // The checks pass again: the circuit closes and calls go through.
    until(ServingStatus::Serving).await;
    let answer = client
        .aggregate(request("dash", "1"))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.complete, "{answer:?}");
    assert_eq!(calls_seen(), 1);
}

// ---- hedging ----

#[tokio::test]
async fn a_hedge_wins_against_a_slow_first_attempt_and_cancels_it() {
    // A delay far longer than a normal request takes, far shorter than
    // the slow one.
    let upstream = Upstream::http()
        .slow_first(1, Duration::from_secs(10))
        .start()
        .await;
    let gateway = one_source(
        format!(
            "{}hedge = {{ delay = \"1s\" }}\n",
            http_source("hedged", &upstream, "/u/{user_id}")
        ),
        "hedged",
        "",
    )
    .await;
    let mut client = gateway.client().await;

    let t0 = Instant::now();
    let result = fetch_one(&mut client, "hedged", "1").await.unwrap();
    let took = t0.elapsed();
    assert_eq!(
        (result.code, result.attempts),
        (Code::Ok as i32, 2),
        "{result:?}"
    );
    assert!(
        took >= Duration::from_secs(1),
        "hedged before the delay: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "waited for the slow attempt: {took:?}"
    );
    assert!(
        upstream
            .log
            .wait_for(QUICK_WAIT, |s| s.cancelled == 1)
            .await,
        "the slow attempt was not cancelled: {:?}",
        upstream.log.stats()
    );
    assert_eq!(upstream.log.stats().started, 2);

    // A source that answers within the delay is never hedged.
    let result = fetch_one(&mut client, "hedged", "2").await.unwrap();
    assert_eq!((result.code, result.attempts), (Code::Ok as i32, 1));
    assert_eq!(upstream.log.stats().started, 3);
}

#[tokio::test]
async fn hedges_never_outlive_the_deadline() {
    // The deadline leaves the request time to reach the upstream, so that
    // its cancellation can be seen.
    let upstream = Upstream::http()
        .delay(Duration::from_secs(10))
        .start()
        .await;
    let gateway = one_source(
        format!(
            "{}hedge = {{ delay = \"2s\" }}\n",
            http_source("slow", &upstream, "/u/{user_id}")
        ),
        "slow",
        "timeout = \"1s\"",
    )
    .await;
    let mut client = gateway.client().await;
    let status = client.aggregate(request("slow", "1")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    // The deadline came before the hedge delay: one request, cancelled.
    assert!(
        upstream
            .log
            .wait_for(QUICK_WAIT, |s| s.cancelled == 1)
            .await
    );
    assert_eq!(upstream.log.stats().started, 1);
}

// ---- metrics ----

async fn http_get(url: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let response = client.get(url.parse().unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn coalescing_breaker_and_bulkhead_state_are_exported_as_metrics() {
    // The upstream answers only once every caller is waiting.
    let gate = Gate::new();
    let upstream = Upstream::grpc().gated(&gate).start().await;
    let (gateway, metrics) = Gateway::start_with_metrics(&format!(
        "{}max_concurrent = 10\nbreaker = {{ failures = 3 }}\n{}",
        grpc_source("p", &upstream),
        aggregation("p", &["p"], ""),
    ))
    .await;
    let client = gateway.client().await;
    let (results, ()) = tokio::join!(
        join_all((0..50).map(|_| {
            let mut client = client.clone();
            async move { client.aggregate(request("p", "7")).await }
        })),
        async {
            let joined = "aggregator_coalesce_joined_calls_total{source=\"p\"} 49";
            assert!(
                wait_for_metric(metrics, joined).await,
                "the callers did not join"
            );
            gate.open();
        }
    );
    assert!(results.iter().all(Result::is_ok));

    let (status, text) = http_get(&format!("http://{metrics}/metrics")).await;
    assert_eq!(status, 200);
    for line in [
        "aggregator_coalesce_upstream_calls_total{source=\"p\"} 1",
        "aggregator_coalesce_joined_calls_total{source=\"p\"} 49",
        "aggregator_coalesce_keys_in_flight{source=\"p\"} 0",
        "aggregator_coalesce_peak_waiters{source=\"p\"} 50",
        "aggregator_circuit_open{source=\"p\"} 0",
        "aggregator_source_requests_in_flight{source=\"p\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    assert_eq!(http_get(&format!("http://{metrics}/")).await.0, 404);
}
