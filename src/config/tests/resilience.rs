//! Retries, coalescing, breakers, health checks, hedges.

use super::*;

#[test]
fn retry_defaults_and_inheritance() {
    let config = parse(&format!(
        "[defaults]\nretry = {{ attempts = 3 }}\n{TWO_SOURCES}retry = {{ attempts = 2, backoff = \"5ms\", max_backoff = \"50ms\", on = [\"503\", \"connect\"], budget = 0.5, min_per_second = 1 }}\n"
    ))
    .unwrap();
    let a = source(&config, "a").retry.clone().unwrap();
    assert_eq!(
        a,
        RetrySpec {
            attempts: 3,
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
            on: RetryOn::ALL,
            budget: 0.2,
            min_per_second: 10,
        }
    );
    let b = source(&config, "b").retry.clone().unwrap();
    assert_eq!(b.attempts, 2);
    assert_eq!(
        b.on,
        RetryOn::parse(&["connect".into(), "503".into()]).unwrap()
    );
    assert!(b.on.contains("503") && !b.on.contains("unavailable"));
}

#[test]
fn retries_are_only_for_requests_safe_to_repeat() {
    // Inherited by a POST: dropped.
    let config = parse(&format!(
        "[defaults]\nretry = {{ attempts = 3 }}\n{}",
        http_source("method = \"POST\"")
    ))
    .unwrap();
    assert_eq!(source(&config, "p").retry, None);
    // Written on it: refused, unless it says it is idempotent.
    assert_invalid(
        parse(&http_source("method = \"POST\"\nretry = { attempts = 3 }")),
        "sources.p.retry",
        "POST is not safe to repeat",
    );
    let config = parse(&http_source(
        "method = \"POST\"\nidempotent = true\nretry = { attempts = 3 }",
    ))
    .unwrap();
    assert!(source(&config, "p").retry.is_some());
    // And a gRPC method may say it is not.
    let config = parse(&format!(
        "[defaults]\nretry = {{ attempts = 3 }}\n{}",
        grpc_source("idempotent = false")
    ))
    .unwrap();
    assert_eq!(source(&config, "p").retry, None);
}

#[test]
fn bad_retry_settings_are_refused() {
    assert_invalid(
        parse(&http_source("retry = { attempts = 0 }")),
        "sources.p.retry.attempts",
        "at least 1",
    );
    assert_invalid(
        parse(&http_source("retry = { attempts = 2, on = [\"500\"] }")),
        "sources.p.retry.on",
        "`500` is not a failure safe to retry",
    );
    assert_invalid(
        parse(&http_source(
            "retry = { attempts = 2, backoff = \"2s\", max_backoff = \"1s\" }",
        )),
        "sources.p.retry.backoff",
        "must not exceed",
    );
    assert_invalid(
        parse(&format!(
            "[defaults]\nretry = {{ attempts = 2, budget = -1.0 }}\n{HTTP_SOURCE}"
        )),
        "defaults.retry.budget",
        "fraction",
    );
    assert_parse_error(
        &http_source("retry = { attempts = 2, tries = 3 }"),
        &["unknown field `tries`"],
    );
}

#[test]
fn coalescing_is_on_for_reads_and_only_a_source_turns_it_on_for_writes() {
    let on = |extra: &str, defaults: &str| {
        let text = format!("{defaults}{}", http_source(extra));
        source(&parse(&text).unwrap(), "p").coalesce
    };
    assert!(on("", ""));
    assert!(on("method = \"HEAD\"", ""));
    assert!(!on("method = \"PUT\"", ""));
    assert!(!on("method = \"POST\"", "[defaults]\ncoalesce = true\n"));
    assert!(on("method = \"POST\"\ncoalesce = true", ""));
    assert!(!on("", "[defaults]\ncoalesce = false\n"));
    let grpc = |extra: &str| source(&parse(&grpc_source(extra)).unwrap(), "p").coalesce;
    assert!(grpc(""));
    assert!(!grpc("idempotent = false"));
    assert!(!grpc("coalesce = false"));
}

