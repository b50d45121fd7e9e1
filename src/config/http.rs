//! `kind = "http"` sources: method, URL, header and body templates.

use std::time::Duration;

use http::{HeaderName, Method};

use super::{ConfigError, Validator, source::SourceModel, tls::UpstreamTls};
use crate::template::{JsonTemplate, StrTemplate, TemplateError, UrlTemplate};

/// Default cap on one HTTP source's open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default time an idle connection is kept (Go's `IdleConnTimeout`).
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug)]
pub struct HttpSpec {
    pub method: Method,
    pub url: UrlTemplate,
    pub headers: Vec<(HeaderName, StrTemplate)>,
    pub body: Option<JsonTemplate>,
    /// Set for an `https://` URL.
    pub tls: Option<UpstreamTls>,
    pub pool: PoolSpec,
}

/// One HTTP source's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec {
    /// Sockets open at once; calls beyond wait for one within their deadline.
    pub max_connections: usize,
    /// Idle sockets kept for reuse.
    pub max_idle: usize,
    /// How long an idle socket is kept.
    pub idle_timeout: Duration,
    /// HTTP/2: with prior knowledge over plain TCP (h2c), by ALPN over TLS
    /// (h2, else HTTP/1.1). Requests then share connections.
    pub http2: bool,
}

impl Validator<'_> {
    /// The HTTP part of `[sources.NAME]`.
    pub(super) fn http(&self, name: &str, model: &SourceModel) -> Result<HttpSpec, ConfigError> {
        let key = |field: &str| format!("sources.{name}.{field}");
        let template_err = |field: &str, e: TemplateError| self.err(key(field), e.to_string());
        let url = self.required(name, &model.url, "url", "an http(s):// URL template")?;
        let url = UrlTemplate::parse(url).map_err(|e| template_err("url", e))?;
        let tls = self.source_tls(name, model, url.is_https())?;
        let method = match model.method.as_deref().unwrap_or("GET") {
            m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE") => {
                Method::from_bytes(m.as_bytes()).expect("standard method")
            }
            other => {
                return Err(self.err(
                    key("method"),
                    format!("`{other}`: expected GET, HEAD, POST, PUT, PATCH or DELETE"),
                ));
            }
        };
        let headers = self.header_templates(&key("headers"), model.headers.as_ref(), false)?;
        let body = model
            .body
            .as_ref()
            .map(|b| {
                if method == Method::GET || method == Method::HEAD {
                    return Err(self.err(key("body"), "GET and HEAD requests have no body"));
                }
                self.whole_or_table(&key("body"), b)
            })
            .transpose()?;
        Ok(HttpSpec {
            method,
            url,
            headers,
            body,
            tls,
            pool: self.pool(name, model)?,
        })
    }

    fn pool(&self, name: &str, model: &SourceModel) -> Result<PoolSpec, ConfigError> {
        let d = self.defaults;
        let max_connections = model
            .max_connections
            .or(d.max_connections)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(self.err(
                format!("sources.{name}.max_connections"),
                "must be at least 1",
            ));
        }
        self.count(format!("sources.{name}.max_connections"), max_connections)?;
        let max_idle = model
            .pool_max_idle
            .or(d.pool_max_idle)
            .unwrap_or(max_connections);
        if max_idle > max_connections {
            return Err(self.err(
                format!("sources.{name}.pool_max_idle"),
                format!("must not exceed max_connections ({max_connections})"),
            ));
        }
        let idle_timeout = model
            .pool_idle_timeout
            .or(d.pool_idle_timeout)
            .unwrap_or(DEFAULT_POOL_IDLE_TIMEOUT);
        Ok(PoolSpec {
            max_connections,
            max_idle,
            idle_timeout,
            http2: model.http2.unwrap_or(false),
        })
    }
}
