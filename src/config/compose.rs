//! Composition keys: a source's `for_each` and `transform`, and an
//! aggregation's dependency graph (references between its sources), `keys`
//! and `transform`. Everything that can be known at load is checked here:
//! cycles, references outside the aggregation, paths a schema cannot have,
//! filters that do not compile, collisions of landing keys.

use std::{collections::BTreeMap, sync::Arc};

use super::{ConfigError, Validator, source::SourceModel};
use crate::{
    config::{SourceKind, SourceSpec},
    template::{Ref, Root},
    transform::Filter,
    upstream::schema,
};

/// Default cap on one call's concurrent requests of a `for_each` source.
pub const DEFAULT_MAX_PARALLEL: usize = 8;
/// Default cap on the length of a `for_each` list.
pub const DEFAULT_MAX_ITEMS: usize = 100;

/// Source names that references give a meaning of their own.
pub const RESERVED_NAMES: [&str; 2] = ["payload", "item"];

/// `for_each`: one request per element of a list.
#[derive(Debug, Clone)]
pub struct ForEach {
    /// `$orders.orders` or `$payload.skus`.
    pub list: Ref,
    pub max_parallel: usize,
    pub max_items: usize,
}

impl ForEach {
    /// Whether the list comes from the caller (so a bad one is its error).
    pub fn from_caller(&self) -> bool {
        self.list.root == Root::Payload
    }
}

