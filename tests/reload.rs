//! Hot reload: a new config is put in force for new calls while calls in
//! flight finish under theirs; a bad one changes nothing; unchanged sources
//! keep their state; health follows the aggregations.

mod support;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use aggregator::pb::aggregator::v1::{AggregateRequest, aggregator_client::AggregatorClient};
use futures_util::StreamExt;
use support::*;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const PATIENCE: Duration = Duration::from_secs(30);

fn request(aggregation: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", "7")]),
    }
}

/// Which upstream answered, from the merged document: `"A"` or `"B"`.
async fn answered_by(client: &mut AggregatorClient<Channel>) -> Result<String, tonic::Status> {
    let response = client.aggregate(request("dash")).await?.into_inner();
    let data = format!("{:?}", response.data);
    Ok(["A", "B"]
        .into_iter()
        .find(|config| data.contains(&format!("\"{config}\"")))
        .unwrap_or("neither")
        .to_owned())
}

/// Source `s` of config A calls upstream `a`, of config B upstream `b`.
fn config_for(upstream: &Running) -> String {
    http_source("s", upstream, "/u/{user_id}") + &aggregation("dash", &["s"], "")
}

async fn upstreams() -> (Running, Running) {
    let a = Upstream::http()
        .json(serde_json::json!({ "config": "A" }))
        .start()
        .await;
    let b = Upstream::http()
        .json(serde_json::json!({ "config": "B" }))
        .start()
        .await;
    (a, b)
}

#[tokio::test]
async fn twenty_reloads_under_load_fail_no_call_and_each_call_gets_the_config_in_force() {
    let (a, b) = upstreams().await;
    let (config_a, config_b) = (config_for(&a), config_for(&b));
    let invalid = config_a.replace("sources = [\"s\"]", "sources = [\"nowhere\"]");
    let gateway = Gateway::start(&config_a).await;
    let channel = gateway.channel().await;

    // Generation g of the valid configs: A, B, A, B... Calls note the
    // generation applied before they are sent and the newest one requested
    // after they are answered; the answer must come from one in between.
    let generation_config = |g: usize| if g % 2 == 0 { "A" } else { "B" };
    let applied = Arc::new(AtomicUsize::new(0));
    let requested = Arc::new(AtomicUsize::new(0));
    // Calls answered entirely within one generation, by generation.
    let pinned = Arc::new(Mutex::new(vec![0usize; 32]));
    let answered = Arc::new(tokio::sync::Notify::new());
    let done = tokio_util::sync::CancellationToken::new();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut client = AggregatorClient::new(channel.clone());
        let (applied, requested) = (applied.clone(), requested.clone());
        let (pinned, answered, done) = (pinned.clone(), answered.clone(), done.clone());
        callers.spawn(async move {
            let mut calls = 0;
            while !done.is_cancelled() {
                let low = applied.load(SeqCst);
                let answer = answered_by(&mut client).await.unwrap_or_else(|status| {
                    panic!("call {calls} failed during reloads: {status:?}")
                });
                let high = requested.load(SeqCst);
                assert!(
                    (low..=high).any(|g| generation_config(g) == answer),
                    "answered by {answer}, but the config in force was generation {low}..={high}"
                );
                if low == high {
                    pinned.lock().unwrap()[low] += 1;
                    answered.notify_waiters();
                }
                calls += 1;
            }
            calls
        });
    }

    let wait_for_pinned = async |generation: usize| {
        let enough = async {
            loop {
                let notified = answered.notified();
                if pinned.lock().unwrap()[generation] >= 5 {
                    return;
                }
                notified.await;
            }
        };
        assert!(
            tokio::time::timeout(PATIENCE, enough).await.is_ok(),
            "no calls answered under generation {generation}"
        );
    };
    wait_for_pinned(0).await;
    let mut generation = 0;
    for reload in 0..20 {
        // B, A, invalid, B, A, invalid...
        if reload % 3 == 2 {
            let error = gateway.reload(&invalid).await.unwrap_err();
            assert!(
                error.contains("aggregations.dash.sources"),
                "the error names the key: {error}"
            );
            continue;
        }
        generation += 1;
        let toml = if generation % 2 == 0 {
            &config_a
        } else {
            &config_b
        };
        requested.store(generation, SeqCst);
        gateway.reload(toml).await.unwrap();
        applied.store(generation, SeqCst);
        wait_for_pinned(generation).await;
    }
    done.cancel();
    let mut calls = 0;
    while let Some(caller) = callers.join_next().await {
        calls += caller.unwrap();
    }
    assert_eq!(generation, 14, "20 reloads, 6 of them invalid");
    // Both configs served calls.
    assert!(a.log.stats().started > 0 && b.log.stats().started > 0);
    assert!(calls >= 5 * 15, "{calls} calls");
}

#[tokio::test]
async fn a_call_in_flight_finishes_under_the_config_it_started_with() {
    let gate = Gate::new();
    let a = Upstream::http()
        .json(serde_json::json!({ "config": "A" }))
        .gated(&gate)
        .start()
        .await;
    let (_, b) = upstreams().await;
    let gateway = Gateway::start(&config_for(&a)).await;
    let channel = gateway.channel().await;
    let mut first = AggregatorClient::new(channel.clone());
    let in_flight = tokio::spawn(async move { answered_by(&mut first).await });
    assert!(a.log.wait_for(PATIENCE, |s| s.started == 1).await);

    // The old source is gone from the config in force, its request is not.
    gateway.reload(&config_for(&b)).await.unwrap();
    let mut client = AggregatorClient::new(channel);
    assert_eq!(answered_by(&mut client).await.unwrap(), "B");
    assert_eq!(a.log.stats().in_flight(), 1, "the old call was not cut");

    gate.open();
    assert_eq!(in_flight.await.unwrap().unwrap(), "A");
    assert_eq!(a.log.stats().cancelled, 0);
}

