//! `tls` tables: the listener's (`[server] tls`) and an upstream's (on a
//! source or in `[defaults]`). Files are read and checked at load (PEM that
//! parses, a key that matches its certificate), relative paths from the
//! config file's directory; rustls (ring) does the rest.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
};
use serde::Deserialize;

use super::{ConfigError, Validator};

/// `[server] tls = { cert, key, client_ca }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenerTlsModel {
    cert: PathBuf,
    key: PathBuf,
    /// Require client certificates signed by this CA (mTLS).
    client_ca: Option<PathBuf>,
}

/// `tls = { ca, cert, key, server_name }` of a source or `[defaults]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamTlsModel {
    /// Trust only this CA (else the system's roots).
    ca: Option<PathBuf>,
    /// A client certificate, for upstreams that require one.
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    /// The name to verify the upstream's certificate against (else its host).
    server_name: Option<String>,
}

/// The gateway's listener's TLS.
#[derive(Clone)]
pub struct ListenerTls {
    pub config: Arc<ServerConfig>,
    /// Whether clients must present a certificate.
    pub mutual: bool,
    /// What it was made from, to tell a changed one on reload.
    pub files: Vec<PathBuf>,
    /// Of the files' contents: a certificate renewed in place is a change.
    pub fingerprint: u64,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("files", &self.files)
            .field("mutual", &self.mutual)
            .finish()
    }
}

