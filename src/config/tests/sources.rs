//! `[sources.NAME]` of both kinds: templates no request could fill, malformed targets.

use super::*;

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
fn urls_other_than_http_and_https_are_refused() {
    let text = "[sources.p]\nkind = \"http\"\nurl = \"ftp://example.com/x\"\n";
    assert_invalid(
        parse(text),
        "sources.p.url",
        "expected an http:// or https:// URL",
    );
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
    for endpoint in ["ftp://127.0.0.1:1", "127.0.0.1:1", "unix:/tmp/sock", ""] {
        let text = format!(
            "[sources.p]\nkind = \"grpc\"\nendpoint = \"{endpoint}\"\nmethod = \"demo.v1.Profiles/GetProfile\"\n"
        );
        assert_invalid(parse(&text), "sources.p.endpoint", "http(s)://host:port");
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

#[test]
fn forwarded_metadata_is_named_and_checked() {
    let config = parse(&format!(
        "[defaults]\nforward_metadata = [\"Authorization\", \"x-request-id\"]\n{HTTP_SOURCE}"
    ))
    .unwrap();
    let names: Vec<_> = config.sources[0]
        .forward_metadata
        .iter()
        .map(|n| n.as_str())
        .collect();
    assert_eq!(names, ["authorization", "x-request-id"]);
    for reserved in [
        "te",
        "Host",
        ":path",
        "content-type",
        "grpc-timeout",
        "connection",
        "Proxy-Authorization",
    ] {
        assert_invalid(
            parse(&http_source(&format!(
                "forward_metadata = [\"{reserved}\"]"
            ))),
            "sources.p.forward_metadata",
            reserved,
        );
    }
    assert_invalid(
        parse(&http_source("forward_metadata = [\"trace-bin\"]")),
        "sources.p.forward_metadata",
        "-bin",
    );
    assert!(parse(&grpc_source("forward_metadata = [\"trace-bin\"]")).is_ok());
}

#[test]
fn grpc_metadata_templates_read_params_and_metadata() {
    let config = parse(&grpc_source(
        "metadata = { x-tenant = \"{@x-tenant}\", x-user = \"u-{user_id}\" }",
    ))
    .unwrap();
    let SourceKind::Grpc(grpc) = &config.sources[0].kind else {
        panic!("a gRPC source");
    };
    assert_eq!(grpc.metadata.len(), 2);
    assert_eq!(config.sources[0].params().len(), 1);
    assert_invalid(
        parse(&grpc_source("metadata = { x-raw-bin = \"{@x}\" }")),
        "sources.p.metadata.x-raw-bin",
        "-bin",
    );
    assert_invalid(
        parse(&http_source("metadata = { x = \"1\" }")),
        "sources.p.metadata",
        "not a key of http sources",
    );
    assert_invalid(
        parse(&http_source(
            "headers = { authorization = \"Bearer {@X-Token}\" }",
        )),
        "sources.p.headers.authorization",
        "metadata",
    );
}
