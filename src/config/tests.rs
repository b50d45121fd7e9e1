use super::*;

const ORIGIN: &str = "gw.toml";

/// A valid HTTP source named `p`, for configs that only break something else.
const HTTP_SOURCE: &str =
    "[sources.p]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/users/{user_id}\"\n";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, ORIGIN, Path::new("."))
}

fn parse_with_protos(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, ORIGIN, Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// The rendered error of a config that must be refused.
fn refused(result: Result<Config, ConfigError>) -> (ConfigError, String) {
    match result {
        Ok(config) => panic!("config was accepted: {config:?}"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.starts_with(ORIGIN),
                "message does not name the file first: {message}"
            );
            (e, message)
        }
    }
}

/// A TOML-level refusal (syntax, unknown key, wrong type): the message names
/// the file and contains every one of `needles`.
fn assert_parse_error(text: &str, needles: &[&str]) {
    let (error, message) = refused(parse(text));
    assert!(
        matches!(error, ConfigError::Parse { .. }),
        "expected a parse error, got {error:?}"
    );
    for needle in needles {
        assert!(
            message.contains(needle),
            "message lacks `{needle}`:\n{message}"
        );
    }
}

/// A validation refusal: names the file and exactly `key`, and says `expected`.
fn assert_invalid(result: Result<Config, ConfigError>, key: &str, expected: &str) {
    let (error, message) = refused(result);
    match &error {
        ConfigError::Invalid {
            origin,
            key: k,
            message: m,
        } => {
            assert_eq!(origin, ORIGIN);
            assert_eq!(k, key, "wrong key in: {message}");
            assert!(
                m.contains(expected),
                "message lacks `{expected}`: {message}"
            );
        }
        other => panic!("expected a validation error for `{key}`, got {other:?}"),
    }
    assert!(
        message.contains(&format!("`{key}`")),
        "message does not name `{key}`: {message}"
    );
}

fn http_source(extra: &str) -> String {
    format!("{HTTP_SOURCE}{extra}\n")
}

fn grpc_source(extra: &str) -> String {
    format!(
        "[sources.p]\nkind = \"grpc\"\nendpoint = \"http://127.0.0.1:1\"\nmethod = \"demo.v1.Profiles/GetProfile\"\n{extra}\n"
    )
}

/// A gRPC source whose schema comes from the repository's demo proto.
fn grpc_with_protos(method: &str, request: &str) -> String {
    format!(
        "[sources.p]\nkind = \"grpc\"\nendpoint = \"http://127.0.0.1:1\"\nmethod = \"{method}\"\nrequest = {request}\nprotos = [\"proto/demo/v1/demo.proto\"]\nimport_paths = [\"proto\"]\n"
    )
}

// ---- unknown keys and wrong types: toml's own message, with the file name ----

#[test]
fn unknown_top_level_key_is_refused() {
    assert_parse_error("colour = \"red\"\n", &["colour", "expected"]);
}

#[test]
fn unknown_server_key_is_refused() {
    assert_parse_error("[server]\nport = 8080\n", &["port", "expected"]);
}

#[test]
fn unknown_source_key_is_refused() {
    assert_parse_error(&http_source("retries = 3"), &["retries", "expected"]);
    assert_parse_error(&grpc_source("retries = 3"), &["retries", "expected"]);
}

#[test]
fn unknown_aggregation_key_is_refused() {
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nsources = [\"p\"]\nretries = 3\n");
    assert_parse_error(&text, &["retries", "expected"]);
}

#[test]
fn unknown_kind_is_refused() {
    let text = "[sources.p]\nkind = \"ftp\"\nurl = \"http://h/x\"\n";
    assert_parse_error(text, &["ftp", "grpc", "http"]);
}

#[test]
fn missing_kind_is_refused() {
    assert_parse_error("[sources.p]\nurl = \"http://h/x\"\n", &["kind"]);
}

