//! `tls` tables: files read at load, relative to the config's directory,
//! keys checked against their certificates.

use super::*;

/// A directory with `ca.crt`, `a.crt` + `a.key` (signed by the CA) and
/// `b.key` (another key), removed on drop.
struct Files(std::path::PathBuf);

impl Files {
    fn new(tag: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("aggregator-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("a.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("a.key"), key.serialize_pem()).unwrap();
        std::fs::write(
            dir.join("b.key"),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        std::fs::write(dir.join("junk.crt"), "not a certificate").unwrap();
        Self(dir)
    }

    fn parse(&self, text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, ORIGIN, &self.0)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_listener_takes_relative_files_and_an_optional_client_ca() {
    let files = Files::new("listener");
    let config = files
        .parse("[server]\ntls = { cert = \"a.crt\", key = \"a.key\" }\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let tls = config.server.tls.expect("tls");
    assert!(!tls.mutual);
    assert_eq!(tls.config.alpn_protocols, [b"h2".to_vec()]);
    let config = files
        .parse("[server]\ntls = { cert = \"a.crt\", key = \"a.key\", client_ca = \"ca.crt\" }\n")
        .unwrap();
    assert!(config.server.tls.unwrap().mutual);
}

#[test]
fn bad_files_are_refused_naming_the_key() {
    let files = Files::new("bad");
    let (error, message) =
        refused(files.parse("[server]\ntls = { cert = \"nope.crt\", key = \"a.key\" }\n"));
    assert!(
        matches!(error, ConfigError::Invalid { ref key, .. } if key == "server.tls.cert"),
        "{message}"
    );
    assert!(message.contains("nope.crt"), "{message}");
    assert_invalid(
        files.parse("[server]\ntls = { cert = \"junk.crt\", key = \"a.key\" }\n"),
        "server.tls.cert",
        "certificate",
    );
    assert_invalid(
        files.parse("[server]\ntls = { cert = \"a.crt\", key = \"b.key\" }\n"),
        "server.tls.key",
        "does not go with",
    );
    assert_invalid(
        files.parse(
            "[server]\ntls = { cert = \"a.crt\", key = \"a.key\", client_ca = \"junk.crt\" }\n",
        ),
        "server.tls.client_ca",
        "certificate",
    );
}

#[test]
fn upstream_tls_is_for_https_and_needs_a_key_with_its_cert() {
    let files = Files::new("upstream");
    let https = "[sources.p]\nkind = \"http\"\nurl = \"https://localhost:1/x\"\n";
    let config = files
        .parse(&format!("{https}tls = {{ ca = \"ca.crt\", cert = \"a.crt\", key = \"a.key\", server_name = \"svc.internal\" }}\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    let SourceKind::Http(http) = &config.sources[0].kind else {
        panic!("an HTTP source");
    };
    let tls = http.tls.as_ref().expect("tls");
    assert!(tls.ca_pem.is_some() && tls.identity_pem.is_some());
    assert_invalid(
        files.parse(&format!("{https}tls = {{ cert = \"a.crt\" }}\n")),
        "sources.p.tls.key",
        "missing",
    );
    assert_invalid(
        files.parse(&format!(
            "{https}tls = {{ cert = \"a.crt\", key = \"b.key\" }}\n"
        )),
        "sources.p.tls.key",
        "does not go with",
    );
    assert_invalid(
        files.parse(&format!("{HTTP_SOURCE}tls = {{ ca = \"ca.crt\" }}\n")),
        "sources.p.tls",
        "https://",
    );
    // Inherited by a plain http:// source, it is not in the way.
    let config = files
        .parse(
            &format!("[defaults]\ntls = {{ ca = \"ca.crt\" }}\n{HTTP_SOURCE}{https}").replace(
                "[sources.p]\nkind = \"http\"\nurl = \"https",
                "[sources.q]\nkind = \"http\"\nurl = \"https",
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.sources.len(), 2);
    let grpc = "[sources.g]\nkind = \"grpc\"\nendpoint = \"https://localhost:1\"\nmethod = \"demo.v1.Profiles/GetProfile\"\ntls = { ca = \"ca.crt\" }\n";
    let config = files.parse(grpc).unwrap_or_else(|e| panic!("{e}"));
    let SourceKind::Grpc(g) = &config.sources[0].kind else {
        panic!("a gRPC source");
    };
    assert!(g.tls.is_some());
}

#[test]
fn a_renewed_certificate_changes_the_sources_definition() {
    // A reload keeps a source whose definition is the same: a file renewed
    // in place must count as a change, or the old certificate stays.
    let files = Files::new("renewed");
    let text = "[sources.p]\nkind = \"http\"\nurl = \"https://localhost:1/x\"\ntls = { ca = \"ca.crt\" }\n";
    let definition = |files: &Files| files.parse(text).unwrap().sources[0].definition;
    let before = definition(&files);
    assert_eq!(
        definition(&files),
        before,
        "the same files, the same definition"
    );
    std::fs::copy(files.0.join("a.crt"), files.0.join("ca.crt")).unwrap();
    assert_ne!(definition(&files), before);
}
