//! The binary's signals and `--watch`: SIGHUP and file changes reload the
//! config (or log why not and keep serving), a second SIGTERM exits at once.

mod support;

use std::time::Duration;

use aggregator::pb::aggregator::v1::AggregateRequest;
use support::*;
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(60);

fn request(aggregation: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", "7")]),
    }
}

/// Replaces the file's contents in one step, as editors and ConfigMaps do.
fn rewrite(path: &std::path::Path, toml: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, toml).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_config_and_a_bad_one_is_logged_and_changes_nothing() {
    let upstream = Upstream::http().start().await;
    let source = http_source("s", &upstream, "/u/{user_id}");
    // The listen address comes from the file (no --listen), so that a
    // change to it can be seen.
    let (path, _dir) = Process::config_file(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{source}{}",
        aggregation("old", &["s"], "")
    ));
    let gateway = Process::start_with_args(&["--config", path.to_str().unwrap()]).await;
    let mut client = gateway.client().await;
    client.aggregate(request("old")).await.unwrap();

    // A new aggregation, and a listen address that cannot change live.
    let new = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n{source}{}",
        aggregation("new", &["s"], "")
    );
    rewrite(&path, &new);
    gateway.signal("HUP");
    let warning = gateway
        .wait_for_line(PATIENCE, |l| l.contains("need a restart"))
        .await
        .unwrap_or_else(|| panic!("no warning:\n{}", gateway.stderr()));
    assert!(warning.contains("server.listen"), "{warning}");
    assert!(
        gateway
            .wait_for_lines(PATIENCE, 1, |l| l.contains("config reloaded"))
            .await
    );
    client.aggregate(request("new")).await.unwrap();
    let gone = client.aggregate(request("old")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    rewrite(
        &path,
        &format!("{source}[aggregations.new]\nsources = [\"nowhere\"]\n"),
    );
    gateway.signal("HUP");
    let failed = gateway
        .wait_for_line(PATIENCE, |l| l.contains("config reload failed"))
        .await
        .unwrap_or_else(|| panic!("no error:\n{}", gateway.stderr()));
    let file = path.display().to_string();
    assert!(
        failed.contains(&file) && failed.contains("aggregations.new.sources"),
        "{failed}"
    );
    client.aggregate(request("new")).await.unwrap();
}

#[tokio::test]
async fn with_watch_a_change_to_the_file_is_put_in_force() {
    let upstream = Upstream::http().start().await;
    let source = http_source("s", &upstream, "/u/{user_id}");
    let gateway = Process::start(
        &(source.clone() + &aggregation("old", &["s"], "")),
        &["--watch"],
    )
    .await;
    let mut client = gateway.client().await;

    rewrite(
        &gateway.config_path(),
        &(source.clone() + &aggregation("new", &["s"], "")),
    );
    assert!(
        gateway
            .wait_for_lines(PATIENCE, 1, |l| l.contains("config reloaded"))
            .await,
        "{}",
        gateway.stderr()
    );
    client.aggregate(request("new")).await.unwrap();

    // Rewriting the same contents is not a change. (The wait lets the
    // watcher look at the file at least once; a slower machine only makes
    // the check weaker.)
    rewrite(
        &gateway.config_path(),
        &(source.clone() + &aggregation("new", &["s"], "")),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rewrite(
        &gateway.config_path(),
        &(source + &aggregation("newer", &["s"], "")),
    );
    assert!(
        gateway
            .wait_for_lines(PATIENCE, 2, |l| l.contains("config reloaded"))
            .await
    );
    client.aggregate(request("newer")).await.unwrap();
    let reloads = gateway.stderr().matches("reloading the config").count();
    assert_eq!(reloads, 2, "{}", gateway.stderr());
}

#[tokio::test]
async fn a_second_sigterm_exits_without_waiting_for_the_shutdown_delay() {
    let upstream = Upstream::http().start().await;
    let mut gateway = Process::start(
        &format!(
            "[server]\nshutdown_delay = \"1h\"\n{}{}",
            http_source("s", &upstream, "/u/{user_id}"),
            aggregation("dash", &["s"], "")
        ),
        &[],
    )
    .await;
    gateway.terminate();
    assert!(
        gateway
            .wait_for_line(PATIENCE, |l| l.contains("still serving"))
            .await
            .is_some()
    );
    // Still serving, for the hour it was told.
    gateway
        .client()
        .await
        .aggregate(request("dash"))
        .await
        .unwrap();
    gateway.terminate();
    assert_eq!(gateway.wait(PATIENCE).await, Some(128 + 15));
}