#[tokio::test]
async fn an_unchanged_source_keeps_its_breaker_and_connections_and_a_changed_one_starts_afresh() {
    let flaky = Upstream::http().status(503).start().await;
    let steady = Upstream::http().start().await;
    let flaky_source = |failures: u32| {
        http_source("flaky", &flaky, "/u/{user_id}")
            + &format!(
                "breaker = {{ failures = {failures}, cool_down = \"1h\", max_cool_down = \"1h\" }}\n"
            )
    };
    let base = |failures: u32| {
        flaky_source(failures)
            + &http_source("steady", &steady, "/u/{user_id}")
            + &aggregation("flaky", &["flaky"], "")
            + &aggregation("steady", &["steady"], "")
    };
    let gateway = Gateway::start(&base(2)).await;
    let mut client = gateway.client().await;
    for _ in 0..2 {
        let status = client.aggregate(request("flaky")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    client.aggregate(request("steady")).await.unwrap();
    assert_eq!(flaky.log.stats().started, 2);

    // Another aggregation, the same sources: the circuit stays open, the
    // pooled connection is reused.
    let more = base(2) + &aggregation("more", &["steady"], "");
    gateway.reload(&more).await.unwrap();
    let status = client.aggregate(request("flaky")).await.unwrap_err();
    assert!(status.message().contains("circuit open"), "{status:?}");
    assert_eq!(
        flaky.log.stats().started,
        2,
        "an open circuit sends nothing"
    );
    client.aggregate(request("steady")).await.unwrap();
    client.aggregate(request("more")).await.unwrap();
    assert_eq!(steady.log.stats().connections_accepted, 1);

    // A changed breaker is a new source: a closed circuit.
    gateway.reload(&base(3)).await.unwrap();
    let status = client.aggregate(request("flaky")).await.unwrap_err();
    assert!(!status.message().contains("circuit open"), "{status:?}");
    assert_eq!(flaky.log.stats().started, 3);
}

#[tokio::test]
async fn health_follows_added_and_removed_aggregations() {
    let upstream = Upstream::http().start().await;
    let source = http_source("s", &upstream, "/u/{user_id}");
    let gateway = Gateway::start(&(source.clone() + &aggregation("old", &["s"], ""))).await;
    let mut health = HealthClient::new(gateway.channel().await);
    let status = async |health: &mut HealthClient<Channel>, aggregation: &str| {
        let service = format!("aggregator.v1.Aggregator/{aggregation}");
        match health.check(HealthCheckRequest { service }).await {
            Ok(r) => Ok(ServingStatus::try_from(r.into_inner().status).unwrap()),
            Err(status) => Err(status.code()),
        }
    };
    assert_eq!(status(&mut health, "old").await, Ok(ServingStatus::Serving));
    assert_eq!(status(&mut health, "new").await, Err(Code::NotFound));

    gateway
        .reload(&(source + &aggregation("new", &["s"], "")))
        .await
        .unwrap();
    assert_eq!(status(&mut health, "new").await, Ok(ServingStatus::Serving));
    assert_eq!(status(&mut health, "old").await, Err(Code::NotFound));
    let mut client = gateway.client().await;
    client.aggregate(request("new")).await.unwrap();
    let gone = client.aggregate(request("old")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn once_shutdown_has_begun_a_reload_is_refused() {
    let upstream = Upstream::http().start().await;
    let source = http_source("s", &upstream, "/u/{user_id}");
    let server = "[server]\nshutdown_delay = \"1h\"\n";
    let gateway = Gateway::start(&format!(
        "{server}{source}{}",
        aggregation("old", &["s"], "")
    ))
    .await;
    let mut health = HealthClient::new(gateway.channel().await);
    let check = async |health: &mut HealthClient<Channel>, service: &str| {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        health
            .check(request)
            .await
            .map(|r| ServingStatus::try_from(r.into_inner().status).unwrap())
            .map_err(|status| status.code())
    };
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    gateway.signal_stop();
    // Still serving during the delay, with every status NOT_SERVING.
    let turned = async {
        while let Some(Ok(update)) = statuses.next().await {
            if update.status == ServingStatus::NotServing as i32 {
                return true;
            }
        }
        false
    };
    let turned = tokio::time::timeout(PATIENCE, turned).await;
    assert_eq!(turned, Ok(true), "health never turned NOT_SERVING");
    let refused = gateway
        .reload(&format!(
            "{server}{source}{}",
            aggregation("new", &["s"], "")
        ))
        .await;
    assert_eq!(refused, Err("shutting down".to_owned()));
    let service = "aggregator.v1.Aggregator/new";
    assert_eq!(check(&mut health, service).await, Err(Code::NotFound));
    let still = check(&mut health, "aggregator.v1.Aggregator/old").await;
    assert_eq!(still, Ok(ServingStatus::NotServing));
    let mut client = gateway.client().await;
    client.aggregate(request("old")).await.unwrap();
}
