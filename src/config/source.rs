//! `[sources.NAME]`: the keys common to every source, and the runtime spec.
//! The kinds have their own files, [`super::grpc`] and [`super::http`].

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use http::HeaderName;

use serde::Deserialize;

use super::compose::ForEach;
use super::{
    ConfigError, Validator,
    defaults::Limit,
    grpc::GrpcSpec,
    http::HttpSpec,
    resilience::{
        BreakerModel, BreakerSpec, HealthCheckModel, HealthCheckSpec, HedgeModel, HedgeSpec,
        RetryModel, RetrySpec,
    },
    toml_to_json,
};
use crate::{
    template::{JsonTemplate, Ref, Root},
    transform::Filter,
};

/// Default cap on an upstream response body.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// One `[sources.NAME]` table. Flat rather than an enum tagged by `kind`:
/// serde buffers tagged enums, and toml then loses the key and line of an
/// error inside the table. Keys of the other kind are refused in validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SourceModel {
    pub(super) kind: SourceKindModel,
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
    pub(super) max_response_bytes: Option<usize>,
    pub(super) max_concurrent: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) queue_timeout: Option<Duration>,
    pub(super) fallback: Option<toml::Value>,
    pub(super) retry: Option<RetryModel>,
    pub(super) idempotent: Option<bool>,
    pub(super) coalesce: Option<bool>,
    pub(super) breaker: Option<BreakerModel>,
    pub(super) health_check: Option<HealthCheckModel>,
    pub(super) hedge: Option<HedgeModel>,
    /// gRPC: `package.Service/Method`; HTTP: the request method.
    pub(super) method: Option<String>,
    // gRPC only
    pub(super) endpoint: Option<String>,
    /// A table, or a string that is exactly one reference (`"{$payload}"`).
    pub(super) request: Option<toml::Value>,
    pub(super) protos: Option<Vec<PathBuf>>,
    pub(super) import_paths: Option<Vec<PathBuf>>,
    pub(super) descriptor_set: Option<PathBuf>,
    // HTTP only
    pub(super) url: Option<String>,
    pub(super) headers: Option<BTreeMap<String, String>>,
    pub(super) body: Option<toml::Value>,
    pub(super) forward_metadata: Option<Vec<String>>,
    pub(super) tls: Option<super::tls::UpstreamTlsModel>,
    // gRPC only
    pub(super) metadata: Option<BTreeMap<String, String>>,
    pub(super) connections: Option<usize>,
    // HTTP only
    pub(super) max_connections: Option<usize>,
    pub(super) pool_max_idle: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) pool_idle_timeout: Option<std::time::Duration>,
    pub(super) http2: Option<bool>,
    // Composition
    pub(super) for_each: Option<String>,
    pub(super) max_parallel: Option<usize>,
    pub(super) max_items: Option<usize>,
    pub(super) transform: Option<String>,
    pub(super) cache: Option<super::store::CacheModel>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum SourceKindModel {
    Grpc,
    Http,
}

impl SourceModel {
    /// The first key set that belongs to the other kind of source.
    fn foreign_key(&self) -> Option<&'static str> {
        let set = |present: bool, key: &'static str| present.then_some(key);
        match self.kind {
            SourceKindModel::Grpc => set(self.url.is_some(), "url")
                .or(set(self.headers.is_some(), "headers"))
                .or(set(self.body.is_some(), "body"))
                // One HTTP/2 connection carries every call to a gRPC upstream.
                .or(set(self.max_connections.is_some(), "max_connections"))
                .or(set(self.pool_max_idle.is_some(), "pool_max_idle"))
                .or(set(self.pool_idle_timeout.is_some(), "pool_idle_timeout"))
                // gRPC is HTTP/2 already.
                .or(set(self.http2.is_some(), "http2")),
            SourceKindModel::Http => set(self.endpoint.is_some(), "endpoint")
                .or(set(self.metadata.is_some(), "metadata"))
                // An HTTP source's pool is `max_connections`.
                .or(set(self.connections.is_some(), "connections"))
                .or(set(self.request.is_some(), "request"))
                .or(set(self.protos.is_some(), "protos"))
                .or(set(self.import_paths.is_some(), "import_paths"))
                .or(set(self.descriptor_set.is_some(), "descriptor_set")),
        }
    }
}