#[test]
fn breakers_take_defaults_and_refuse_nonsense() {
    let config = parse(&format!(
        "[defaults]\nbreaker = {{ failures = 4 }}\n{TWO_SOURCES}breaker = {{ failure_ratio = 0.5, cool_down = \"1s\" }}\n"
    ))
    .unwrap();
    let a = source(&config, "a").breaker.clone().unwrap();
    assert_eq!(
        a,
        BreakerSpec {
            failures: 4,
            failure_ratio: None,
            min_calls: 20,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(5),
            max_cool_down: Duration::from_secs(60),
        }
    );
    let b = source(&config, "b").breaker.clone().unwrap();
    assert_eq!((b.failures, b.failure_ratio), (5, Some(0.5)));
    assert_eq!(b.cool_down, Duration::from_secs(1));

    for (setting, key, expected) in [
        ("failures = 0", "failures", "at least 1"),
        ("failure_ratio = 1.5", "failure_ratio", "fraction"),
        ("window = \"0s\"", "window", "greater than zero"),
        ("cool_down = \"2m\"", "cool_down", "must not exceed"),
    ] {
        assert_invalid(
            parse(&http_source(&format!("breaker = {{ {setting} }}"))),
            &format!("sources.p.breaker.{key}"),
            expected,
        );
    }
}

#[test]
fn health_checks_name_their_target_and_bring_a_breaker() {
    let config = parse(&http_source(
        "health_check = { path = \"/healthz\", interval = \"2s\" }",
    ))
    .unwrap();
    let p = source(&config, "p");
    assert_eq!(
        p.health_check,
        Some(HealthCheckSpec {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            target: HealthTarget::Http("http://127.0.0.1:1/healthz".parse().unwrap()),
        })
    );
    assert!(p.breaker.is_some(), "the checks need a circuit to open");

    let config = parse(&grpc_source("health_check = {}")).unwrap();
    assert_eq!(
        source(&config, "p").health_check.as_ref().unwrap().target,
        HealthTarget::Grpc {
            service: "demo.v1.Profiles".into()
        }
    );

    assert_invalid(
        parse(&http_source("health_check = { interval = \"1s\" }")),
        "sources.p.health_check.path",
        "missing",
    );
    assert_invalid(
        parse(&grpc_source("health_check = { path = \"/healthz\" }")),
        "sources.p.health_check.path",
        "is for HTTP sources",
    );
    assert_invalid(
        parse(&http_source("health_check = { path = \"healthz\" }")),
        "sources.p.health_check.path",
        "absolute path",
    );
}

#[test]
fn hedges_take_a_fixed_delay_or_the_p95_and_only_where_safe() {
    let hedge = |extra: &str| {
        source(&parse(&http_source(extra)).unwrap(), "p")
            .hedge
            .clone()
    };
    assert_eq!(
        hedge("hedge = { delay = \"40ms\" }"),
        Some(HedgeSpec {
            delay: HedgeDelay::Fixed(Duration::from_millis(40))
        })
    );
    assert_eq!(
        hedge("hedge = { delay = \"p95\", min_delay = \"5ms\" }"),
        Some(HedgeSpec {
            delay: HedgeDelay::P95 {
                min: Duration::from_millis(5)
            }
        })
    );
    assert_invalid(
        parse(&http_source("hedge = { delay = \"soon\" }")),
        "sources.p.hedge.delay",
        "expected a duration",
    );
    assert_invalid(
        parse(&http_source(
            "hedge = { delay = \"10ms\", min_delay = \"5ms\" }",
        )),
        "sources.p.hedge.min_delay",
        "only applies",
    );
    assert_invalid(
        parse(&http_source(
            "method = \"POST\"\nhedge = { delay = \"10ms\" }",
        )),
        "sources.p.hedge",
        "not safe to repeat",
    );
    let inherited = parse(&format!(
        "[defaults]\nhedge = {{ delay = \"10ms\" }}\n{}",
        http_source("method = \"POST\"")
    ))
    .unwrap();
    assert_eq!(source(&inherited, "p").hedge, None);
}
