use super::*;

fn params(pairs: &[(&str, &str)]) -> Params {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn parses_placeholders_and_escaped_braces() {
    let t = StrTemplate::parse("a{x}b{{c}}{y_1.z}").unwrap();
    let names: Vec<_> = t.params().map(|p| p.to_string()).collect();
    assert_eq!(names, ["x", "y_1.z"]);
    let out = t.render(&params(&[("x", "1"), ("y_1.z", "2")])).unwrap();
    assert_eq!(out, "a1b{c}2");
}

#[test]
fn rejects_templates_no_request_could_fill() {
    assert!(matches!(
        StrTemplate::parse("{user"),
        Err(TemplateError::Unclosed(_))
    ));
    assert!(matches!(
        StrTemplate::parse("a}"),
        Err(TemplateError::Unmatched(_))
    ));
    assert!(matches!(
        StrTemplate::parse("{}"),
        Err(TemplateError::BadName(_))
    ));
    assert!(matches!(
        StrTemplate::parse("{user id}"),
        Err(TemplateError::BadName(_))
    ));
    assert!(matches!(
        StrTemplate::parse("{1abc}"),
        Err(TemplateError::BadName(_))
    ));
}

#[test]
fn path_values_stay_inside_their_segment() {
    let t = UrlTemplate::parse("http://h:1/users/{id}/orders?q={q}&k=v").unwrap();
    let out = t
        .render(&params(&[("id", "../../admin?x=1"), ("q", "a b&c=d#e")]))
        .unwrap();
    assert_eq!(
        out,
        "http://h:1/users/..%2F..%2Fadmin%3Fx%3D1/orders?q=a%20b%26c%3Dd%23e&k=v"
    );
    for (value, encoded) in [("..", "%2E%2E"), (".", "%2E"), ("é/", "%C3%A9%2F")] {
        let out = t.render(&params(&[("id", value), ("q", "")])).unwrap();
        assert_eq!(out, format!("http://h:1/users/{encoded}/orders?q=&k=v"));
    }
    let err = t.render(&params(&[("id", ""), ("q", "")])).unwrap_err();
    assert!(matches!(err, RenderError::Invalid { .. }), "{err}");
}

#[test]
fn url_host_must_be_literal() {
    assert!(UrlTemplate::parse("http://{host}/x").is_err());
    assert!(UrlTemplate::parse("ftp://h/x").is_err());
    assert!(UrlTemplate::parse("https://{host}/x").is_err());
    assert!(UrlTemplate::parse("https://h/x").unwrap().is_https());
    assert!(UrlTemplate::parse("http://h/x#frag").is_err());
    assert!(UrlTemplate::parse("http://h/a b").is_err());
    assert_eq!(
        UrlTemplate::parse("http://h:80")
            .unwrap()
            .render(&Params::new())
            .unwrap(),
        "http://h:80/"
    );
}

#[test]
fn json_values_become_strings_never_raw_json() {
    let source = serde_json::json!({
        "id": "{id}",
        "nested": {"list": ["x-{id}", 3, true]},
        "fixed": {"a": 1}
    });
    let t = JsonTemplate::compile(&source).unwrap();
    let out = t
        .render(&params(&[("id", "\", \"admin\": true, \"x\": \"")]))
        .unwrap();
    assert_eq!(out["id"], "\", \"admin\": true, \"x\": \"");
    assert_eq!(out["nested"]["list"][2], true);
    assert_eq!(out["fixed"], serde_json::json!({"a": 1}));
    assert!(out.get("admin").is_none());
    let missing = t.render(&Params::new()).unwrap_err();
    assert_eq!(missing, RenderError::Missing("id".into()));
}

#[test]
fn header_values_refuse_control_characters() {
    let t = StrTemplate::parse("Bearer {token}").unwrap();
    assert_eq!(
        render_header(&t, &Inputs::params(&params(&[("token", "abc")]))).unwrap(),
        "Bearer abc"
    );
    assert!(
        render_header(
            &t,
            &Inputs::params(&params(&[("token", "a\r\nX-Admin: 1")]))
        )
        .is_err()
    );
}

#[test]
fn metadata_placeholders_read_the_callers_metadata() {
    let t = StrTemplate::parse("Bearer {@x-token} for {user}").unwrap();
    let names: Vec<_> = t.metadata().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-token"]);
    assert_eq!(t.params().count(), 1);
    let mut metadata = http::HeaderMap::new();
    metadata.insert("x-token", http::HeaderValue::from_static("s3cret"));
    let p = params(&[("user", "ada")]);
    let out = render_header(&t, &Inputs::new(&p, &metadata)).unwrap();
    assert_eq!(out, "Bearer s3cret for ada");
    let missing = render_header(&t, &Inputs::params(&p)).unwrap_err();
    assert_eq!(missing.to_string(), "missing metadata 'x-token'");
    assert!(missing.is_metadata());
    // In a URL path, escaped like any value.
    let url = UrlTemplate::parse("http://h:1/t/{@x-tenant}").unwrap();
    metadata.insert("x-tenant", http::HeaderValue::from_static("a/b"));
    assert_eq!(
        url.render_with(&Inputs::new(&p, &metadata)).unwrap(),
        "http://h:1/t/a%2Fb"
    );
}

#[test]
fn metadata_placeholders_must_name_text_metadata() {
    for bad in ["{@X-Token}", "{@trace-bin}", "{@}", "{@a b}"] {
        assert!(
            matches!(StrTemplate::parse(bad), Err(TemplateError::BadMetadata(_))),
            "{bad}"
        );
    }
}
