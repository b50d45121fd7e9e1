//! `http(s)://host:port/path?query` templates.

use std::sync::Arc;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::{Inputs, Params, RenderError, StrTemplate, TemplateError};

/// Everything but RFC 3986 unreserved characters is encoded, so a value stays
/// inside its path segment or query value (`/`, `?`, `&`, `=`, `#`, `%` included).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// An `http://host:port/path?query` template. Placeholders may appear in the path
/// and the query, never in the scheme or authority: a parameter must not choose
/// which host the gateway talks to.
#[derive(Debug, Clone)]
pub struct UrlTemplate {
    origin: Box<str>,
    path: StrTemplate,
    query: Option<StrTemplate>,
}

impl UrlTemplate {
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let url_err = |m: &str| TemplateError::Url(format!("`{text}`: {m}"));
        let scheme_len = ["http://", "https://"]
            .iter()
            .find(|s| text.starts_with(*s))
            .map(|s| s.len())
            .ok_or_else(|| url_err("expected an http:// or https:// URL"))?;
        let after_scheme = &text[scheme_len..];
        let authority_len = after_scheme.find(['/', '?']).unwrap_or(after_scheme.len());
        let authority = &after_scheme[..authority_len];
        if authority.is_empty() {
            return Err(url_err("expected a host after the scheme"));
        }
        if authority.contains(['{', '}', '@']) {
            return Err(url_err(
                "the host must be literal (no placeholders or credentials)",
            ));
        }
        if text.contains('#') {
            return Err(url_err("a URL fragment is never sent; remove it"));
        }
        let rest = &after_scheme[authority_len..];
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(StrTemplate::parse(q)?)),
            None => (rest, None),
        };
        let path = if path.is_empty() { "/" } else { path };
        let template = Self {
            origin: text[..scheme_len + authority_len].into(),
            path: StrTemplate::parse(path)?,
            query,
        };
        // Every rendering must be a valid URI; a probe value catches bad literals now.
        let probe: Params = template
            .params()
            .map(|p| (p.to_string(), "x".to_owned()))
            .collect();
        let mut metadata = http::HeaderMap::new();
        for name in template.metadata() {
            metadata.insert(name.clone(), http::HeaderValue::from_static("x"));
        }
        let rendered = template
            .render_with(&Inputs::new(&probe, &metadata).probing())
            .map_err(|e| url_err(&e.to_string()))?;
        http::Uri::try_from(rendered).map_err(|e| url_err(&e.to_string()))?;
        Ok(template)
    }

    pub fn params(&self) -> impl Iterator<Item = &Arc<str>> {
        self.path
            .params()
            .chain(self.query.iter().flat_map(StrTemplate::params))
    }

    pub fn metadata(&self) -> impl Iterator<Item = &http::HeaderName> {
        self.path
            .metadata()
            .chain(self.query.iter().flat_map(StrTemplate::metadata))
    }

    pub fn refs(&self) -> impl Iterator<Item = &super::Ref> {
        self.path
            .refs()
            .chain(self.query.iter().flat_map(StrTemplate::refs))
    }

    /// Every placeholder, as errors name it.
    pub fn inputs(&self) -> impl Iterator<Item = &Arc<str>> {
        self.path
            .inputs()
            .chain(self.query.iter().flat_map(StrTemplate::inputs))
    }

    /// Whether requests go over TLS.
    pub fn is_https(&self) -> bool {
        self.origin.starts_with("https://")
    }

    /// `http://host:port` (or `https://`), literal by construction.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn render(&self, params: &Params) -> Result<String, RenderError> {
        self.render_with(&Inputs::params(params))
    }

    pub fn render_with(&self, inputs: &Inputs) -> Result<String, RenderError> {
        let mut out = String::with_capacity(128);
        out.push_str(&self.origin);
        self.path
            .render_into(inputs, &mut out, |name, value, out| {
                match value {
                    "" => {
                        return Err(RenderError::Invalid {
                            name: name.clone(),
                            reason: "must not be empty (it fills a URL path segment)",
                        });
                    }
                    // Dot segments would be resolved away by servers and proxies.
                    "." => out.push_str("%2E"),
                    ".." => out.push_str("%2E%2E"),
                    _ => out.extend(utf8_percent_encode(value, COMPONENT)),
                }
                Ok(())
            })?;
        if let Some(query) = &self.query {
            out.push('?');
            query.render_into(inputs, &mut out, |_, value, out| {
                out.extend(utf8_percent_encode(value, COMPONENT));
                Ok(())
            })?;
        }
        Ok(out)
    }
}