#[derive(Debug)]
pub struct SourceSpec {
    pub name: Arc<str>,
    /// The source's own bound on one call, if shorter than the call's deadline.
    pub timeout: Option<Duration>,
    /// Largest response body accepted from the upstream.
    pub max_response_bytes: usize,
    /// Cap on this source's concurrent upstream requests.
    pub max_concurrent: Option<Limit>,
    /// Served in place of the data when the source fails and the call goes on.
    pub fallback: Option<serde_json::Value>,
    /// Retries; only ever set on a source that is safe to repeat.
    pub retry: Option<RetrySpec>,
    /// Whether identical concurrent calls share one upstream request.
    pub coalesce: bool,
    /// Set whenever `health_check` is (the checks feed it).
    pub breaker: Option<BreakerSpec>,
    pub health_check: Option<HealthCheckSpec>,
    /// Hedged requests; only ever set on a source that is safe to repeat.
    pub hedge: Option<HedgeSpec>,
    /// Caller metadata copied into every request (lower-case names).
    pub forward_metadata: Vec<HeaderName>,
    /// One request per element of a list.
    pub for_each: Option<ForEach>,
    /// Reshapes the result before anything else sees it.
    pub transform: Option<Filter>,
    /// Its successes are kept and served again.
    pub cache: Option<super::store::CacheSpec>,
    pub kind: SourceKind,
    /// Equal for two loads of the same definition (its table, `[defaults]`,
    /// the files it reads): a reload keeps such a source as it is.
    pub definition: u64,
}

#[derive(Debug)]
pub enum SourceKind {
    Grpc(GrpcSpec),
    Http(HttpSpec),
}

