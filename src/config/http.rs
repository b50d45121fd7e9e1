//! `kind = "http"` sources: method, URL, header and body templates.

use http::{HeaderName, Method};

use super::{ConfigError, Validator, source::SourceModel, toml_to_json};
use crate::template::{JsonTemplate, StrTemplate, TemplateError, UrlTemplate};

#[derive(Debug)]
pub struct HttpSpec {
    pub method: Method,
    pub url: UrlTemplate,
    pub headers: Vec<(HeaderName, StrTemplate)>,
    pub body: Option<JsonTemplate>,
}

impl Validator<'_> {
    /// The HTTP part of `[sources.NAME]`.
    pub(super) fn http(&self, name: &str, model: &SourceModel) -> Result<HttpSpec, ConfigError> {
        let key = |field: &str| format!("sources.{name}.{field}");
        let template_err = |field: &str, e: TemplateError| self.err(key(field), e.to_string());
        let url = self.required(name, &model.url, "url", "an http:// URL template")?;
        let url = UrlTemplate::parse(url).map_err(|e| template_err("url", e))?;
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
        let headers = model
            .headers
            .iter()
            .flatten()
            .map(|(k, v)| {
                let hkey = key(&format!("headers.{k}"));
                let name = HeaderName::try_from(k.as_str())
                    .map_err(|_| self.err(&hkey, "not a valid header name"))?;
                let value = StrTemplate::parse(v).map_err(|e| self.err(&hkey, e.to_string()))?;
                // Literal text must already be a valid header value.
                let probe = value.params().map(|p| (p.to_string(), String::new()));
                crate::template::render_header(&value, &probe.collect())
                    .map_err(|_| self.err(&hkey, "not a valid header value"))?;
                Ok((name, value))
            })
            .collect::<Result<_, ConfigError>>()?;
        let body = model
            .body
            .as_ref()
            .map(|b| {
                if method == Method::GET || method == Method::HEAD {
                    return Err(self.err(key("body"), "GET and HEAD requests have no body"));
                }
                let json = toml_to_json(b).map_err(|m| self.err(key("body"), m))?;
                JsonTemplate::compile(&json).map_err(|e| template_err("body", e))
            })
            .transpose()?;
        Ok(HttpSpec {
            method,
            url,
            headers,
            body,
        })
    }
}