#[test]
fn unparsable_source_timeout_is_refused() {
    assert_parse_error(&http_source("timeout = \"soon\""), &["timeout", "soon"]);
    assert_parse_error(&grpc_source("timeout = \"soon\""), &["timeout", "soon"]);
}

#[test]
fn unparsable_aggregation_timeout_is_refused() {
    let text = format!("{HTTP_SOURCE}[aggregations.a]\nsources = [\"p\"]\ntimeout = \"soon\"\n");
    assert_parse_error(&text, &["timeout", "soon"]);
}

#[test]
fn unparsable_drain_timeout_is_refused() {
    assert_parse_error(
        "[server]\ndrain_timeout = \"soon\"\n",
        &["drain_timeout", "soon"],
    );
}

#[test]
fn bad_listen_address_is_refused() {
    assert_parse_error(
        "[server]\nlisten = \"localhost\"\n",
        &["listen", "socket address"],
    );
    assert_parse_error(
        "[server]\nlisten = \"127.0.0.1:99999\"\n",
        &["listen", "socket address"],
    );
}

#[test]
fn bad_source_name_is_refused() {
    let text = "[sources.\"my source\"]\nkind = \"http\"\nurl = \"http://h/x\"\n";
    assert_invalid(parse(text), "sources.my source", "letters, digits");
}

// ---- aggregations ----

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

// ---- templates no request could fill, and malformed targets ----

#[test]
fn unclosed_placeholder_is_refused() {
    let text = "[sources.p]\nkind = \"http\"\nurl = \"http://h/users/{user_id\"\n";
    assert_invalid(parse(text), "sources.p.url", "unclosed placeholder");
    assert_invalid(
        parse(&grpc_source("request = { user_id = \"{user_id\" }")),
        "sources.p.request",
        "unclosed placeholder",
    );
}

#[test]
fn unmatched_brace_is_refused() {
    let text = "[sources.p]\nkind = \"http\"\nurl = \"http://h/users/x}\"\n";
    assert_invalid(parse(text), "sources.p.url", "unmatched");
}

#[test]
fn empty_placeholder_is_refused() {
    let text = "[sources.p]\nkind = \"http\"\nurl = \"http://h/users/{}\"\n";
    assert_invalid(parse(text), "sources.p.url", "invalid placeholder `{}`");
}

#[test]
fn placeholder_with_a_bad_name_is_refused() {
    let text = "[sources.p]\nkind = \"http\"\nurl = \"http://h/users/{bad name}\"\n";
    assert_invalid(
        parse(text),
        "sources.p.url",
        "invalid placeholder `{bad name}`",
    );
    assert_invalid(
        parse(&http_source("method = \"POST\"\nbody = { id = \"{1st}\" }")),
        "sources.p.body",
        "invalid placeholder `{1st}`",
    );
}

#[test]
fn placeholder_in_the_url_host_is_refused() {
    let text = "[sources.p]\nkind = \"http\"\nurl = \"http://{host}/x\"\n";
    assert_invalid(parse(text), "sources.p.url", "host must be literal");
    let text = "[sources.p]\nkind = \"http\"\nurl = \"http://api-{region}.example.com/x\"\n";
    assert_invalid(parse(text), "sources.p.url", "host must be literal");
}

#[test]
fn https_url_is_refused() {
    let text = "[sources.p]\nkind = \"http\"\nurl = \"https://example.com/x\"\n";
    assert_invalid(parse(text), "sources.p.url", "expected an http:// URL");
}

#[test]
fn get_with_a_body_is_refused() {
    assert_invalid(
        parse(&http_source("body = { id = \"{user_id}\" }")),
        "sources.p.body",
        "no body",
    );
    assert_invalid(
        parse(&http_source("method = \"HEAD\"\nbody = { id = 1 }")),
        "sources.p.body",
        "no body",
    );
}

#[test]
fn unsupported_http_method_is_refused() {
    assert_invalid(
        parse(&http_source("method = \"TRACE\"")),
        "sources.p.method",
        "expected GET, HEAD, POST, PUT, PATCH or DELETE",
    );
}

