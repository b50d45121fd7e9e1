mod support;

use aggregator::pb::aggregator::v1::{
    AggregateRequest, AggregateResponse, FetchAllRequest, aggregator_client::AggregatorClient,
};
use support::*;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

fn aggregate(aggregation: &str, pairs: &[(&str, &str)]) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(pairs),
    }
}

fn fetch_all(aggregation: &str, pairs: &[(&str, &str)], sources: &[&str]) -> FetchAllRequest {
    FetchAllRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(pairs),
        sources: sources.iter().map(|s| s.to_string()).collect(),
        mode: 0,
    }
}

/// Asserts the call failed with `code` and a message mentioning every `needle`.
fn expect_status<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, Status>,
    code: Code,
    needles: &[&str],
) -> Status {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "message {:?} does not mention {needle:?}",
            status.message()
        );
    }
    status
}

/// The gateway still answers a good call after a refused one.
async fn assert_serves(
    client: &mut AggregatorClient<Channel>,
    request: AggregateRequest,
) -> AggregateResponse {
    client
        .aggregate(request)
        .await
        .expect("a good call after a bad one should succeed")
        .into_inner()
}

/// A gateway over one gRPC (`profile`) and one HTTP (`orders`) source, both
/// in aggregation `dash`.
async fn dash(profile: &Running, orders: &Running) -> Gateway {
    Gateway::start(&format!(
        "{}{}{}",
        grpc_source("profile", profile),
        http_source("orders", orders, "/users/{user_id}/orders"),
        aggregation("dash", &["profile", "orders"], "")
    ))
    .await
}

#[tokio::test]
async fn unknown_aggregation_is_not_found_naming_it() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().start().await;
    let gateway = dash(&profile, &orders).await;
    let mut client = gateway.client().await;

    let status = expect_status(
        client
            .aggregate(aggregate("no-such-dash", &[("user_id", "7")]))
            .await,
        Code::NotFound,
        &["no-such-dash"],
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["aggregation"], "no-such-dash");

    expect_status(
        client
            .fetch_all(fetch_all("no-such-fetch", &[("user_id", "7")], &[]))
            .await,
        Code::NotFound,
        &["no-such-fetch"],
    );
    assert_eq!(profile.log.stats().started, 0);
    assert_eq!(orders.log.stats().started, 0);
    assert_serves(&mut client, aggregate("dash", &[("user_id", "7")])).await;
}

#[tokio::test]
async fn missing_parameter_is_invalid_argument_and_calls_no_upstream() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().start().await;
    let gateway = dash(&profile, &orders).await;
    let mut client = gateway.client().await;

    let status = expect_status(
        client
            .aggregate(aggregate("dash", &[("userid", "7")]))
            .await,
        Code::InvalidArgument,
        &["user_id"],
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["parameter"], "user_id");

    expect_status(
        client.fetch_all(fetch_all("dash", &[], &["orders"])).await,
        Code::InvalidArgument,
        &["user_id"],
    );
    assert_eq!(profile.log.stats().started, 0);
    assert_eq!(orders.log.stats().started, 0);
    assert_serves(&mut client, aggregate("dash", &[("user_id", "7")])).await;
}

#[tokio::test]
async fn unknown_source_in_fetch_all_is_invalid_argument_and_calls_no_upstream() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().start().await;
    let gateway = dash(&profile, &orders).await;
    let mut client = gateway.client().await;

    let status = expect_status(
        client
            .fetch_all(fetch_all(
                "dash",
                &[("user_id", "7")],
                &["orders", "ghost-source"],
            ))
            .await,
        Code::InvalidArgument,
        &["ghost-source"],
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["source"], "ghost-source");
    assert_eq!(profile.log.stats().started, 0);
    assert_eq!(orders.log.stats().started, 0);
    assert_serves(&mut client, aggregate("dash", &[("user_id", "7")])).await;
}

#[tokio::test]
async fn unknown_mode_number_is_invalid_argument() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().start().await;
    let gateway = dash(&profile, &orders).await;
    let mut client = gateway.client().await;

    let mut request = fetch_all("dash", &[("user_id", "7")], &[]);
    request.mode = 7;
    expect_status(
        client.fetch_all(request).await,
        Code::InvalidArgument,
        &["mode", "7"],
    );
    assert_eq!(profile.log.stats().started, 0);
    assert_eq!(orders.log.stats().started, 0);
    assert_serves(&mut client, aggregate("dash", &[("user_id", "7")])).await;
}