impl SourceSpec {
    /// The placeholder names this source's requests need, deduplicated.
    pub fn params(&self) -> Vec<Arc<str>> {
        let all: Vec<&Arc<str>> = match &self.kind {
            SourceKind::Grpc(g) => g
                .request
                .params()
                .chain(g.metadata.iter().flat_map(|(_, t)| t.params()))
                .collect(),
            SourceKind::Http(h) => h
                .url
                .params()
                .chain(h.headers.iter().flat_map(|(_, t)| t.params()))
                .chain(h.body.iter().flat_map(JsonTemplate::params))
                .collect(),
        };
        let mut out: Vec<Arc<str>> = Vec::new();
        for p in all {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        out
    }

    /// Every reference its requests make, its `for_each` list included.
    pub fn refs(&self) -> Vec<&Ref> {
        let mut all: Vec<&Ref> = match &self.kind {
            SourceKind::Grpc(g) => g
                .request
                .refs()
                .chain(g.metadata.iter().flat_map(|(_, t)| t.refs()))
                .collect(),
            SourceKind::Http(h) => h
                .url
                .refs()
                .chain(h.headers.iter().flat_map(|(_, t)| t.refs()))
                .chain(h.body.iter().flat_map(JsonTemplate::refs))
                .collect(),
        };
        all.extend(self.for_each.as_ref().map(|f| &f.list));
        all
    }

    /// Whether it reads other sources' results, so runs after them.
    pub fn reads_sources(&self) -> bool {
        self.refs().iter().any(|r| r.source().is_some())
    }
}

impl Validator<'_> {
    pub(super) fn source(
        &self,
        name: String,
        model: SourceModel,
    ) -> Result<SourceSpec, ConfigError> {
        self.name("sources", &name)?;
        *self.fingerprint.borrow_mut() = Default::default();
        let table = |t: &str| self.raw.get(t).map(|v| v.to_string()).unwrap_or_default();
        let own = self
            .raw
            .get("sources")
            .and_then(|s| s.get(&name))
            .map(|v| v.to_string())
            .unwrap_or_default();
        self.depends_on(own.as_bytes());
        self.depends_on(table("defaults").as_bytes());
        self.depends_on(self.base_dir.as_os_str().as_encoded_bytes());
        let key = |field: &str| format!("sources.{name}.{field}");
        if let Some(foreign) = model.foreign_key() {
            let kind = match model.kind {
                SourceKindModel::Grpc => "grpc",
                SourceKindModel::Http => "http",
            };
            return Err(self.err(key(foreign), format!("not a key of {kind} sources")));
        }
        let d = self.defaults;
        let timeout = model.timeout.or(d.timeout);
        let max_response_bytes = model.max_response_bytes.or(d.max_response_bytes);
        let max_concurrent = self.limit(
            &format!("sources.{name}"),
            model.max_concurrent.or(d.max_concurrent),
            model.queue_timeout.or(d.queue_timeout),
        )?;
        let retry = self.retry(&name, &model)?;
        let health_check = self.health_check(&name, &model)?;
        let hedge = self.hedge(&name, &model)?;
        let breaker = self.breaker(&name, &model)?;
        // On by default for reads (gRPC methods not marked `idempotent =
        // false`, HTTP GET and HEAD); other sources only by their own say.
        let read = match model.kind {
            SourceKindModel::Grpc => model.idempotent.unwrap_or(true),
            SourceKindModel::Http => matches!(model.method.as_deref(), None | Some("GET" | "HEAD")),
        };
        let coalesce = match model.coalesce {
            Some(own) => own,
            None => self.defaults.coalesce.unwrap_or(true) && read,
        };
        let forward_metadata =
            self.forward_metadata(&name, &model, model.kind == SourceKindModel::Http)?;
        let fallback = model
            .fallback
            .as_ref()
            .map(toml_to_json)
            .transpose()
            .map_err(|m| self.err(key("fallback"), m))?;
        let (for_each, transform) = self.compose(&name, &model)?;
        let cache = self.cache(&name, model.cache.as_ref())?;
        let kind = match model.kind {
            SourceKindModel::Grpc => SourceKind::Grpc(self.grpc(&name, &model)?),
            SourceKindModel::Http => SourceKind::Http(self.http(&name, &model)?),
        };
        if timeout == Some(Duration::ZERO) {
            return Err(self.err(key("timeout"), "must be greater than zero"));
        }
        if max_response_bytes == Some(0) {
            return Err(self.err(key("max_response_bytes"), "must be greater than zero"));
        }
        Ok(SourceSpec {
            name: name.into(),
            timeout,
            max_response_bytes: max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
            max_concurrent,
            fallback,
            retry,
            coalesce,
            breaker,
            health_check,
            hedge,
            forward_metadata,
            for_each,
            transform,
            cache,
            kind,
            definition: std::hash::Hasher::finish(&*self.fingerprint.borrow()),
        })
        .and_then(|spec| {
            let item = spec.refs().into_iter().find(|r| r.root == Root::Item);
            match item {
                Some(r) if spec.for_each.is_none() => Err(self.err(
                    format!("sources.{}", spec.name),
                    format!("`{}` reads the item of a list: set `for_each`", r.display),
                )),
                _ => Ok(spec),
            }
        })
    }

    /// A `body` or `request`: a table, or a string that is exactly one
    /// reference, such as `"{$payload}"`, to send that value whole.
    pub(super) fn whole_or_table(
        &self,
        key: &str,
        value: &toml::Value,
    ) -> Result<JsonTemplate, ConfigError> {
        if let toml::Value::String(text) = value {
            let template = crate::template::StrTemplate::parse(text)
                .map_err(|e| self.err(key, e.to_string()))?;
            if template.single_ref().is_none() {
                return Err(self.err(
                    key,
                    "expected a table, or a string that is exactly one reference such as \"{$payload}\"",
                ));
            }
        }
        let json = super::toml_to_json(value).map_err(|m| self.err(key, m))?;
        JsonTemplate::compile(&json).map_err(|e| self.err(key, e.to_string()))
    }

    /// A key a source of its kind must have.
    pub(super) fn required<'m>(
        &self,
        name: &str,
        value: &'m Option<String>,
        field: &str,
        expected: &str,
    ) -> Result<&'m str, ConfigError> {
        value.as_deref().ok_or_else(|| {
            self.err(
                format!("sources.{name}.{field}"),
                format!("missing; expected {expected}"),
            )
        })
    }
}
