//! `[defaults]`, concurrency caps, fallbacks.

use super::*;

#[test]
fn sources_inherit_defaults_and_their_own_keys_win() {
    let config = parse(&format!(
        "[defaults]\ntimeout = \"300ms\"\nmax_response_bytes = 1024\nmax_concurrent = 8\nqueue_timeout = \"5ms\"\n\
         {TWO_SOURCES}timeout = \"1s\"\nmax_concurrent = 2\n"
    ))
    .unwrap();
    let a = source(&config, "a");
    assert_eq!(a.timeout, Some(Duration::from_millis(300)));
    assert_eq!(a.max_response_bytes, 1024);
    let a_limit = Limit {
        max: 8,
        queue_timeout: Duration::from_millis(5),
    };
    assert_eq!(a.max_concurrent, Some(a_limit));
    let b = source(&config, "b");
    assert_eq!(b.timeout, Some(Duration::from_secs(1)));
    assert_eq!(b.max_response_bytes, 1024);
    assert_eq!(b.max_concurrent.map(|l| l.max), Some(2));
}

#[test]
fn without_caps_nothing_is_limited_and_queue_time_defaults() {
    let config = parse(&format!("{TWO_SOURCES}max_concurrent = 3\n")).unwrap();
    assert_eq!(config.server.max_concurrent_calls, None);
    assert_eq!(source(&config, "a").max_concurrent, None);
    assert_eq!(
        source(&config, "b").max_concurrent,
        Some(Limit {
            max: 3,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT
        })
    );
}

#[test]
fn gateway_wide_cap_is_read_from_server() {
    let config = parse(&format!(
        "[server]\nmax_concurrent_calls = 500\nqueue_timeout = \"20ms\"\n{HTTP_SOURCE}"
    ))
    .unwrap();
    assert_eq!(
        config.server.max_concurrent_calls,
        Some(Limit {
            max: 500,
            queue_timeout: Duration::from_millis(20)
        })
    );
}

#[test]
fn zero_caps_are_refused_where_they_are_written() {
    assert_invalid(
        parse(&http_source("max_concurrent = 0")),
        "sources.p.max_concurrent",
        "at least 1",
    );
    assert_invalid(
        parse(&format!(
            "[server]\nmax_concurrent_calls = 0\n{HTTP_SOURCE}"
        )),
        "server.max_concurrent_calls",
        "at least 1",
    );
    for (key, value) in [
        ("max_concurrent", "0"),
        ("timeout", "\"0s\""),
        ("max_response_bytes", "0"),
    ] {
        assert_invalid(
            parse(&format!("[defaults]\n{key} = {value}\n{HTTP_SOURCE}")),
            &format!("defaults.{key}"),
            "greater than zero",
        );
    }
}

#[test]
fn unknown_defaults_key_is_refused() {
    assert_parse_error(
        &format!("[defaults]\nurl = \"http://x\"\n{HTTP_SOURCE}"),
        &["unknown field `url`"],
    );
}

#[test]
fn fallback_is_any_json_value() {
    let config = parse(&http_source(
        "fallback = { orders = [], count = 0, note = \"unavailable\" }",
    ))
    .unwrap();
    assert_eq!(
        source(&config, "p").fallback,
        Some(serde_json::json!({ "orders": [], "count": 0, "note": "unavailable" }))
    );
    let config = parse(&http_source("fallback = \"n/a\"")).unwrap();
    assert_eq!(
        source(&config, "p").fallback,
        Some(serde_json::json!("n/a"))
    );
}

#[test]
fn counts_beyond_any_machine_are_refused_naming_the_key() {
    let huge = "4000000000000000000";
    assert_invalid(
        parse(&format!(
            "[server]\nmax_concurrent_calls = {huge}\n{HTTP_SOURCE}"
        )),
        "server.max_concurrent_calls",
        "at most",
    );
    assert_invalid(
        parse(&format!(
            "[server]\nmax_connections = {huge}\n{HTTP_SOURCE}"
        )),
        "server.max_connections",
        "at most",
    );
    assert_invalid(
        parse(&http_source(&format!("max_concurrent = {huge}"))),
        "sources.p.max_concurrent",
        "at most",
    );
    assert_invalid(
        parse(&http_source(&format!("max_connections = {huge}"))),
        "sources.p.max_connections",
        "at most",
    );
}
