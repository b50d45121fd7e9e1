//! The whole file: unknown keys and wrong types, a valid config, loading.

use super::*;

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

#[test]
fn example_config_loads_with_defaults() {
    let config =
        parse(include_str!("../../../examples/gateway.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.server.listen,
        SocketAddr::from(([127, 0, 0, 1], 50051))
    );
    assert_eq!(config.server.drain_timeout, Duration::from_secs(10));

    let names: Vec<&str> = config.sources.iter().map(|s| &*s.name).collect();
    assert_eq!(
        names,
        [
            "hook_audit",
            "hook_chat",
            "hook_mail",
            "hook_ops",
            "hook_pager",
            "orders",
            "profile"
        ],
        "sorted by name"
    );
    for source in config
        .sources
        .iter()
        .filter(|s| !s.name.starts_with("hook_"))
    {
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
    assert_eq!(aggs, ["publish_alert", "user_dashboard", "user_profile"]);
    let publish = &config.aggregations[0];
    assert_eq!((publish.mode, publish.min_success), (Mode::BestEffort, 3));
    for hook in config
        .sources
        .iter()
        .filter(|s| s.name.starts_with("hook_"))
    {
        assert!(hook.retry.is_none() && hook.hedge.is_none() && !hook.coalesce);
        assert!(hook.breaker.is_some(), "{}", hook.name);
    }
    for agg in &config.aggregations[1..] {
        assert_eq!(agg.mode, Mode::FailFast, "{}", agg.name);
        assert_eq!(agg.timeout, Duration::from_secs(2), "{}", agg.name);
        let members: Vec<&str> = agg.members.iter().map(|(s, _)| &*s.name).collect();
        assert_eq!(members, ["profile", "orders"], "configured order");
    }
    let optional =
        |agg: &AggregationSpec| -> Vec<bool> { agg.members.iter().map(|m| m.1).collect() };
    assert_eq!(optional(&config.aggregations[1]), [false, false]);
    assert_eq!(optional(&config.aggregations[2]), [false, true]);
    // Aggregations share the one spec per source.
    assert!(Arc::ptr_eq(
        &config.aggregations[1].members[0].0,
        &config.aggregations[2].members[0].0
    ));
}

#[test]
fn empty_config_takes_every_default() {
    let config = parse("").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.server.listen,
        SocketAddr::from(([127, 0, 0, 1], 50051))
    );
    assert_eq!(config.server.drain_timeout, Duration::from_secs(10));
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

#[test]
fn server_limits_have_defaults_and_refuse_zero() {
    let server = parse("").unwrap().server;
    assert_eq!(server.max_connections, 10_000);
    assert_eq!(server.handshake_timeout, Duration::from_secs(10));
    assert_eq!(server.idle_timeout, Duration::from_secs(300));
    assert_eq!(server.max_request_bytes, 4 << 20);
    assert_eq!(server.send_timeout, Duration::from_secs(5));
    for key in [
        "max_connections = 0",
        "idle_timeout = \"0s\"",
        "send_timeout = \"0s\"",
        "max_request_bytes = 0",
        "max_reset_burst = 0",
    ] {
        let field = key.split(' ').next().unwrap();
        assert_invalid(
            parse(&format!("[server]\n{key}\n")),
            &format!("server.{field}"),
            "greater than zero",
        );
    }
}

#[test]
fn http_pools_take_defaults_and_grpc_sources_refuse_them() {
    let config = parse(HTTP_SOURCE).unwrap();
    let SourceKind::Http(http) = &config.sources[0].kind else {
        panic!("an HTTP source");
    };
    assert_eq!(http.pool.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(http.pool.max_idle, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(http.pool.idle_timeout, DEFAULT_POOL_IDLE_TIMEOUT);
    let text = format!("[defaults]\nmax_connections = 8\n{HTTP_SOURCE}pool_max_idle = 2\n");
    let config = parse(&text).unwrap();
    let SourceKind::Http(http) = &config.sources[0].kind else {
        panic!("an HTTP source");
    };
    assert_eq!((http.pool.max_connections, http.pool.max_idle), (8, 2));
    assert_invalid(
        parse(&format!(
            "{HTTP_SOURCE}max_connections = 2\npool_max_idle = 3\n"
        )),
        "sources.p.pool_max_idle",
        "must not exceed",
    );
    assert_invalid(
        parse(&grpc_source("max_connections = 2")),
        "sources.p.max_connections",
        "not a key of grpc sources",
    );
}
