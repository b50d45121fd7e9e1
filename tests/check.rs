//! `aggregator check`: the startup validation without binding, warnings
//! about valid configs that probably mean something else, and `--probe`
//! against real upstreams.

mod support;

use support::*;

/// Runs `aggregator check --config FILE` plus `args`: exit code, stdout.
async fn check(toml: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let (path, _dir) = Process::config_file(toml);
    let path = path.to_str().unwrap().to_owned();
    let mut all = vec!["check", "--config", &path];
    all.extend(args);
    let output = Process::run(&all).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.code(), stdout, path)
}

fn line_with<'a>(stdout: &'a str, needle: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
}

#[tokio::test]
async fn a_clean_config_passes_even_when_strict() {
    let upstream = Upstream::http().start().await;
    let toml = http_source("s", &upstream, "/u/{user_id}") + &aggregation("dash", &["s"], "");
    let (code, stdout, path) = check(&toml, &["--strict"]).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{path}: 1 sources, 1 aggregations: 0 errors, 0 warnings"
        )),
        "{stdout}"
    );
}

#[tokio::test]
async fn warnings_name_file_and_key_and_fail_only_when_strict() {
    let upstream = Upstream::http().start().await;
    let toml = format!(
        "{}timeout = \"5s\"\nretry = {{ attempts = 4, backoff = \"1s\", max_backoff = \"1s\" }}\n\
         hedge = {{ delay = \"5s\" }}\n\
         {}breaker = {{ failures = 3 }}\n\
         {}\
         {}{}",
        http_source("slow", &upstream, "/u/{user_id}"),
        http_source("unguarded", &upstream, "/u/{user_id}"),
        http_source("unused", &upstream, "/u/{user_id}"),
        aggregation("dash", &["slow", "unguarded"], "timeout = \"2s\""),
        aggregation("lenient", &["unguarded"], "optional = [\"unguarded\"]"),
    );
    let (code, stdout, path) = check(&toml, &[]).await;
    assert_eq!(code, Some(0), "warnings alone pass: {stdout}");
    for key in [
        "sources.slow.timeout",
        "sources.slow.retry",
        "sources.slow.hedge",
        "sources.unguarded.breaker",
        "sources.unused",
        "aggregations.lenient.optional",
    ] {
        let line = line_with(&stdout, &format!("`{key}`"));
        assert!(line.starts_with(&format!("warning: {path}: ")), "{line}");
    }
    assert!(line_with(&stdout, "`sources.slow.timeout`").contains("'dash'"));
    assert!(stdout.contains("0 errors, 6 warnings"), "{stdout}");

    let (code, stdout, _) = check(&toml, &["--strict"]).await;
    assert_eq!(code, Some(1), "{stdout}");
}

#[tokio::test]
async fn an_invalid_config_fails_naming_file_and_key() {
    let (code, stdout, path) = check("[aggregations.dash]\nsources = [\"nowhere\"]\n", &[]).await;
    assert_eq!(code, Some(1));
    let line = line_with(&stdout, "error:");
    assert!(
        line.contains(&path) && line.contains("aggregations.dash.sources"),
        "{line}"
    );

    // Files are checked as at startup: a CA that is not there.
    let (code, stdout, path) = check(
        "[sources.s]\nkind = \"http\"\nurl = \"https://127.0.0.1:1/s\"\ntls = { ca = \"missing-ca.crt\" }\n",
        &[],
    )
    .await;
    assert_eq!(code, Some(1));
    let line = line_with(&stdout, "error:");
    assert!(
        line.contains(&path) && line.contains("sources.s.tls.ca"),
        "{line}"
    );
}

#[tokio::test]
async fn probe_prints_a_row_per_source_and_passes_when_all_answer() {
    let grpc = Upstream::grpc().start().await;
    let http = Upstream::http().start().await;
    let toml = format!(
        "{}health_check = {{ interval = \"1s\" }}\n{}health_check = {{ path = \"/healthz\" }}\n{}",
        grpc_source("profile", &grpc),
        http_source("orders", &http, "/u/{user_id}"),
        aggregation("dash", &["profile", "orders"], ""),
    );
    let (code, stdout, _) = check(&toml, &["--probe"]).await;
    assert_eq!(code, Some(0), "{stdout}");
    let header = line_with(&stdout, "SOURCE");
    for column in ["KIND", "REACHABLE", "SCHEMA", "HEALTHY", "LATENCY"] {
        assert!(header.contains(column), "{header}");
    }
    let profile: Vec<&str> = line_with(&stdout, "profile ").split_whitespace().collect();
    assert_eq!(
        profile[..5],
        [
            "profile",
            "grpc",
            "yes",
            "reflection:",
            "demo.v1.GetProfileRequest"
        ],
        "{stdout}"
    );
    assert_eq!(profile[5], "yes", "healthy: {stdout}");
    assert!(profile[6].ends_with("ms"), "{stdout}");
    let orders: Vec<&str> = line_with(&stdout, "orders ").split_whitespace().collect();
    assert_eq!(orders[..3], ["orders", "http", "yes"], "{stdout}");
    // The probe dialed, looked up the schema and ran each health check.
    let http_paths: Vec<String> = http.log.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(http_paths, ["/healthz"], "only the health check, no call");
    assert!(grpc.log.paths_starting("/grpc.health.v1.Health/Check") >= 1);
    assert!(grpc.log.paths_starting("/grpc.reflection.") >= 1);
    assert_eq!(grpc.log.paths_starting("/demo.v1.Profiles/"), 0, "no call");
}

#[tokio::test]
async fn probe_fails_on_an_unreachable_source_a_schema_it_cannot_learn_and_a_template_that_does_not_fit()
 {
    let no_reflection = Upstream::grpc().without_reflection().start().await;
    let misfit = Upstream::grpc().start().await;
    let unhealthy = Upstream::http().status(503).start().await;
    let down = refused_addr().await;
    let toml = format!(
        "{}{}\
         [sources.misfit]\nkind = \"grpc\"\nendpoint = \"{}\"\nmethod = \"demo.v1.Profiles/GetProfile\"\nrequest = {{ no_such_field = \"{{user_id}}\" }}\n\
         {}health_check = {{ path = \"/healthz\" }}\n\
         [sources.down]\nkind = \"http\"\nurl = \"http://{down}/u/{{user_id}}\"\n{}",
        grpc_source("blind", &no_reflection),
        "",
        misfit.grpc_endpoint(),
        http_source("unhealthy", &unhealthy, "/u/{user_id}"),
        aggregation("dash", &["blind", "misfit", "unhealthy", "down"], ""),
    );
    let (code, stdout, path) = check(&toml, &["--probe", "--probe-timeout", "10s"]).await;
    assert_eq!(code, Some(1), "{stdout}");
    let error = |source: &str, what: &str| {
        let prefix = format!("error: {path}: `sources.{source}`: {what}: ");
        stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{stdout}"))
            .to_owned()
    };
    assert!(
        error("blind", "schema").contains("descriptor_set"),
        "the hint"
    );
    assert!(error("misfit", "schema").contains("no_such_field"));
    assert!(error("unhealthy", "health check").contains("503"));
    assert!(error("down", "connect").contains("refused"));
    let down_row: Vec<&str> = line_with(&stdout, "down ").split_whitespace().collect();
    assert_eq!(down_row[..3], ["down", "http", "no"], "{stdout}");
    assert!(stdout.contains("4 errors"), "{stdout}");
}