impl Validator<'_> {
    /// A source's `for_each` (with its limits) and `transform`.
    pub(super) fn compose(
        &self,
        name: &str,
        model: &SourceModel,
    ) -> Result<(Option<ForEach>, Option<Filter>), ConfigError> {
        let key = |field: &str| format!("sources.{name}.{field}");
        if RESERVED_NAMES.contains(&name) {
            return Err(self.err(
                format!("sources.{name}"),
                format!("`{name}` is reserved: `{{${name}}}` reads the caller's {name}"),
            ));
        }
        let for_each = match &model.for_each {
            None => {
                let stray = (model.max_parallel.map(|_| "max_parallel"))
                    .or(model.max_items.map(|_| "max_items"));
                if let Some(field) = stray {
                    return Err(self.err(key(field), "only for a source with `for_each`"));
                }
                None
            }
            Some(text) => {
                let list = Ref::parse(text)
                    .filter(|r| r.root != Root::Item)
                    .ok_or_else(|| {
                        self.err(
                            key("for_each"),
                            format!(
                                "`{text}`: expected a list's path, `$source.path` or `$payload.path`"
                            ),
                        )
                    })?;
                let at_least_one = |field: &str, n: Option<usize>, default: usize| {
                    let n = self.count(key(field), n.unwrap_or(default))?;
                    if n == 0 {
                        return Err(self.err(key(field), "must be at least 1"));
                    }
                    Ok(n)
                };
                Some(ForEach {
                    list,
                    max_parallel: at_least_one(
                        "max_parallel",
                        model.max_parallel,
                        DEFAULT_MAX_PARALLEL,
                    )?,
                    max_items: at_least_one("max_items", model.max_items, DEFAULT_MAX_ITEMS)?,
                })
            }
        };
        let transform = self.filter(&key("transform"), model.transform.as_deref())?;
        Ok((for_each, transform))
    }

    /// A `transform` filter, compiled.
    pub(super) fn filter(
        &self,
        key: &str,
        text: Option<&str>,
    ) -> Result<Option<Filter>, ConfigError> {
        text.map(Filter::compile)
            .transpose()
            .map_err(|m| self.err(key, m))
    }

    /// Each member's dependencies (indices into `members`), checked: every
    /// source read is a member, the graph has no cycle, and a path into a
    /// gRPC source with a known schema is one its answers can have.
    pub(super) fn graph(
        &self,
        aggregation: &str,
        members: &[(Arc<SourceSpec>, bool)],
    ) -> Result<Vec<Vec<usize>>, ConfigError> {
        let key = format!("aggregations.{aggregation}.sources");
        let mut deps = Vec::with_capacity(members.len());
        for (spec, _) in members {
            let mut own = Vec::new();
            for r in spec.refs() {
                let Some(read) = r.source() else { continue };
                let Some(i) = members.iter().position(|(m, _)| &m.name == read) else {
                    return Err(self.err(
                        &key,
                        format!(
                            "source '{}' reads `{}`, but '{read}' is not a source of this aggregation",
                            spec.name, r.display
                        ),
                    ));
                };
                self.check_path(spec, r, &members[i].0)?;
                if !own.contains(&i) {
                    own.push(i);
                }
            }
            deps.push(own);
        }
        if let Some(cycle) = find_cycle(&deps) {
            let chain: Vec<&str> = cycle.iter().map(|&i| &*members[i].0.name).collect();
            return Err(self.err(
                &key,
                format!(
                    "sources read each other in a cycle (each reads the next): {}",
                    chain.join(" → ")
                ),
            ));
        }
        Ok(deps)
    }

    /// A path into `target`'s result that its schema cannot have.
    fn check_path(
        &self,
        reader: &SourceSpec,
        r: &Ref,
        target: &SourceSpec,
    ) -> Result<(), ConfigError> {
        let SourceKind::Grpc(g) = &target.kind else {
            return Ok(());
        };
        // A transform reshapes the answer: the schema says nothing of it.
        let (Some(schema), None) = (&g.schema, &target.transform) else {
            return Ok(());
        };
        // A `for_each` source's result is a list of answers.
        let path = match (&target.for_each, r.path.split_first()) {
            (None, _) => &r.path[..],
            (Some(_), None) => return Ok(()),
            (Some(_), Some((index, rest))) if index.parse::<usize>().is_ok() => rest,
            (Some(_), Some((other, _))) => {
                return Err(self.err(
                    format!("sources.{}", reader.name),
                    format!(
                        "`{}`: '{}' calls once per item, so its result is a list: `{other}` is not an index",
                        r.display, target.name
                    ),
                ));
            }
        };
        schema::check_path(&schema.output, path).map_err(|m| {
            self.err(
                format!("sources.{}", reader.name),
                format!("`{}`: {m}", r.display),
            )
        })
    }

    /// Where each member lands in the merged document: its name, or what
    /// `keys` says (`""`: its fields at the top level).
    pub(super) fn landing(
        &self,
        aggregation: &str,
        members: &[(Arc<SourceSpec>, bool)],
        keys: &BTreeMap<String, String>,
    ) -> Result<Vec<Arc<str>>, ConfigError> {
        let key = format!("aggregations.{aggregation}.keys");
        if let Some(stray) = keys
            .keys()
            .find(|k| !members.iter().any(|(m, _)| &*m.name == *k))
        {
            return Err(self.err(
                &key,
                format!("'{stray}' is not one of this aggregation's sources"),
            ));
        }
        let landing: Vec<Arc<str>> = members
            .iter()
            .map(|(m, _)| {
                keys.get(&*m.name)
                    .map_or(m.name.clone(), |k| k.as_str().into())
            })
            .collect();
        for (i, a) in landing.iter().enumerate() {
            if a.is_empty() {
                continue;
            }
            if let Some(j) = (i + 1..landing.len()).find(|&j| landing[j] == *a) {
                return Err(self.err(
                    &key,
                    format!(
                        "sources '{}' and '{}' both land at '{a}'",
                        members[i].0.name, members[j].0.name
                    ),
                ));
            }
        }
        Ok(landing)
    }
}

/// A cycle in the graph, as the chain of indices that closes it.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(i: usize, deps: &[Vec<usize>], marks: &mut [Mark], path: &mut Vec<usize>) -> bool {
        marks[i] = Mark::Open;
        path.push(i);
        for &d in &deps[i] {
            match marks[d] {
                Mark::Open => {
                    let start = path.iter().position(|&p| p == d).unwrap_or(0);
                    path.drain(..start);
                    path.push(d);
                    return true;
                }
                Mark::New => {
                    if visit(d, deps, marks, path) {
                        return true;
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        false
    }
    let mut marks = vec![Mark::New; deps.len()];
    for i in 0..deps.len() {
        let mut path = Vec::new();
        if marks[i] == Mark::New && visit(i, deps, &mut marks, &mut path) {
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::find_cycle;

    #[test]
    fn cycles_are_found_with_their_chain() {
        assert_eq!(find_cycle(&[vec![], vec![0], vec![1, 0]]), None);
        // 0 reads 1, 1 reads 2, 2 reads 0: the chain reads in that order.
        assert_eq!(
            find_cycle(&[vec![1], vec![2], vec![0]]),
            Some(vec![0, 1, 2, 0])
        );
        assert_eq!(find_cycle(&[vec![], vec![1]]), Some(vec![1, 1]));
    }
}
