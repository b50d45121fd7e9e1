//! JSON templates: a JSON value whose strings may hold placeholders.

use std::sync::Arc;

use super::{Inputs, Params, RenderError, StrTemplate, TemplateError};

/// A JSON value whose strings may hold placeholders. A string that is
/// exactly one reference (`"{$profile.id}"`) becomes the referenced value as
/// it is; any other substituted value becomes (part of) a JSON string, never
/// raw JSON text.
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
        Ok(if compiled.inputs().next().is_none() {
            Self::Literal(value.clone())
        } else {
            compiled
        })
    }

    /// The strings of the template, depth first.
    fn strings(&self) -> Box<dyn Iterator<Item = &StrTemplate> + '_> {
        match self {
            Self::Literal(_) => Box::new(std::iter::empty()),
            Self::Str(s) => Box::new(std::iter::once(s)),
            Self::Array(items) => Box::new(items.iter().flat_map(Self::strings)),
            Self::Object(fields) => Box::new(fields.iter().flat_map(|(_, v)| v.strings())),
        }
    }

    pub fn params(&self) -> impl Iterator<Item = &Arc<str>> {
        self.strings().flat_map(StrTemplate::params)
    }

    pub fn refs(&self) -> impl Iterator<Item = &super::Ref> {
        self.strings().flat_map(StrTemplate::refs)
    }

    pub fn metadata(&self) -> impl Iterator<Item = &http::HeaderName> {
        self.strings().flat_map(StrTemplate::metadata)
    }

    /// Every placeholder, as errors name it.
    pub fn inputs(&self) -> impl Iterator<Item = &Arc<str>> {
        self.strings().flat_map(StrTemplate::inputs)
    }

    pub fn render(&self, params: &Params) -> Result<serde_json::Value, RenderError> {
        self.render_with(&Inputs::params(params))
    }

    pub fn render_with(&self, inputs: &Inputs) -> Result<serde_json::Value, RenderError> {
        use serde_json::Value;
        Ok(match self {
            Self::Literal(v) => v.clone(),
            Self::Str(s) => match s.single_ref() {
                Some(r) => inputs.values.resolve(r)?.clone(),
                None => Value::String(s.render_with(inputs)?),
            },
            Self::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|t| t.render_with(inputs))
                    .collect::<Result<_, _>>()?,
            ),
            Self::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), t.render_with(inputs)?)))
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
