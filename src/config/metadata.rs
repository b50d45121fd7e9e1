//! What a source sends beyond its request template: caller metadata it
//! forwards (`forward_metadata`), and header or metadata templates
//! (`headers` of HTTP sources, `metadata` of gRPC ones), which may read the
//! caller's metadata as `{@name}`.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};

use super::{ConfigError, Validator, source::SourceModel};
use crate::template::{Inputs, StrTemplate};

/// Names a caller's metadata may never be forwarded under: they belong to
/// the connection or the call, which the gateway makes itself.
const NOT_FORWARDED: [&str; 14] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-type",
    "content-length",
    "grpc-timeout",
    "grpc-encoding",
];

impl Validator<'_> {
    /// `forward_metadata` of a source, else of `[defaults]`: lower-cased
    /// header names, refused when they are not the caller's to give.
    pub(super) fn forward_metadata(
        &self,
        name: &str,
        model: &SourceModel,
        http: bool,
    ) -> Result<Vec<HeaderName>, ConfigError> {
        let (names, table) = match (&model.forward_metadata, &self.defaults.forward_metadata) {
            (Some(own), _) => (own, format!("sources.{name}.forward_metadata")),
            (None, Some(inherited)) => (inherited, "defaults.forward_metadata".to_owned()),
            (None, None) => return Ok(Vec::new()),
        };
        let mut out: Vec<HeaderName> = Vec::new();
        for raw in names {
            let lower = raw.to_ascii_lowercase();
            let refuse = |why: &str| self.err(&table, format!("`{raw}`: {why}"));
            if lower.starts_with(':') {
                return Err(refuse("pseudo-headers belong to the request itself"));
            }
            if NOT_FORWARDED.contains(&lower.as_str()) {
                return Err(refuse(
                    "the gateway sets it for each upstream request; it cannot be forwarded",
                ));
            }
            if http && lower.ends_with("-bin") {
                return Err(refuse(
                    "binary (`-bin`) metadata has no HTTP header form; forward it to gRPC sources only",
                ));
            }
            let header = HeaderName::from_bytes(lower.as_bytes())
                .map_err(|_| refuse("not a valid metadata name"))?;
            if !out.contains(&header) {
                out.push(header);
            }
        }
        Ok(out)
    }

    /// `headers = { ... }` or `metadata = { ... }`: names and value templates.
    pub(super) fn header_templates(
        &self,
        table: &str,
        templates: Option<&BTreeMap<String, String>>,
        grpc: bool,
    ) -> Result<Vec<(HeaderName, StrTemplate)>, ConfigError> {
        templates
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let key = format!("{table}.{k}");
                let name = HeaderName::try_from(k.as_str())
                    .map_err(|_| self.err(&key, "not a valid header name"))?;
                if grpc && name.as_str().ends_with("-bin") {
                    return Err(self.err(&key, "a template makes text; `-bin` keys carry binary"));
                }
                let value = StrTemplate::parse(v).map_err(|e| self.err(&key, e.to_string()))?;
                // Literal text must already be a valid header value.
                let params = value
                    .params()
                    .map(|p| (p.to_string(), String::new()))
                    .collect();
                let mut metadata = http::HeaderMap::new();
                for meta in value.metadata() {
                    metadata.insert(meta.clone(), HeaderValue::from_static(""));
                }
                crate::template::render_header(&value, &Inputs::new(&params, &metadata).probing())
                    .map_err(|_| self.err(&key, "not a valid header value"))?;
                Ok((name, value))
            })
            .collect()
    }
}
