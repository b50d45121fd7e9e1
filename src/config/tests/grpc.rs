//! Descriptors given in the config for gRPC sources.

use super::*;

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
