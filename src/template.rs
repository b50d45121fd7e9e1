//! Request templates. `{name}` placeholders are parsed once at load and rendered
//! per request with the escaping that fits where the value lands: a percent-encoded
//! URL path segment or query value, a JSON string, or a header value. A parameter
//! value can never change the shape of the request it is substituted into.

use std::{collections::HashMap, sync::Arc};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Request parameters, as sent by the caller.
pub type Params = HashMap<String, String>;

/// Everything but RFC 3986 unreserved characters is encoded, so a value stays
/// inside its path segment or query value (`/`, `?`, `&`, `=`, `#`, `%` included).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A template that cannot be compiled; reported at load with the config key.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("unclosed placeholder in `{0}` (write `{{{{` for a literal brace)")]
    Unclosed(String),
    #[error("unmatched `}}` in `{0}` (write `}}}}` for a literal brace)")]
    Unmatched(String),
    #[error(
        "invalid placeholder `{{{0}}}`: a name is a letter or `_` followed by letters, digits, `_`, `-` or `.`"
    )]
    BadName(String),
    #[error("{0}")]
    Url(String),
}

/// A parameter that cannot be rendered; reported to the caller as INVALID_ARGUMENT.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("missing parameter '{0}'")]
    Missing(Arc<str>),
    #[error("parameter '{name}' {reason}")]
    Invalid {
        name: Arc<str>,
        reason: &'static str,
    },
    /// The value cannot be the field it fills (`"abc"` for an `int32`).
    #[error("parameter '{name}' does not fit {field}: {detail}")]
    Mismatch {
        name: Arc<str>,
        field: String,
        detail: String,
    },
    /// The rendered request part would be longer than any upstream takes.
    #[error("the rendered {what} is {len} bytes, over the {max}-byte limit (parameters {params})")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
        /// The parameters that fill it, comma-separated.
        params: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(Box<str>),
    Param(Arc<str>),
}

/// A string with `{name}` placeholders; `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq)]
pub struct StrTemplate {
    pieces: Vec<Piece>,
}

impl StrTemplate {
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err(TemplateError::Unmatched(text.to_owned())),
                '{' => {
                    let rest = &text[i + 1..];
                    let end = rest
                        .find('}')
                        .ok_or_else(|| TemplateError::Unclosed(text.to_owned()))?;
                    let name = &rest[..end];
                    if !valid_name(name) {
                        return Err(TemplateError::BadName(name.to_owned()));
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit).into()));
                    }
                    pieces.push(Piece::Param(name.into()));
                    for _ in 0..=end {
                        chars.next();
                    }
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit.into()));
        }
        Ok(Self { pieces })
    }

    /// The placeholder names, in order of appearance (possibly repeated).
    pub fn params(&self) -> impl Iterator<Item = &Arc<str>> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(name) => Some(name),
            Piece::Lit(_) => None,
        })
    }

    pub fn is_literal(&self) -> bool {
        self.params().next().is_none()
    }

    /// Appends the rendering to `out`, passing each parameter value through `escape`.
    fn render_into(
        &self,
        params: &Params,
        out: &mut String,
        mut escape: impl FnMut(&Arc<str>, &str, &mut String) -> Result<(), RenderError>,
    ) -> Result<(), RenderError> {
        for piece in &self.pieces {
            match piece {
                Piece::Lit(lit) => out.push_str(lit),
                Piece::Param(name) => escape(name, lookup(params, name)?, out)?,
            }
        }
        Ok(())
    }

    /// Renders with values inserted verbatim (for JSON strings, which serde escapes).
    pub fn render(&self, params: &Params) -> Result<String, RenderError> {
        let mut out = String::new();
        self.render_into(params, &mut out, |_, value, out| {
            out.push_str(value);
            Ok(())
        })?;
        Ok(out)
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn lookup<'a>(params: &'a Params, name: &Arc<str>) -> Result<&'a str, RenderError> {
    params
        .get(&**name)
        .map(String::as_str)
        .ok_or_else(|| RenderError::Missing(name.clone()))
}

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
        let after_scheme = text
            .strip_prefix("http://")
            .ok_or_else(|| url_err("expected an http:// URL"))?;
        let authority_len = after_scheme.find(['/', '?']).unwrap_or(after_scheme.len());
        let authority = &after_scheme[..authority_len];
        if authority.is_empty() {
            return Err(url_err("expected a host after http://"));
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
            origin: text[..7 + authority_len].into(),
            path: StrTemplate::parse(path)?,
            query,
        };
        // Every rendering must be a valid URI; a probe value catches bad literals now.
        let probe: Params = template
            .params()
            .map(|p| (p.to_string(), "x".to_owned()))
            .collect();
        let rendered = template
            .render(&probe)
            .map_err(|e| url_err(&e.to_string()))?;
        http::Uri::try_from(rendered).map_err(|e| url_err(&e.to_string()))?;
        Ok(template)
    }

    pub fn params(&self) -> impl Iterator<Item = &Arc<str>> {
        self.path
            .params()
            .chain(self.query.iter().flat_map(StrTemplate::params))
    }

    /// `http://host:port`, literal by construction.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn render(&self, params: &Params) -> Result<String, RenderError> {
        let mut out = String::with_capacity(128);
        out.push_str(&self.origin);
        self.path
            .render_into(params, &mut out, |name, value, out| {
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
            query.render_into(params, &mut out, |_, value, out| {
                out.extend(utf8_percent_encode(value, COMPONENT));
                Ok(())
            })?;
        }
        Ok(out)
    }
}

