//! `min_success`: a call whose sources mostly failed is a failure, not an
//! empty success, with one code chosen by a documented order and an
//! ErrorInfo per failed source (codes by their canonical names).

mod support;

use aggregator::pb::aggregator::v1::{AggregateRequest, FetchAllRequest, Mode};
use support::*;
use tonic::Code;
use tonic_types::{ErrorDetail, StatusExt};

fn call(aggregation: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", "7")]),
    }
}

/// (source, code) of each ErrorInfo.
fn failed_sources(status: &tonic::Status) -> Vec<(String, String)> {
    status
        .get_error_details_vec()
        .into_iter()
        .filter_map(|d| match d {
            ErrorDetail::ErrorInfo(i) => Some((
                i.metadata.get("source")?.clone(),
                i.metadata.get("code")?.clone(),
            )),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_best_effort_call_where_every_source_failed_is_a_failure() {
    let missing = Upstream::grpc()
        .fail_with(Code::NotFound, "no such user")
        .start()
        .await;
    let down = Upstream::http().status(503).start().await;
    let gw = Gateway::start(&format!(
        "{}{}{}",
        grpc_source("profile", &missing),
        http_source("orders", &down, "/o/{user_id}"),
        aggregation("dash", &["orders", "profile"], "mode = \"best_effort\"")
    ))
    .await;
    let status = gw.client().await.aggregate(call("dash")).await.unwrap_err();
    // NOT_FOUND ranks before UNAVAILABLE.
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        status.message(),
        "0 of 2 sources succeeded (min_success = 1)"
    );
    assert_eq!(
        failed_sources(&status),
        [
            ("orders".to_owned(), "UNAVAILABLE".to_owned()),
            ("profile".to_owned(), "NOT_FOUND".to_owned())
        ]
    );
}

#[tokio::test]
async fn min_success_counts_every_source_of_the_call() {
    let ok = Upstream::http().start().await;
    let bad = Upstream::http().status(400).start().await;
    let slow = Upstream::http().status(504).start().await;
    let sources = format!(
        "{}{}{}",
        http_source("a", &ok, "/a"),
        http_source("b", &bad, "/b"),
        http_source("c", &slow, "/c"),
    );
    let gw = Gateway::start(&format!(
        "{sources}{}{}",
        aggregation(
            "two",
            &["a", "b", "c"],
            "mode = \"best_effort\"\nmin_success = 2"
        ),
        aggregation(
            "opt",
            &["a", "b", "c"],
            "optional = [\"b\", \"c\"]\nmin_success = 2"
        )
    ))
    .await;
    let mut client = gw.client().await;
    // One of three: under 2. INVALID_ARGUMENT (b's 400) ranks before
    // DEADLINE_EXCEEDED (c's 504).
    let status = client.aggregate(call("two")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "1 of 3 sources succeeded (min_success = 2)"
    );
    // Optional sources count too, in fail-fast mode.
    let status = client.aggregate(call("opt")).await.unwrap_err();
    assert_eq!(
        status.message(),
        "1 of 3 sources succeeded (min_success = 2)"
    );
    // A subset of two with one success is under 2 too; a subset of one
    // success meets min_success capped at 1.
    let fetch = |sources: &[&str]| FetchAllRequest {
        payload: None,
        aggregation: "two".into(),
        params: params(&[("user_id", "7")]),
        sources: sources.iter().map(|s| s.to_string()).collect(),
        mode: Mode::Unspecified as i32,
    };
    let status = client.fetch_all(fetch(&["a", "b"])).await.unwrap_err();
    assert_eq!(
        status.message(),
        "1 of 2 sources succeeded (min_success = 2)"
    );
    let response = client.fetch_all(fetch(&["a"])).await.unwrap().into_inner();
    assert!(response.complete);
}

#[tokio::test]
async fn enough_successes_answer_ok_and_incomplete() {
    let ok = Upstream::http().start().await;
    let bad = Upstream::http().status(500).start().await;
    let gw = Gateway::start(&format!(
        "{}{}{}",
        http_source("a", &ok, "/a"),
        http_source("b", &bad, "/b"),
        aggregation("ab", &["a", "b"], "mode = \"best_effort\"")
    ))
    .await;
    let response = gw
        .client()
        .await
        .aggregate(call("ab"))
        .await
        .unwrap()
        .into_inner();
    assert!(!response.complete);
    assert_eq!(response.sources[1].code, Code::Internal as i32);
}

#[tokio::test]
async fn a_source_failure_names_its_code_canonically() {
    let missing = Upstream::grpc()
        .fail_with(Code::NotFound, "no such user")
        .start()
        .await;
    let gw = Gateway::start(&format!(
        "{}{}",
        grpc_source("profile", &missing),
        aggregation("p", &["profile"], "")
    ))
    .await;
    let status = gw.client().await.aggregate(call("p")).await.unwrap_err();
    assert_eq!(
        failed_sources(&status),
        [("profile".to_owned(), "NOT_FOUND".to_owned())]
    );
}