#[test]
fn invalid_header_name_is_refused() {
    assert_invalid(
        parse(&http_source("headers = { \"x bad\" = \"v\" }")),
        "sources.p.headers.x bad",
        "not a valid header name",
    );
}

#[test]
fn invalid_header_value_is_refused() {
    assert_invalid(
        parse(&http_source("headers = { x-trace = \"a\\nb\" }")),
        "sources.p.headers.x-trace",
        "not a valid header value",
    );
    assert_invalid(
        parse(&http_source(
            "headers = { authorization = \"Bearer {token\" }",
        )),
        "sources.p.headers.authorization",
        "unclosed placeholder",
    );
}

#[test]
fn non_http_grpc_endpoint_is_refused() {
    for endpoint in ["https://127.0.0.1:1", "127.0.0.1:1", "unix:/tmp/sock", ""] {
        let text = format!(
            "[sources.p]\nkind = \"grpc\"\nendpoint = \"{endpoint}\"\nmethod = \"demo.v1.Profiles/GetProfile\"\n"
        );
        assert_invalid(parse(&text), "sources.p.endpoint", "http://host:port");
    }
}

#[test]
fn grpc_method_must_be_package_service_slash_method() {
    for method in [
        "GetProfile",
        "Profiles/GetProfile",
        "demo.v1.Profiles/",
        "demo.v1.Profiles.GetProfile",
        "/demo.v1.Profiles/GetProfile/x",
    ] {
        let text = format!(
            "[sources.p]\nkind = \"grpc\"\nendpoint = \"http://127.0.0.1:1\"\nmethod = \"{method}\"\n"
        );
        assert_invalid(parse(&text), "sources.p.method", "package.Service/Method");
    }
}

#[test]
fn toml_datetimes_in_templates_are_refused() {
    assert_invalid(
        parse(&grpc_source("request = { since = 1979-05-27T07:32:00Z }")),
        "sources.p.request",
        "datetime",
    );
    assert_invalid(
        parse(&grpc_source(
            "request = { nested = { days = [1979-05-27] } }",
        )),
        "sources.p.request",
        "datetime",
    );
    assert_invalid(
        parse(&http_source("method = \"POST\"\nbody = { at = 07:32:00 }")),
        "sources.p.body",
        "datetime",
    );
}

#[test]
fn non_finite_floats_in_templates_are_refused() {
    assert_invalid(
        parse(&grpc_source("request = { x = nan }")),
        "sources.p.request",
        "no JSON form",
    );
}

// ---- descriptors given in the config ----

#[test]
fn missing_protos_are_refused() {
    assert_invalid(
        parse(&grpc_source("protos = [\"does/not/exist.proto\"]")),
        "sources.p.protos",
        "exist.proto",
    );
}

#[test]
fn missing_descriptor_set_is_refused() {
    assert_invalid(
        parse(&grpc_source("descriptor_set = \"does/not/exist.bin\"")),
        "sources.p.descriptor_set",
        "exist.bin",
    );
}

#[test]
fn protos_and_descriptor_set_together_are_refused() {
    assert_invalid(
        parse(&grpc_source(
            "protos = [\"a.proto\"]\ndescriptor_set = \"a.bin\"",
        )),
        "sources.p.descriptor_set",
        "not both",
    );
}

