use std::{net::SocketAddr, path::Path, time::Duration};

use ::http::Method;

use super::*;

mod aggregations;
mod defaults;
mod file;
mod grpc;
mod resilience;
mod sources;
mod tls;

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

/// Two valid HTTP sources, `a` and `b`.
const TWO_SOURCES: &str = "[sources.a]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/a\"\n\
     [sources.b]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/b\"\n";

/// The source named `name`.
fn source<'c>(config: &'c Config, name: &str) -> &'c SourceSpec {
    config.sources.iter().find(|s| &*s.name == name).unwrap()
}
