//! Shutdown under load: every call in flight when the signal arrives gets
//! its answer, however the connection's last frames race with its close.

mod support;

use std::time::Duration;

use aggregator::pb::aggregator::v1::{AggregateRequest, aggregator_client::AggregatorClient};
use futures_util::future::join_all;
use support::*;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_in_flight_at_sigterm_is_answered_ok() {
    for round in 0..15 {
        let upstream = Upstream::grpc()
            .delay(Duration::from_millis(300))
            .start()
            .await;
        let gateway = Gateway::start(&format!(
            "{}{}",
            grpc_source("p", &upstream),
            aggregation("p", &["p"], "")
        ))
        .await;
        let client = gateway.client().await;
        let calls = join_all((0..200).map(|i| {
            let mut client = client.clone();
            async move {
                let request = AggregateRequest {
                    payload: None,
                    aggregation: "p".into(),
                    params: params(&[("user_id", &i.to_string())]),
                };
                client.aggregate(request).await.map(|_| ())
            }
        }));
        let stop = async {
            assert!(
                upstream
                    .log
                    .wait_for(Duration::from_secs(30), |s| s.started == 200)
                    .await,
                "round {round}: the calls never reached the upstream: {:?}",
                upstream.log.stats()
            );
            gateway.signal_stop();
        };
        let (results, ()) = tokio::join!(calls, stop);
        let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "round {round}: {} of 200 calls failed, e.g. {:?}",
            failed.len(),
            failed.first()
        );
        gateway.stop().await;
    }
}

/// The same through the binary and a real SIGTERM, with answers large
/// enough to still be in the socket's send queue when the connection ends
/// (a client with wide HTTP/2 windows, as grpc-go's dynamic ones grow):
/// the process exits once the last answer is out, and none may be lost to
/// the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_answers_every_call_in_flight_at_sigterm() {
    let body = serde_json::json!({ "blob": "x".repeat(8 * 1024) });
    for round in 0..10 {
        let upstream = Upstream::http()
            .delay(Duration::from_millis(300))
            .json(body.clone())
            .start()
            .await;
        let mut gateway = Process::start(
            &format!(
                "{}{}",
                http_source("p", &upstream, "/u/{user_id}"),
                aggregation("p", &["p"], "")
            ),
            &[],
        )
        .await;
        let proxy = slow_reader_proxy(gateway.addr).await;
        let channel = Channel::from_shared(format!("http://{}", proxy.addr))
            .unwrap()
            .initial_connection_window_size(64 << 20)
            .initial_stream_window_size(16 << 20)
            // The client keeps talking while the server closes.
            .http2_keep_alive_interval(Duration::from_millis(5))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .unwrap();
        let client = AggregatorClient::new(channel);
        let calls = join_all((0..200).map(|i| {
            let mut client = client.clone();
            async move {
                let request = AggregateRequest {
                    payload: None,
                    aggregation: "p".into(),
                    params: params(&[("user_id", &i.to_string())]),
                };
                client.aggregate(request).await.map(|_| ())
            }
        }));
        let stop = async {
            assert!(
                upstream
                    .log
                    .wait_for(Duration::from_secs(30), |s| s.started == 200)
                    .await,
                "round {round}: the calls never reached the upstream: {:?}",
                upstream.log.stats()
            );
            gateway.terminate();
        };
        let (results, ()) = tokio::join!(calls, stop);
        let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "round {round}: {} of 200 calls failed, e.g. {:?}",
            failed.len(),
            failed.first(),
        );
        assert_eq!(gateway.wait(Duration::from_secs(30)).await, Some(0));
    }
}

fn dash() -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: "dash".into(),
        params: params(&[("user_id", "7")]),
    }
}

async fn gateway_with_shutdown_delay(upstream: &Running, delay: &str) -> Gateway {
    Gateway::start(&format!(
        "[server]\nshutdown_delay = \"{delay}\"\n{}{}",
        http_source("s", upstream, "/u/{user_id}"),
        aggregation("dash", &["s"], "")
    ))
    .await
}

#[tokio::test]
async fn during_the_shutdown_delay_health_is_not_serving_and_new_connections_are_served() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let upstream = Upstream::http().start().await;
    // Far longer than the test: it ends while the gateway still waits.
    let gateway = gateway_with_shutdown_delay(&upstream, "1h").await;
    let mut health = HealthClient::new(gateway.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        let message = tokio::time::timeout(Duration::from_secs(30), watch.message()).await;
        ServingStatus::try_from(message.unwrap().unwrap().unwrap().status).unwrap()
    };
    assert_eq!(next().await, ServingStatus::Serving);

    gateway.signal_stop();
    assert_eq!(next().await, ServingStatus::NotServing);
    // A client that has not heard yet still connects and is served.
    let mut late = gateway.client().await;
    late.aggregate(dash()).await.unwrap();
    let dash_health = health
        .check(HealthCheckRequest {
            service: "aggregator.v1.Aggregator/dash".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dash_health.status, ServingStatus::NotServing as i32);
}

#[tokio::test]
async fn after_the_shutdown_delay_it_stops_accepting() {
    let upstream = Upstream::http().start().await;
    let gateway = gateway_with_shutdown_delay(&upstream, "300ms").await;
    let addr = gateway.addr;
    gateway.client().await.aggregate(dash()).await.unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), gateway.stop())
        .await
        .expect("run returns after the delay");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "stopped before the delay: {took:?}"
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