#[test]
fn protos_give_the_schema_at_load() {
    let config = parse_with_protos(&grpc_with_protos(
        "demo.v1.Profiles/GetProfile",
        "{ user_id = \"{user_id}\" }",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let SourceKind::Grpc(grpc) = &config.sources[0].kind else {
        panic!("expected a gRPC source");
    };
    assert_eq!(grpc.service, "demo.v1.Profiles");
    assert_eq!(grpc.method, "GetProfile");
    assert_eq!(grpc.path.as_str(), "/demo.v1.Profiles/GetProfile");
    let schema = grpc.schema.as_ref().expect("schema known at load");
    assert_eq!(schema.input.full_name(), "demo.v1.GetProfileRequest");
    assert_eq!(schema.output.full_name(), "demo.v1.Profile");
    let params: Vec<String> = config.sources[0]
        .params()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(params, ["user_id"]);
}

#[test]
fn protos_accept_the_json_name_of_a_field() {
    parse_with_protos(&grpc_with_protos(
        "demo.v1.Profiles/GetProfile",
        "{ userId = \"{user_id}\" }",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn request_field_not_in_the_message_is_refused_at_load() {
    let (error, message) = refused(parse_with_protos(&grpc_with_protos(
        "demo.v1.Profiles/GetProfile",
        "{ nope = \"x\" }",
    )));
    assert!(
        matches!(&error, ConfigError::Invalid { key, .. } if key == "sources.p.method" || key == "sources.p.request"),
        "{error:?}"
    );
    assert!(message.contains("`nope`"), "{message}");
    assert!(message.contains("demo.v1.GetProfileRequest"), "{message}");
}

#[test]
fn method_not_in_the_service_is_refused_at_load() {
    assert_invalid(
        parse_with_protos(&grpc_with_protos(
            "demo.v1.Profiles/DeleteProfile",
            "{ user_id = \"{user_id}\" }",
        )),
        "sources.p.method",
        "no method `DeleteProfile`",
    );
    assert_invalid(
        parse_with_protos(&grpc_with_protos(
            "demo.v1.Accounts/GetProfile",
            "{ user_id = \"{user_id}\" }",
        )),
        "sources.p.method",
        "`demo.v1.Accounts` is not in the descriptors",
    );
}

#[test]
fn protos_resolve_against_the_base_dir() {
    // Relative to "." (not the crate root) the import path does not exist.
    let text = grpc_with_protos("demo.v1.Profiles/GetProfile", "{ user_id = \"{user_id}\" }");
    let base = std::env::temp_dir();
    let (error, _) = refused(Config::parse(&text, ORIGIN, &base));
    assert!(
        matches!(&error, ConfigError::Invalid { key, .. } if key == "sources.p.protos"),
        "{error:?}"
    );
}

// ---- a valid config ----

#[test]
fn example_config_loads_with_defaults() {
    let config =
        parse(include_str!("../../examples/gateway.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 50051)));
    assert_eq!(config.drain_timeout, Duration::from_secs(10));

    let names: Vec<&str> = config.sources.iter().map(|s| &*s.name).collect();
    assert_eq!(names, ["orders", "profile"], "sorted by name");
    for source in &config.sources {
        assert_eq!(source.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);
        assert_eq!(source.max_response_bytes, 4 * 1024 * 1024);
        assert_eq!(source.timeout, Some(Duration::from_millis(500)));
        let params: Vec<String> = source.params().iter().map(|p| p.to_string()).collect();
        assert_eq!(params, ["user_id"], "params of {}", source.name);
    }
    let profile = config
        .sources
        .iter()
        .find(|s| &*s.name == "profile")
        .unwrap();
    let SourceKind::Grpc(grpc) = &profile.kind else {
        panic!("profile is a gRPC source");
    };
    assert_eq!(grpc.endpoint, "http://127.0.0.1:50061");
    assert_eq!(grpc.path.as_str(), "/demo.v1.Profiles/GetProfile");
    assert!(grpc.schema.is_none(), "learned by reflection at first use");
    let orders = config
        .sources
        .iter()
        .find(|s| &*s.name == "orders")
        .unwrap();
    let SourceKind::Http(http) = &orders.kind else {
        panic!("orders is an HTTP source");
    };
    assert_eq!(http.method, Method::GET);
    assert!(http.headers.is_empty());
    assert!(http.body.is_none());

    let aggs: Vec<&str> = config.aggregations.iter().map(|a| &*a.name).collect();
    assert_eq!(aggs, ["user_dashboard", "user_profile"]);
    for agg in &config.aggregations {
        assert_eq!(agg.mode, Mode::FailFast, "{}", agg.name);
        assert_eq!(agg.timeout, Duration::from_secs(2), "{}", agg.name);
        let members: Vec<&str> = agg.members.iter().map(|(s, _)| &*s.name).collect();
        assert_eq!(members, ["profile", "orders"], "configured order");
    }
    let optional =
        |agg: &AggregationSpec| -> Vec<bool> { agg.members.iter().map(|m| m.1).collect() };
    assert_eq!(optional(&config.aggregations[0]), [false, false]);
    assert_eq!(optional(&config.aggregations[1]), [false, true]);
    // Aggregations share the one spec per source.
    assert!(Arc::ptr_eq(
        &config.aggregations[0].members[0].0,
        &config.aggregations[1].members[0].0
    ));
}

#[test]
fn empty_config_takes_every_default() {
    let config = parse("").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 50051)));
    assert_eq!(config.drain_timeout, Duration::from_secs(10));
    assert!(config.sources.is_empty());
    assert!(config.aggregations.is_empty());
}

#[test]
fn aggregation_defaults_and_explicit_values() {
    let text = format!(
        "{HTTP_SOURCE}max_response_bytes = 1024\ntimeout = \"250ms\"\n[aggregations.a]\nsources = [\"p\"]\n[aggregations.b]\nsources = [\"p\"]\noptional = [\"p\"]\nmode = \"best_effort\"\ntimeout = \"1m\"\n"
    );
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.sources[0].max_response_bytes, 1024);
    assert_eq!(config.sources[0].timeout, Some(Duration::from_millis(250)));
    let (a, b) = (&config.aggregations[0], &config.aggregations[1]);
    assert_eq!(
        (a.mode, a.timeout),
        (Mode::FailFast, Duration::from_secs(10))
    );
    assert!(!a.members[0].1);
    assert_eq!(
        (b.mode, b.timeout),
        (Mode::BestEffort, Duration::from_secs(60))
    );
    assert!(b.members[0].1);
}

#[test]
fn params_are_collected_from_url_headers_and_body_once_each() {
    let text = "[sources.p]\nkind = \"http\"\nmethod = \"POST\"\nurl = \"http://h/u/{user_id}?q={q}\"\nheaders = { authorization = \"Bearer {token}\" }\nbody = { id = \"{user_id}\", tags = [\"{tag}\"] }\n";
    let config = parse(text).unwrap_or_else(|e| panic!("{e}"));
    let params: Vec<String> = config.sources[0]
        .params()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(params, ["user_id", "q", "token", "tag"]);
}

#[test]
fn load_names_a_missing_file() {
    let path = Path::new("/nonexistent/gw.toml");
    let error = Config::load(path).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/gw.toml: cannot read"),
        "{error}"
    );
}

#[test]
fn keys_of_the_other_kind_are_refused() {
    assert_invalid(
        parse(&grpc_source("url = \"http://h/x\"")),
        "sources.p.url",
        "not a key of grpc sources",
    );
    assert_invalid(
        parse(&http_source("endpoint = \"http://h:1\"")),
        "sources.p.endpoint",
        "not a key of http sources",
    );
}

#[test]
fn missing_address_is_refused() {
    assert_invalid(
        parse("[sources.p]\nkind = \"http\"\n"),
        "sources.p.url",
        "missing",
    );
    assert_invalid(
        parse("[sources.p]\nkind = \"grpc\"\nmethod = \"demo.v1.Profiles/GetProfile\"\n"),
        "sources.p.endpoint",
        "missing",
    );
    assert_invalid(
        parse("[sources.p]\nkind = \"grpc\"\nendpoint = \"http://h:1\"\n"),
        "sources.p.method",
        "missing",
    );
}

// ---- [defaults], concurrency caps, fallbacks ----

const TWO_SOURCES: &str = "[sources.a]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/a\"\n\
     [sources.b]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/b\"\n";

fn source<'c>(config: &'c Config, name: &str) -> &'c SourceSpec {
    config.sources.iter().find(|s| &*s.name == name).unwrap()
}

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
    assert_eq!(config.max_concurrent_calls, None);
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
        config.max_concurrent_calls,
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
