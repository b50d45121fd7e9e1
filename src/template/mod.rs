//! Request templates. Placeholders are parsed once at load and rendered per
//! request with the escaping that fits where the value lands: a
//! percent-encoded URL path segment or query value ([`UrlTemplate`]), a JSON
//! string ([`JsonTemplate`]), or a header value ([`render_header`]). A value
//! can never change the shape of the request it is substituted into.
//!
//! `{name}` reads the caller's `params`; `{@name}` reads the caller's
//! metadata (request headers), such as `{@authorization}`; `{$source.path}`,
//! `{$payload.path}` and `{$item.path}` read JSON values ([`refs`]).

mod header;
mod json;
pub mod refs;
mod url;

use std::{collections::HashMap, sync::Arc};

use http::{HeaderMap, HeaderName};

pub use self::{
    header::render_header,
    json::JsonTemplate,
    refs::{Ref, Root, Values},
    url::UrlTemplate,
};

/// Request parameters, as sent by the caller.
pub type Params = HashMap<String, String>;

/// What a template is rendered from: the caller's params and metadata, and
/// the JSON values references read.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub params: &'a Params,
    pub metadata: &'a HeaderMap,
    pub values: Values<'a>,
}

static NO_METADATA: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

impl<'a> Inputs<'a> {
    pub fn new(params: &'a Params, metadata: &'a HeaderMap) -> Self {
        Self {
            params,
            metadata,
            values: Values::default(),
        }
    }

    /// Params and no metadata.
    pub fn params(params: &'a Params) -> Self {
        Self::new(params, &NO_METADATA)
    }

    /// The same inputs, references reading `values`.
    pub fn with_values(self, values: Values<'a>) -> Self {
        Self { values, ..self }
    }

    /// The same inputs, every reference reading `"x"`: to check at load
    /// that a template's literal parts make a valid request.
    pub fn probing(self) -> Self {
        let values = Values {
            probe: true,
            ..self.values
        };
        Self { values, ..self }
    }
}

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
    #[error(
        "invalid placeholder `{{@{0}}}`: expected a metadata (header) name, lower-case, not a binary `-bin` key"
    )]
    BadMetadata(String),
    #[error(
        "invalid reference `{{{0}}}`: expected `$source`, `$payload` or `$item`, then `.`-separated keys or indices"
    )]
    BadRef(String),
    #[error("{0}")]
    Url(String),
}

/// A value that cannot be rendered; reported to the caller as
/// INVALID_ARGUMENT. Names of metadata are kept with their `@`.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("missing {}", describe(.0))]
    Missing(Arc<str>),
    #[error("{} {reason}", describe(.name))]
    Invalid {
        name: Arc<str>,
        reason: &'static str,
    },
    /// The value cannot be the field it fills (`"abc"` for an `int32`).
    #[error("{} does not fit {field}: {detail}", describe(.name))]
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

/// `parameter 'user_id'`, `metadata 'x-token'` for `@x-token`, or
/// `path '$profile.id'`.
fn describe(name: &str) -> String {
    match name.strip_prefix('@') {
        Some(meta) => format!("metadata '{meta}'"),
        None if name.starts_with('$') => format!("path '{name}'"),
        None => format!("parameter '{name}'"),
    }
}

impl RenderError {
    /// Whether it is about the caller's metadata rather than its params.
    pub fn is_metadata(&self) -> bool {
        let name = match self {
            Self::Missing(name) | Self::Invalid { name, .. } | Self::Mismatch { name, .. } => name,
            Self::TooLong { .. } => return false,
        };
        name.starts_with('@')
    }

