//! One aggregation as the gateway runs it: its members, the graph of what
//! each reads, and, per call, the subset to run and its nodes, rendered
//! before anything is sent.

use std::{sync::Arc, time::Duration};

use super::shown;
use crate::{
    config::Mode,
    error::{Error, SourceError},
    fanout::{Node, Renderer, Start},
    telemetry::metrics::CallMetrics,
    template::{Params, RenderError},
    transform::Filter,
    upstream::Source,
};

/// Longest parameter value accepted; larger ones are refused, not forwarded.
pub const MAX_PARAM_BYTES: usize = 8 * 1024;

pub(super) struct Aggregation {
    pub(super) name: Arc<str>,
    pub(super) members: Vec<(Arc<Source>, bool)>,
    /// By member: the members it reads.
    pub(super) deps: Vec<Vec<usize>>,
    /// By member: where it lands in `Aggregate`'s document.
    pub(super) landing: Vec<Arc<str>>,
    pub(super) transform: Option<Filter>,
    pub(super) mode: Mode,
    pub(super) min_success: usize,
    pub(super) timeout: Duration,
    /// By RPC: `Aggregate`, `FetchAll`.
    pub(super) metrics: [CallMetrics; 2],
}

impl Aggregation {
    /// The requested subset with the sources it reads, in the
    /// aggregation's order; all when none is named. Each is a member's
    /// index with the indices (into the subset) of the members it reads.
    pub(super) fn select(&self, names: &[String]) -> Result<Vec<(usize, Vec<usize>)>, Error> {
        if names.is_empty() {
            return Ok(self.deps.iter().cloned().enumerate().collect());
        }
        let mut chosen = vec![false; self.members.len()];
        let mut todo = Vec::new();
        for name in names {
            let Some(i) = self.members.iter().position(|(s, _)| &**s.name() == name) else {
                return Err(Error::UnknownSource {
                    aggregation: self.name.clone(),
                    source_name: shown(name),
                });
            };
            todo.push(i);
        }
        while let Some(i) = todo.pop() {
            if !std::mem::replace(&mut chosen[i], true) {
                todo.extend(self.deps[i].iter().filter(|&&d| !chosen[d]));
            }
        }
        // Member index -> position in the subset.
        let mut position = vec![usize::MAX; self.members.len()];
        let members: Vec<usize> = (0..self.members.len()).filter(|&i| chosen[i]).collect();
        for (p, &m) in members.iter().enumerate() {
            position[m] = p;
        }
        Ok(members
            .into_iter()
            .map(|m| (m, self.deps[m].iter().map(|&d| position[d]).collect()))
            .collect())
    }

    /// The call's nodes: the caller's params are checked, and every source
    /// that reads no other source rendered, before any upstream is called.
    pub(super) fn nodes<'a>(
        &'a self,
        selected: &[(usize, Vec<usize>)],
        renderer: &Renderer,
        params: &Params,
    ) -> Result<Vec<Node<'a>>, Error> {
        let mut nodes = Vec::with_capacity(selected.len());
        for (member, deps) in selected {
            let (source, optional) = &self.members[*member];
            check_params(source, params)?;
            let start = if source.reads_sources {
                Start::Later
            } else {
                match renderer.render(source, &[]) {
                    Ok(requests) => Start::Ready(requests),
                    Err(SourceError::Render(e)) => return Err(e.into()),
                    Err(other) => Start::Failed(other),
                }
            };
            nodes.push(Node {
                source,
                optional: *optional,
                deps: deps.clone(),
                start,
            });
        }
        Ok(nodes)
    }
}

fn check_params(source: &Source, params: &Params) -> Result<(), RenderError> {
    for name in &source.params {
        let value = params
            .get(&**name)
            .ok_or_else(|| RenderError::Missing(name.clone()))?;
        if value.len() > MAX_PARAM_BYTES {
            return Err(RenderError::Invalid {
                name: name.clone(),
                reason: "is longer than 8192 bytes",
            });
        }
    }
    Ok(())
}
