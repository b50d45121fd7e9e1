//! `kind = "grpc"` sources: endpoint, method, the request template and the
//! descriptors that give the method's schema at load.

use std::path::{Path, PathBuf};

use http::{HeaderName, Uri, uri::PathAndQuery};

use super::{ConfigError, Validator, source::SourceModel, tls::UpstreamTls};
use crate::{
    template::{JsonTemplate, StrTemplate},
    upstream::schema::{self, MethodSchema},
};

#[derive(Debug)]
pub struct GrpcSpec {
    pub endpoint: Uri,
    /// Fully qualified service name, e.g. `demo.v1.Profiles`.
    pub service: String,
    pub method: String,
    /// `/service/method`, the HTTP/2 path of the call.
    pub path: PathAndQuery,
    pub request: JsonTemplate,
    /// `metadata = { ... }`: metadata sent with every request.
    pub metadata: Vec<(HeaderName, StrTemplate)>,
    /// Set for an `https://` endpoint.
    pub tls: Option<UpstreamTls>,
    /// Known at load when `protos` or `descriptor_set` is given; else learned
    /// from the upstream's reflection on first use.
    pub schema: Option<MethodSchema>,
    /// HTTP/2 connections the source's calls are spread over.
    pub connections: usize,
}

/// A gRPC source's connections when `connections` is not set.
pub const DEFAULT_CONNECTIONS: usize = 2;
/// The most a source may open: each is a task and its buffers.
pub const MAX_CONNECTIONS: usize = 64;

impl Validator<'_> {
    /// The gRPC part of `[sources.NAME]`.
    pub(super) fn grpc(&self, name: &str, model: &SourceModel) -> Result<GrpcSpec, ConfigError> {
        let key = |field: &str| format!("sources.{name}.{field}");
        let endpoint: Uri = self
            .required(
                name,
                &model.endpoint,
                "endpoint",
                "an http(s)://host:port URL",
            )?
            .parse()
            .ok()
            .filter(|u: &Uri| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            })
            .ok_or_else(|| self.err(key("endpoint"), "expected an http(s)://host:port URL"))?;
        let https = endpoint.scheme_str() == Some("https");
        let tls = self.source_tls(name, model, https)?;
        let method = self.required(name, &model.method, "method", "`package.Service/Method`")?;
        let (service, method) = method
            .split_once('/')
            .filter(|(s, m)| s.contains('.') && !m.is_empty() && !m.contains('/'))
            .ok_or_else(|| self.err(key("method"), "expected `package.Service/Method`"))?;
        let path = PathAndQuery::try_from(format!("/{service}/{method}"))
            .map_err(|e| self.err(key("method"), e.to_string()))?;
        let empty = toml::Value::Table(Default::default());
        let request =
            self.whole_or_table(&key("request"), model.request.as_ref().unwrap_or(&empty))?;
        let schema = self
            .schema(
                model.protos.as_deref().unwrap_or_default(),
                model.import_paths.as_deref().unwrap_or_default(),
                model.descriptor_set.as_deref(),
            )
            .map_err(|(field, m)| self.err(key(field), m))?
            .map(|pool| {
                let s = schema::method_schema(&pool, service, method)?;
                schema::check_template(&request, &s.input)?;
                Ok(s)
            })
            .transpose()
            .map_err(|m: String| self.err(key("method"), m))?;
        let metadata = self.header_templates(&key("metadata"), model.metadata.as_ref(), true)?;
        let connections = model.connections.unwrap_or(DEFAULT_CONNECTIONS);
        if !(1..=MAX_CONNECTIONS).contains(&connections) {
            return Err(self.err(
                key("connections"),
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        Ok(GrpcSpec {
            endpoint,
            service: service.to_owned(),
            method: method.to_owned(),
            path,
            request,
            metadata,
            tls,
            schema,
            connections,
        })
    }

    /// Loads descriptors named in the config, if any: (field, message) on error.
    fn schema(
        &self,
        protos: &[PathBuf],
        import_paths: &[PathBuf],
        descriptor_set: Option<&Path>,
    ) -> Result<Option<prost_reflect::DescriptorPool>, (&'static str, String)> {
        let resolve = |p: &Path| self.base_dir.join(p);
        match (protos.is_empty(), descriptor_set) {
            (true, None) => Ok(None),
            (false, Some(_)) => Err((
                "descriptor_set",
                "give either `protos` or `descriptor_set`, not both".into(),
            )),
            (true, Some(path)) => {
                let path = resolve(path);
                let bytes = std::fs::read(&path)
                    .map_err(|e| ("descriptor_set", format!("{}: {e}", path.display())))?;
                self.depends_on(&bytes);
                prost_reflect::DescriptorPool::decode(bytes.as_slice())
                    .map(Some)
                    .map_err(|e| ("descriptor_set", format!("{}: {e}", path.display())))
            }
            (false, None) => {
                let mut includes: Vec<PathBuf> = import_paths.iter().map(|p| resolve(p)).collect();
                if includes.is_empty() {
                    includes.push(self.base_dir.to_path_buf());
                }
                // A proto is named relative to the config file or to an import path.
                let protos: Vec<PathBuf> = protos
                    .iter()
                    .map(|p| Some(resolve(p)).filter(|r| r.exists()).unwrap_or(p.clone()))
                    .collect();
                let fds =
                    protox::compile(&protos, &includes).map_err(|e| ("protos", e.to_string()))?;
                self.depends_on(&prost::Message::encode_to_vec(&fds));
                prost_reflect::DescriptorPool::from_file_descriptor_set(fds)
                    .map(Some)
                    .map_err(|e| ("protos", e.to_string()))
            }
        }
    }
}
