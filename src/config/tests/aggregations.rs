//! `[aggregations.NAME]`.

use super::*;

#[test]
fn aggregation_of_an_unknown_source_lists_the_known_ones() {
    let text = format!(
        "{HTTP_SOURCE}[sources.q]\nkind = \"http\"\nurl = \"http://h/q\"\n[aggregations.a]\nsources = [\"p\", \"nope\"]\n"
    );
    assert_invalid(parse(&text), "aggregations.a.sources", "'nope'");
    let (_, message) = refused(parse(&text));
    assert!(message.contains("known: p, q"), "{message}");
}

#[test]
fn source_listed_twice_is_refused() {
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nsources = [\"p\", \"p\"]\n");
    assert_invalid(
        parse(&text),
        "aggregations.a.sources",
        "'p' is listed twice",
    );
}

#[test]
fn optional_source_outside_the_aggregation_is_refused() {
    let text = format!(
        "{HTTP_SOURCE}[sources.q]\nkind = \"http\"\nurl = \"http://h/q\"\n[aggregations.a]\nsources = [\"p\"]\noptional = [\"q\"]\n"
    );
    assert_invalid(parse(&text), "aggregations.a.optional", "'q'");
}

#[test]
fn empty_aggregation_is_refused() {
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nsources = []\n");
    assert_invalid(
        parse(&text),
        "aggregations.a.sources",
        "at least one source",
    );
}

#[test]
fn aggregation_without_sources_key_is_refused() {
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nmode = \"fail_fast\"\n");
    assert_parse_error(&text, &["sources"]);
}

#[test]
fn unknown_mode_is_refused() {
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nsources = [\"p\"]\nmode = \"yolo\"\n");
    assert_parse_error(&text, &["yolo", "fail_fast", "best_effort"]);
}

#[test]
fn zero_timeouts_are_refused() {
    assert_invalid(
        parse(&http_source("timeout = \"0s\"")),
        "sources.p.timeout",
        "greater than zero",
    );
    assert_invalid(
        parse(&grpc_source("timeout = \"0ms\"")),
        "sources.p.timeout",
        "greater than zero",
    );
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nsources = [\"p\"]\ntimeout = \"0s\"\n");
    assert_invalid(parse(&text), "aggregations.a.timeout", "greater than zero");
}

#[test]
fn zero_response_cap_is_refused() {
    assert_invalid(
        parse(&http_source("max_response_bytes = 0")),
        "sources.p.max_response_bytes",
        "greater than zero",
    );
}

#[test]
fn min_success_defaults_to_one_and_cannot_exceed_the_sources() {
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nsources = [\"p\"]\n");
    assert_eq!(parse(&text).unwrap().aggregations[0].min_success, 1);
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nsources = [\"p\"]\nmin_success = 0\n");
    assert_eq!(parse(&text).unwrap().aggregations[0].min_success, 0);
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nsources = [\"p\"]\nmin_success = 2\n");
    assert_invalid(parse(&text), "aggregations.a.min_success", "more than");
}