#[tokio::test]
async fn hostile_path_parameter_stays_inside_its_segment() {
    let orders = Upstream::http().start().await;
    let gateway = Gateway::start(&format!(
        "{}{}",
        http_source("orders", &orders, "/users/{user_id}/orders"),
        aggregation("orders", &["orders"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    client
        .aggregate(aggregate("orders", &[("user_id", "../../admin?x=1")]))
        .await
        .unwrap();
    client
        .aggregate(aggregate("orders", &[("user_id", "..")]))
        .await
        .unwrap();
    let targets: Vec<String> = orders
        .log
        .requests()
        .into_iter()
        .map(|s| s.target)
        .collect();
    assert_eq!(
        targets,
        [
            "/users/..%2F..%2Fadmin%3Fx%3D1/orders",
            "/users/%2E%2E/orders"
        ]
    );

    // An empty segment would collapse `/users//orders` into another route.
    let status = expect_status(
        client
            .aggregate(aggregate("orders", &[("user_id", "")]))
            .await,
        Code::InvalidArgument,
        &["user_id"],
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["parameter"], "user_id");
    assert_eq!(orders.log.stats().started, 2);
    assert_serves(&mut client, aggregate("orders", &[("user_id", "7")])).await;
}

#[tokio::test]
async fn query_parameter_is_percent_encoded_in_its_value() {
    let search = Upstream::http().start().await;
    let gateway = Gateway::start(&format!(
        "{}{}",
        http_source("search", &search, "/search?q={q}&n=1"),
        aggregation("search", &["search"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    client
        .aggregate(aggregate("search", &[("q", "a b&admin=1#x")]))
        .await
        .unwrap();
    assert_eq!(
        search.log.requests()[0].target,
        "/search?q=a%20b%26admin%3D1%23x&n=1"
    );
}

#[tokio::test]
async fn json_template_parameter_arrives_as_one_literal_string() {
    let profile = Upstream::grpc().start().await;
    let gateway = Gateway::start(&format!(
        "{}{}",
        grpc_source("profile", &profile),
        aggregation("profile", &["profile"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    let hostile = r#"7", "email": "evil"#;
    let response = client
        .aggregate(aggregate("profile", &[("user_id", hostile)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(profile.log.requests()[0].target, hostile);
    assert!(response.complete);
}

#[tokio::test]
async fn header_parameter_is_forwarded_verbatim_and_control_characters_are_refused() {
    let api = Upstream::http().start().await;
    let gateway = Gateway::start(&format!(
        "{}headers = {{ authorization = \"Bearer {{token}}\" }}\n{}",
        http_source("api", &api, "/me"),
        aggregation("me", &["api"], "")
    ))
    .await;
    let mut client = gateway.client().await;

    client
        .aggregate(aggregate("me", &[("token", "abc.DEF-123_~+/=")]))
        .await
        .unwrap();
    let seen = api.log.requests();
    assert_eq!(seen[0].headers["authorization"], "Bearer abc.DEF-123_~+/=");

    let status = expect_status(
        client
            .aggregate(aggregate("me", &[("token", "abc\r\nx-admin: 1")]))
            .await,
        Code::InvalidArgument,
        &["token"],
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["parameter"], "token");
    assert_eq!(api.log.stats().started, 1, "the injected call was sent");
    assert_serves(&mut client, aggregate("me", &[("token", "abc")])).await;
}

#[tokio::test]
async fn oversized_parameter_is_invalid_argument_naming_it() {
    let profile = Upstream::grpc().start().await;
    let orders = Upstream::http().start().await;
    let gateway = dash(&profile, &orders).await;
    let mut client = gateway.client().await;

    let huge = "x".repeat(8193);
    let status = expect_status(
        client
            .aggregate(aggregate("dash", &[("user_id", &huge)]))
            .await,
        Code::InvalidArgument,
        &["user_id"],
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["parameter"], "user_id");
    assert_eq!(profile.log.stats().started, 0);
    assert_eq!(orders.log.stats().started, 0);

    // The cap is inclusive: exactly 8192 bytes is accepted.
    let largest = "x".repeat(8192);
    assert_serves(&mut client, aggregate("dash", &[("user_id", &largest)])).await;
}

#[tokio::test]
async fn grpc_request_template_field_unknown_to_the_method_is_failed_precondition() {
    let profile = Upstream::grpc().start().await;
    let gateway = Gateway::start(&format!(
        "[sources.typo]\nkind = \"grpc\"\nendpoint = \"{}\"\nmethod = \"demo.v1.Profiles/GetProfile\"\nrequest = {{ no_such_field = \"{{user_id}}\" }}\n{}{}{}",
        profile.grpc_endpoint(),
        grpc_source("profile", &profile),
        aggregation("typo", &["typo"], ""),
        aggregation("profile", &["profile"], ""),
    ))
    .await;
    let mut client = gateway.client().await;

    let status = expect_status(
        client
            .aggregate(aggregate("typo", &[("user_id", "7")]))
            .await,
        Code::FailedPrecondition,
        &["typo", "no_such_field"],
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["source"], "typo");
    assert_eq!(profile.log.stats().started, 0, "GetProfile was called");
    assert_serves(&mut client, aggregate("profile", &[("user_id", "7")])).await;
}
