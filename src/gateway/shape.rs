//! The merged document of `Aggregate`: each source's data where `keys`
//! puts it (its name by default; `""` merges an object's fields into the top
//! level), then the aggregation's `transform`.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::{error::Error, fanout::Outcome, template::refs::type_name, transform::Filter};

/// How `Aggregate` shapes its answer.
pub struct Shape<'a> {
    /// By outcome: where its data lands.
    pub landing: Vec<&'a Arc<str>>,
    pub transform: Option<&'a Filter>,
    /// The most the transformed document may take, as JSON.
    pub max_bytes: usize,
}

impl Shape<'_> {
    /// The document, the data taken out of `outcomes`.
    pub fn document(&self, outcomes: &mut [Outcome]) -> Result<Map<String, Value>, Error> {
        let mut doc = Map::new();
        // Who put each top-level member there, kept only when fields merge
        // in from `""` keys, to name both sides of a collision.
        let merging = self.landing.iter().any(|k| k.is_empty());
        let mut owners: Vec<(String, Arc<str>)> = Vec::new();
        for (outcome, key) in outcomes.iter_mut().zip(&self.landing) {
            let Some(value) = outcome.take_data() else {
                continue;
            };
            let fields = match (key.is_empty(), value) {
                (false, value) => vec![(key.to_string(), value)],
                (true, Value::Object(fields)) => fields.into_iter().collect(),
                (true, other) => {
                    return Err(Error::Shape(format!(
                        "source '{}' merges into the top level (keys = \"\"), but its result is {}, not an object",
                        outcome.source,
                        type_name(&other)
                    )));
                }
            };
            for (field, value) in fields {
                if doc.contains_key(&field) {
                    let other = owners
                        .iter()
                        .find(|(f, _)| *f == field)
                        .map_or("another source", |(_, s)| &**s);
                    return Err(Error::Shape(format!(
                        "sources '{other}' and '{}' both put '{field}' in the answer",
                        outcome.source
                    )));
                }
                if merging {
                    owners.push((field.clone(), outcome.source.clone()));
                }
                doc.insert(field, value);
            }
        }
        let Some(filter) = self.transform else {
            return Ok(doc);
        };
        match filter.apply(&Value::Object(doc), self.max_bytes, "max_answer_bytes") {
            Ok(Value::Object(shaped)) => Ok(shaped),
            Ok(other) => Err(Error::Shape(format!(
                "transform `{}` made {}; the answer must be an object",
                filter.text,
                type_name(&other)
            ))),
            Err(detail) => Err(Error::Shape(format!(
                "transform `{}` failed: {detail}",
                filter.text
            ))),
        }
    }
}