    /// The path of the reference it is about, if it is about one.
    pub fn reference(&self) -> Option<&str> {
        match self {
            Self::Missing(name) | Self::Invalid { name, .. } | Self::Mismatch { name, .. } => {
                name.starts_with('$').then_some(&**name)
            }
            Self::TooLong { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(Box<str>),
    Param(Arc<str>),
    /// `{@name}`: `display` is `@name`, as errors show it.
    Meta {
        name: HeaderName,
        display: Arc<str>,
    },
    Ref(Arc<Ref>),
}

/// A string with `{name}` and `{@name}` placeholders; `{{` and `}}` are
/// literal braces.
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
                    let inner = &rest[..end];
                    let piece = match inner.strip_prefix('@') {
                        Some(meta) => metadata_piece(meta)?,
                        None if inner.starts_with('$') => Piece::Ref(Arc::new(
                            Ref::parse(inner)
                                .ok_or_else(|| TemplateError::BadRef(inner.to_owned()))?,
                        )),
                        None if valid_name(inner) => Piece::Param(inner.into()),
                        None => return Err(TemplateError::BadName(inner.to_owned())),
                    };
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit).into()));
                    }
                    pieces.push(piece);
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

    /// The parameter names, in order of appearance (possibly repeated).
    pub fn params(&self) -> impl Iterator<Item = &Arc<str>> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(name) => Some(name),
            _ => None,
        })
    }

    /// The metadata names read, in order of appearance (possibly repeated).
    pub fn metadata(&self) -> impl Iterator<Item = &HeaderName> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Meta { name, .. } => Some(name),
            _ => None,
        })
    }

    /// The references, in order of appearance.
    pub fn refs(&self) -> impl Iterator<Item = &Ref> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Ref(r) => Some(&**r),
            _ => None,
        })
    }

    /// The reference, when the template is exactly one: it then renders
    /// into a JSON template as the value itself, not as text.
    pub fn single_ref(&self) -> Option<&Ref> {
        match &self.pieces[..] {
            [Piece::Ref(r)] => Some(r),
            _ => None,
        }
    }

    /// Every placeholder, as errors name it (`user_id`, `@x-token`, `$a.b`).
    pub fn inputs(&self) -> impl Iterator<Item = &Arc<str>> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(name) | Piece::Meta { display: name, .. } => Some(name),
            Piece::Ref(r) => Some(&r.display),
            Piece::Lit(_) => None,
        })
    }

    pub fn is_literal(&self) -> bool {
        self.inputs().next().is_none()
    }

    /// Appends the rendering to `out`, passing each value through `escape`
    /// with the name errors should give it.
    fn render_into(
        &self,
        inputs: &Inputs,
        out: &mut String,
        mut escape: impl FnMut(&Arc<str>, &str, &mut String) -> Result<(), RenderError>,
    ) -> Result<(), RenderError> {
        for piece in &self.pieces {
            match piece {
                Piece::Lit(lit) => out.push_str(lit),
                Piece::Param(name) => escape(name, lookup(inputs.params, name)?, out)?,
                Piece::Meta { name, display } => {
                    let value = inputs
                        .metadata
                        .get(name)
                        .ok_or_else(|| RenderError::Missing(display.clone()))?;
                    let value = value.to_str().map_err(|_| RenderError::Invalid {
                        name: display.clone(),
                        reason: "is not text",
                    })?;
                    escape(display, value, out)?;
                }
                Piece::Ref(r) => {
                    let text = refs::text(inputs.values.resolve(r)?);
                    if text.len() > refs::MAX_TEXT_BYTES {
                        return Err(RenderError::Invalid {
                            name: r.display.clone(),
                            reason: "is longer than 8192 bytes as text",
                        });
                    }
                    escape(&r.display, &text, out)?;
                }
            }
        }
        Ok(())
    }

    /// Renders with values inserted verbatim (for JSON strings, which serde escapes).
    pub fn render(&self, params: &Params) -> Result<String, RenderError> {
        self.render_with(&Inputs::params(params))
    }

    pub fn render_with(&self, inputs: &Inputs) -> Result<String, RenderError> {
        let mut out = String::new();
        self.render_into(inputs, &mut out, |_, value, out| {
            out.push_str(value);
            Ok(())
        })?;
        Ok(out)
    }
}

fn metadata_piece(name: &str) -> Result<Piece, TemplateError> {
    let bad = || TemplateError::BadMetadata(name.to_owned());
    if name.ends_with("-bin") || name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad());
    }
    let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
    Ok(Piece::Meta {
        name: header,
        display: format!("@{name}").into(),
    })
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

#[cfg(test)]
mod tests;