/// A JSON value whose strings may hold placeholders. Each substituted value
/// becomes (part of) a JSON string, never raw JSON text.
#[derive(Debug, Clone)]
pub enum JsonTemplate {
    /// A subtree without placeholders, cloned as is.
    Literal(serde_json::Value),
    Str(StrTemplate),
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
}

impl JsonTemplate {
    pub fn compile(value: &serde_json::Value) -> Result<Self, TemplateError> {
        use serde_json::Value;
        let compiled = match value {
            Value::String(s) => Self::Str(StrTemplate::parse(s)?),
            Value::Array(items) => {
                Self::Array(items.iter().map(Self::compile).collect::<Result<_, _>>()?)
            }
            Value::Object(fields) => Self::Object(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), Self::compile(v)?)))
                    .collect::<Result<_, TemplateError>>()?,
            ),
            other => Self::Literal(other.clone()),
        };
        Ok(if compiled.params().next().is_none() {
            Self::Literal(value.clone())
        } else {
            compiled
        })
    }

    pub fn params(&self) -> Box<dyn Iterator<Item = &Arc<str>> + '_> {
        match self {
            Self::Literal(_) => Box::new(std::iter::empty()),
            Self::Str(s) => Box::new(s.params()),
            Self::Array(items) => Box::new(items.iter().flat_map(Self::params)),
            Self::Object(fields) => Box::new(fields.iter().flat_map(|(_, v)| v.params())),
        }
    }

    pub fn render(&self, params: &Params) -> Result<serde_json::Value, RenderError> {
        use serde_json::Value;
        Ok(match self {
            Self::Literal(v) => v.clone(),
            Self::Str(s) => Value::String(s.render(params)?),
            Self::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|t| t.render(params))
                    .collect::<Result<_, _>>()?,
            ),
            Self::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), t.render(params)?)))
                    .collect::<Result<_, RenderError>>()?,
            ),
        })
    }

    /// The literal template, for checks against a schema at load.
    pub fn keys(&self) -> Option<&[(String, JsonTemplate)]> {
        match self {
            Self::Object(fields) => Some(fields),
            _ => None,
        }
    }
}

/// Renders a header value; control characters in a parameter are refused.
pub fn render_header(
    template: &StrTemplate,
    params: &Params,
) -> Result<http::HeaderValue, RenderError> {
    let mut out = String::new();
    template.render_into(params, &mut out, |name, value, out| {
        if value.bytes().any(|b| b.is_ascii_control()) {
            return Err(RenderError::Invalid {
                name: name.clone(),
                reason: "must not contain control characters (it fills a header)",
            });
        }
        out.push_str(value);
        Ok(())
    })?;
    // Literal parts were validated at load and values above, so this holds.
    http::HeaderValue::try_from(out).map_err(|_| RenderError::Invalid {
        name: "header".into(),
        reason: "is not a valid header value",
    })
}

#[cfg(test)]
mod tests;
