//! `{$source.path}`, `{$payload.path}` and `{$item.path}`: references to
//! JSON values, read from another source's result, the caller's payload or
//! the element of a `for_each` list.

use std::{borrow::Cow, sync::Arc};

use serde_json::Value;

use super::RenderError;

/// Where a reference starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// Another source's result, by the source's name.
    Source(Arc<str>),
    /// The caller's `payload`.
    Payload,
    /// The current element of the source's `for_each` list.
    Item,
}

/// A reference: a root and a path of object keys and array indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    pub root: Root,
    pub path: Box<[Box<str>]>,
    /// `$profile.account.id`, as errors show it.
    pub display: Arc<str>,
}

impl Ref {
    /// Parses `$root.a.0.b` (with its `$`); `None` if it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let mut segments = text.strip_prefix('$')?.split('.');
        let root = segments.next().filter(|s| valid_segment(s))?;
        let path: Vec<Box<str>> = segments
            .map(|s| valid_segment(s).then(|| s.into()))
            .collect::<Option<_>>()?;
        let root = match root {
            "payload" => Root::Payload,
            "item" => Root::Item,
            name => Root::Source(name.into()),
        };
        Some(Self {
            root,
            path: path.into(),
            display: text.into(),
        })
    }

    /// The source it reads, if it reads one.
    pub fn source(&self) -> Option<&Arc<str>> {
        match &self.root {
            Root::Source(name) => Some(name),
            Root::Payload | Root::Item => None,
        }
    }

    /// The value at the path below `root`: keys into objects, indices into arrays.
    pub fn find<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        self.path
            .iter()
            .try_fold(root, |value, segment| match value {
                Value::Object(fields) => fields.get(&**segment),
                Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
                _ => None,
            })
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// What references read, for one rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct Values<'a> {
    pub payload: Option<&'a Value>,
    /// Finished sources' results, by name.
    pub sources: &'a [(&'a str, &'a Value)],
    pub item: Option<&'a Value>,
    /// At load, to check a template's literal parts: every reference reads `"x"`.
    pub probe: bool,
}

static PROBE: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| Value::from("x"));

impl<'a> Values<'a> {
    /// The value `reference` names, or why there is none.
    pub fn resolve(&self, reference: &Ref) -> Result<&'a Value, RenderError> {
        if self.probe {
            return Ok(&PROBE);
        }
        let root = match &reference.root {
            Root::Payload => self.payload,
            Root::Item => self.item,
            Root::Source(name) => self
                .sources
                .iter()
                .find(|(n, _)| *n == &**name)
                .map(|(_, v)| *v),
        };
        root.and_then(|root| reference.find(root))
            .ok_or_else(|| RenderError::Missing(reference.display.clone()))
    }
}

/// The longest text a reference may insert (into a URL, a header or a
/// longer string), as for a parameter: an upstream's huge answer must not
/// become a huge header.
pub const MAX_TEXT_BYTES: usize = 8 * 1024;

/// A value where text is expected (in a longer string, a URL, a header):
/// a string as it is, anything else as compact JSON.
pub fn text(value: &Value) -> Cow<'_, str> {
    match value {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

/// What a value is, as messages say it: `a string`, `an object`.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn paths_walk_keys_and_indices() {
        let r = Ref::parse("$orders.orders.1.id").unwrap();
        assert_eq!(r.source().map(|s| &**s), Some("orders"));
        let doc = json!({"orders": [{"id": "a"}, {"id": 7}]});
        assert_eq!(r.find(&doc), Some(&json!(7)));
        assert_eq!(Ref::parse("$orders.nope").unwrap().find(&doc), None);
        assert_eq!(Ref::parse("$orders.orders.x").unwrap().find(&doc), None);
        assert_eq!(Ref::parse("$payload").unwrap().root, Root::Payload);
        assert_eq!(Ref::parse("$item.sku").unwrap().root, Root::Item);
        for bad in ["$", "$a..b", "$a.", "profile", "$a b", "$a.{b}"] {
            assert!(Ref::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn text_keeps_strings_and_writes_the_rest_as_json() {
        assert_eq!(text(&json!("a\"b")), "a\"b");
        assert_eq!(text(&json!(42)), "42");
        assert_eq!(text(&json!([1, "x"])), "[1,\"x\"]");
    }
}
