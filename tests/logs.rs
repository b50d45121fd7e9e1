//! What the binary says: one line per call that blames the right source,
//! nothing a caller or an upstream sends can forge a line, startup names the
//! config, fatal errors are said once, failed health checks say why, and the
//! command line does what it claims.

mod support;

use std::time::Duration;

use aggregator::pb::aggregator::v1::AggregateRequest;
use support::*;
use tonic::Code;

const GENEROUS: Duration = Duration::from_secs(30);

fn request(aggregation: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", "7")]),
    }
}

#[tokio::test]
async fn a_call_that_fails_fast_logs_the_source_that_failed() {
    let gate = Gate::new();
    let profile = Upstream::grpc().gated(&gate).start().await;
    let orders = Upstream::http().status(503).start().await;
    let gw = Process::start(
        &format!(
            "{}{}{}",
            grpc_source("profile", &profile),
            http_source("orders", &orders, "/users/{user_id}/orders"),
            aggregation("dash", &["profile", "orders"], "")
        ),
        &[],
    )
    .await;
    let mut client = gw.client().await;
    let status = client.aggregate(request("dash")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let line = gw
        .wait_for_line(GENEROUS, |l| l.contains("aggregation failed"))
        .await
        .unwrap_or_else(|| panic!("no failure logged:\n{}", gw.stderr()));
    assert!(line.contains("orders=UNAVAILABLE/"), "{line}");
    assert!(line.contains("profile=cancelled"), "{line}");
    assert!(line.contains("code=UNAVAILABLE"), "{line}");
    gate.open();
}

#[tokio::test]
async fn what_an_upstream_says_cannot_forge_a_log_line() {
    let upstream = Upstream::grpc()
        .fail_with(
            Code::Internal,
            "boom\nFORGED aggregation completed\r\n\u{1b}[31mred",
        )
        .start()
        .await;
    let config = format!(
        "{}{}",
        grpc_source("p", &upstream),
        aggregation("p", &["p"], "")
    );
    for format in ["text", "json"] {
        let gw = Process::start(&config, &["--log-format", format]).await;
        let mut client = gw.client().await;
        client.aggregate(request("p")).await.unwrap_err();
        let line = gw
            .wait_for_line(GENEROUS, |l| l.contains("aggregation failed"))
            .await
            .unwrap_or_else(|| panic!("{format}: no failure logged:\n{}", gw.stderr()));
        let stderr = gw.stderr();
        assert!(
            !stderr.lines().any(|l| l.starts_with("FORGED")),
            "{format}: a line was forged:\n{stderr}"
        );
        assert!(
            !stderr.contains('\u{1b}'),
            "{format}: an escape sequence got through"
        );
        assert!(line.contains(r"boom\nFORGED"), "{format}: {line}");
    }
}

#[tokio::test]
async fn startup_names_the_config_and_what_it_holds() {
    let upstream = Upstream::http().start().await;
    let gw = Process::start(
        &format!(
            "{}{}{}",
            http_source("a", &upstream, "/a"),
            http_source("b", &upstream, "/b"),
            aggregation("ab", &["a", "b"], "")
        ),
        &[],
    )
    .await;
    let line = gw
        .wait_for_line(GENEROUS, |l| l.contains("config loaded"))
        .await
        .unwrap();
    assert!(line.contains("gateway.toml"), "{line}");
    assert!(
        line.contains("sources=2") && line.contains("aggregations=1"),
        "{line}"
    );
    // Every call's elapsed time to the microsecond.
    gw.client().await.aggregate(request("ab")).await.unwrap();
    let line = gw
        .wait_for_line(GENEROUS, |l| l.contains("aggregation completed"))
        .await
        .unwrap();
    let elapsed = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("elapsed_ms="))
        .unwrap_or_else(|| panic!("{line}"));
    let decimals = elapsed.split('.').nth(1).map_or(0, str::len);
    assert!(decimals <= 3, "elapsed_ms={elapsed}");

    let empty = Process::start("", &[]).await;
    let warning = empty
        .wait_for_line(GENEROUS, |l| l.contains("no aggregations"))
        .await
        .unwrap_or_else(|| panic!("no warning:\n{}", empty.stderr()));
    assert!(warning.contains("WARN"), "{warning}");
}

#[tokio::test]
async fn a_fatal_error_is_said_once() {
    for format in ["text", "json"] {
        let output = Process::run(&[
            "--config",
            "/nonexistent/gateway.toml",
            "--log-format",
            format,
        ])
        .await;
        assert_eq!(output.status.code(), Some(1), "{format}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            stderr.matches("cannot read").count(),
            1,
            "{format}:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn a_failed_health_check_says_why() {
    let upstream = Upstream::http().status(503).start().await;
    let gw = Process::start(
        &format!(
            "{}health_check = {{ path = \"/healthz\", interval = \"100ms\" }}\n{}",
            http_source("p", &upstream, "/p"),
            aggregation("p", &["p"], "")
        ),
        &[],
    )
    .await;
    let line = gw
        .wait_for_line(GENEROUS, |l| l.contains("health check failed"))
        .await
        .unwrap_or_else(|| panic!("{}", gw.stderr()));
    assert!(line.contains("503"), "{line}");
    assert!(line.contains("/healthz"), "{line}");
}

#[tokio::test]
async fn listen_moves_the_demo_and_demo_upstreams_refuses_a_config() {
    let demo = Process::start_with_args(&["--listen", "127.0.0.1:0"]).await;
    assert_ne!(demo.addr.port(), 50051);
    let response = demo
        .client()
        .await
        .aggregate(AggregateRequest {
            payload: None,
            aggregation: "user_dashboard".into(),
            params: params(&[("user_id", "42")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.complete);

    let (path, _dir) = Process::config_file("");
    let path = path.to_str().unwrap();
    for args in [
        vec!["--config", path, "demo-upstreams"],
        vec!["--listen", "127.0.0.1:0", "demo-upstreams"],
    ] {
        let mut args = args;
        args.extend(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
        let output = Process::run(&args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("demo-upstreams"), "{stderr}");
    }
}