/// How to reach an `https://` upstream.
#[derive(Clone)]
pub struct UpstreamTls {
    /// For HTTP sources (the connector adds ALPN http/1.1).
    pub http: Arc<ClientConfig>,
    /// For gRPC sources, handed to tonic (ALPN h2).
    pub ca_pem: Option<Vec<u8>>,
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the certificate must carry, when not the upstream's host.
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("custom_ca", &self.ca_pem.is_some())
            .field("client_cert", &self.identity_pem.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// A certificate chain with its private key, and where they came from.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    files: Vec<PathBuf>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Validator<'_> {
    fn read(&self, key: &str, path: &Path) -> Result<(PathBuf, Vec<u8>), ConfigError> {
        let path = self.base_dir.join(path);
        let bytes =
            std::fs::read(&path).map_err(|e| self.err(key, format!("{}: {e}", path.display())))?;
        // A renewed certificate or key is a changed source on reload.
        self.depends_on(&bytes);
        Ok((path, bytes))
    }

    fn certs(
        &self,
        key: &str,
        path: &Path,
    ) -> Result<(PathBuf, Vec<u8>, Vec<CertificateDer<'static>>), ConfigError> {
        let (path, pem) = self.read(key, path)?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                self.err(
                    key,
                    format!("{}: not PEM certificates: {e}", path.display()),
                )
            })?;
        if certs.is_empty() {
            return Err(self.err(key, format!("{}: no certificate in it", path.display())));
        }
        Ok((path, pem, certs))
    }

    fn private_key(
        &self,
        key: &str,
        path: &Path,
    ) -> Result<(PathBuf, Vec<u8>, PrivateKeyDer<'static>), ConfigError> {
        let (path, pem) = self.read(key, path)?;
        let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            self.err(
                key,
                format!("{}: not a PEM private key: {e}", path.display()),
            )
        })?;
        Ok((path, pem, private))
    }

    /// A certificate chain and its key, checked against each other.
    fn certified(&self, table: &str, cert: &Path, key: &Path) -> Result<Identity, ConfigError> {
        let (cert_path, cert_pem, chain) = self.certs(&format!("{table}.cert"), cert)?;
        let (key_path, key_pem, private) = self.private_key(&format!("{table}.key"), key)?;
        CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider()).map_err(|e| {
            self.err(
                format!("{table}.key"),
                format!(
                    "{}: does not go with {}: {e}",
                    key_path.display(),
                    cert_path.display()
                ),
            )
        })?;
        Ok(Identity {
            chain,
            key: private,
            files: vec![cert_path, key_path],
            cert_pem,
            key_pem,
        })
    }

    fn roots(
        &self,
        key: &str,
        ca: &Path,
    ) -> Result<(PathBuf, Vec<u8>, RootCertStore), ConfigError> {
        let (path, pem, certs) = self.certs(key, ca)?;
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| {
                self.err(
                    key,
                    format!("{}: not a CA certificate: {e}", path.display()),
                )
            })?;
        }
        Ok((path, pem, roots))
    }

    pub(super) fn listener_tls(
        &self,
        model: Option<&ListenerTlsModel>,
    ) -> Result<Option<ListenerTls>, ConfigError> {
        let Some(model) = model else {
            return Ok(None);
        };
        let table = "server.tls";
        let identity = self.certified(table, &model.cert, &model.key)?;
        let mut files = identity.files;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.err(table, e.to_string()))?;
        let builder = match &model.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let key = format!("{table}.client_ca");
                let (path, _, roots) = self.roots(&key, ca)?;
                files.push(path);
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| self.err(&key, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(identity.chain, identity.key)
            .map_err(|e| self.err(format!("{table}.key"), e.to_string()))?;
        // gRPC is HTTP/2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            for file in &files {
                file.hash(&mut hasher);
                std::fs::read(file).unwrap_or_default().hash(&mut hasher);
            }
            hasher.finish()
        };
        Ok(Some(ListenerTls {
            config: Arc::new(config),
            mutual: model.client_ca.is_some(),
            files,
            fingerprint,
        }))
    }

    /// A source's `tls` (its own, else `[defaults]`'s), for an https upstream.
    pub(super) fn upstream_tls(
        &self,
        table: &str,
        model: Option<&UpstreamTlsModel>,
    ) -> Result<UpstreamTls, ConfigError> {
        let default = UpstreamTlsModel {
            ca: None,
            cert: None,
            key: None,
            server_name: None,
        };
        let model = model.unwrap_or(&default);
        let (ca_pem, roots) = match &model.ca {
            Some(ca) => {
                let (_, pem, roots) = self.roots(&format!("{table}.ca"), ca)?;
                (Some(pem), roots)
            }
            None => (None, system_roots()),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.err(table, e.to_string()))?
            .with_root_certificates(roots);
        let (http, identity_pem) = match (&model.cert, &model.key) {
            (Some(cert), Some(key)) => {
                let identity = self.certified(table, cert, key)?;
                let config = builder
                    .with_client_auth_cert(identity.chain, identity.key)
                    .map_err(|e| self.err(format!("{table}.key"), e.to_string()))?;
                (config, Some((identity.cert_pem, identity.key_pem)))
            }
            (None, None) => (builder.with_no_client_auth(), None),
            (Some(_), None) => {
                return Err(self.err(format!("{table}.key"), "missing; `cert` needs its `key`"));
            }
            (None, Some(_)) => {
                return Err(self.err(format!("{table}.cert"), "missing; `key` needs its `cert`"));
            }
        };
        // ALPN is left to the connector (hyper-rustls sets it, http/1.1).
        let server_name = model
            .server_name
            .as_ref()
            .map(|name| {
                rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| self.err(format!("{table}.server_name"), e.to_string()))
            })
            .transpose()?;
        Ok(UpstreamTls {
            http: Arc::new(http),
            ca_pem,
            identity_pem,
            server_name,
        })
    }
}

impl Validator<'_> {
    /// The TLS of a source's `https://` upstream: its own `tls`, else
    /// `[defaults]`'s, else the system's roots. An own `tls` on a plain
    /// `http://` upstream is a mistake worth saying; an inherited one is not.
    pub(super) fn source_tls(
        &self,
        name: &str,
        model: &super::source::SourceModel,
        https: bool,
    ) -> Result<Option<UpstreamTls>, ConfigError> {
        let (table, tls) = match (&model.tls, &self.defaults.tls) {
            (Some(own), _) => (format!("sources.{name}.tls"), Some(own)),
            (None, inherited) => ("defaults.tls".to_owned(), inherited.as_ref()),
        };
        if !https {
            if model.tls.is_some() {
                return Err(self.err(table, "only applies to https:// upstreams"));
            }
            return Ok(None);
        }
        self.upstream_tls(&table, tls).map(Some)
    }
}

/// The system's trusted roots; none (every https upstream then needs `ca`)
/// where the system has none.
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    roots
}
