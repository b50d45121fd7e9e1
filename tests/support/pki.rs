//! Throwaway certificates (rcgen), made at test time.

use std::sync::Arc;

use super::TempDir;

/// A throwaway PKI written to a directory: a CA, a server certificate for
/// `localhost`, `127.0.0.1` and `upstream.test`, a client certificate, and a
/// second CA that signed nothing of these.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let dir = TempDir::new();
        let write = |name: &str, text: String| std::fs::write(dir.0.join(name), text).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "aggregator test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        write("ca.crt", ca_cert.pem());
        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        other
            .distinguished_name
            .push(rcgen::DnType::CommonName, "some other CA");
        write("other-ca.crt", other.self_signed(&other_key).unwrap().pem());
        let server_key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "upstream.test".to_owned()])
                .unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
        write("server.crt", server_cert.pem());
        write("server.key", server_key.serialize_pem());
        let client_key = KeyPair::generate().unwrap();
        let client = CertificateParams::new(vec!["client".to_owned()]).unwrap();
        let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key).unwrap();
        write("client.crt", client_cert.pem());
        write("client.key", client_key.serialize_pem());
        Self { dir }
    }

    /// A file's absolute path, for configs.
    pub fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.0.join(name)).unwrap()
    }

    /// A server config with the server certificate, offering `alpn`; with a
    /// client CA when clients must present a certificate.
    pub fn server_config(&self, alpn: &[&str], require_client: bool) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&self.read("server.crt"))
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&self.read("server.key")).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(&self.read("ca.crt")) {
                roots.add(ca.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(certs, key).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}
