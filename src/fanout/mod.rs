//! Concurrent dispatch under one deadline, as a graph: a source that reads
//! others ([`node`]) starts once they have finished.
//!
//! Every source runs as a future inside the caller's own task, so nothing
//! outlives the request: returning (first required failure, deadline) or being
//! dropped (caller cancelled) drops the rest, which aborts their requests on
//! the wire (RST_STREAM for HTTP/2, a closed connection for HTTP/1).

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use tokio::time::Instant;

mod node;

pub use self::node::{Node, Renderer, Requests, Start};
use crate::{
    config::Mode,
    deadline::Deadline,
    error::{Error, SourceError},
};

/// The outcome of one source.
#[derive(Debug)]
pub struct Outcome {
    pub source: Arc<str>,
    pub optional: bool,
    pub result: Result<serde_json::Value, SourceError>,
    pub elapsed: Duration,
    /// Requests sent to the upstream.
    pub attempts: u32,
    /// Whether it shared an identical call already in flight.
    pub coalesced: bool,
    /// Whether it was not called at all: its circuit is open, or a source
    /// it reads failed.
    pub skipped: bool,
    /// The source's configured stand-in data, when it failed.
    pub fallback: Option<serde_json::Value>,
    /// Set when its cache answered (every item's, for a `for_each` source).
    pub cached: Option<crate::cache::Cached>,
}

/// A failed call, with the sources that had finished by then (for the log).
#[derive(Debug)]
pub struct Failure {
    pub error: Error,
    pub finished: Vec<Outcome>,
}

/// How a call's sources are run and judged.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub mode: Mode,
    /// Fewer successful sources than this (at most the call's number of
    /// sources) fail the call, whatever the mode.
    pub min_success: usize,
    pub deadline: Deadline,
}

impl Outcome {
    /// The data to answer with, taken out: the result, or the fallback
    /// standing in for it.
    pub fn take_data(&mut self) -> Option<serde_json::Value> {
        match &mut self.result {
            Ok(json) => Some(std::mem::take(json)),
            Err(_) => self.fallback.take(),
        }
    }
}

/// Runs the call's sources as a graph: each starts the moment the sources it
/// reads have finished, independent ones concurrently. Results come back in
/// the order given.
pub async fn run(
    nodes: Vec<Node<'_>>,
    renderer: Renderer<'_>,
    policy: Policy,
) -> Result<Vec<Outcome>, Failure> {
    let Policy {
        mode,
        min_success,
        deadline,
    } = policy;
    let started = Instant::now();
    // A required source that failed before anything was sent fails the
    // call before anything is sent.
    if mode == Mode::FailFast {
        let failed = nodes.iter().find_map(|n| match &n.start {
            Start::Failed(error) if !n.optional => Some((n.source, error)),
            _ => None,
        });
        if let Some((source, error)) = failed {
            let outcome = Outcome {
                source: source.name().clone(),
                optional: false,
                result: Err(error.clone()),
                elapsed: Duration::ZERO,
                attempts: 0,
                coalesced: false,
                skipped: false,
                fallback: None,
                cached: None,
            };
            return Err(Failure {
                error: Error::Source {
                    source_name: outcome.source.clone(),
                    error: error.clone(),
                },
                finished: vec![outcome],
            });
        }
    }
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        for &d in &node.deps {
            readers[d].push(i);
        }
    }
    let mut slots: Vec<Option<Outcome>> = nodes.iter().map(|_| None).collect();
    let mut waiting: Vec<Option<Node>> = Vec::with_capacity(nodes.len());
    // Boxed: FuturesUnordered keeps a stub task as large as its future
    // type, so unboxed every call in flight would hold an empty copy of a
    // per-source future (~4 KB) beside the real ones.
    let mut pending: FuturesUnordered<BoxFuture<'_, (usize, Outcome)>> = FuturesUnordered::new();
    for (i, node) in nodes.into_iter().enumerate() {
        let start = match node.start {
            Start::Ready(requests) => Ok(requests),
            Start::Failed(error) => Err(error),
            Start::Later => {
                waiting.push(Some(node));
                continue;
            }
        };
        pending.push(Box::pin(node::run(
            i,
            node.source,
            node.optional,
            start,
            deadline,
        )));
        waiting.push(None);
    }

    let collect = async {
        while let Some((i, outcome)) = pending.next().await {
            // Kept before deciding anything, so the log tells who failed.
            let slot = slots[i].insert(outcome);
            if let Err(error) = &slot.result {
                // A source whose budget was this very deadline may report it a
                // moment before our timer does: the call is what expired. Not so
                // a source that waited out the deadline for a free connection:
                // that wait is why the deadline passed.
                if deadline.is_expired() && !error.is_wait_for_connection() {
                    return Err(Error::DeadlineExceeded(started.elapsed()));
                }
                if mode == Mode::FailFast && !slot.optional {
                    return Err(Error::Source {
                        source_name: slot.source.clone(),
                        error: error.clone(),
                    });
                }
            }
            for &r in &readers[i] {
                let ready = waiting[r]
                    .as_ref()
                    .is_some_and(|n| n.deps.iter().all(|&d| slots[d].is_some()));
                let Some(node) = ready.then(|| waiting[r].take()).flatten() else {
                    continue;
                };
                let start = start_reader(&node, &slots, &renderer);
                pending.push(Box::pin(node::run(
                    r,
                    node.source,
                    node.optional,
                    start,
                    deadline,
                )));
            }
        }
        Ok(())
    };
    let result = tokio::time::timeout_at(deadline.instant(), collect).await;
    // Abort whatever is still in flight before answering.
    drop(pending);
    let error = match result {
        Ok(Ok(())) => {
            let outcomes: Vec<Outcome> = slots.into_iter().flatten().collect();
            return judge(outcomes, min_success);
        }
        Ok(Err(error)) => error,
        Err(_) => Error::DeadlineExceeded(started.elapsed()),
    };
    Err(Failure {
        error,
        finished: slots.into_iter().flatten().collect(),
    })
}

/// A reader whose sources have all finished: skipped if one failed, else
/// rendered from their results.
fn start_reader(
    node: &Node,
    slots: &[Option<Outcome>],
    renderer: &Renderer,
) -> Result<Requests, SourceError> {
    let mut sources = Vec::with_capacity(node.deps.len());
    for outcome in node.deps.iter().filter_map(|&d| slots[d].as_ref()) {
        match &outcome.result {
            Ok(value) => sources.push((&*outcome.source, value)),
            Err(_) => return Err(SourceError::DependencyFailed(outcome.source.clone())),
        }
    }
    renderer.render(node.source, &sources)
}

/// A call whose sources all finished: fewer successes than `min_success`
/// (capped at the number of sources) is a failure, not an empty success.
/// Skipped and failed sources, served a fallback or not, have not succeeded.
fn judge(outcomes: Vec<Outcome>, min_success: usize) -> Result<Vec<Outcome>, Failure> {
    let total = outcomes.len();
    let succeeded = outcomes.iter().filter(|o| o.result.is_ok()).count();
    let min = min_success.min(total);
    if succeeded >= min {
        return Ok(outcomes);
    }
    let failed = outcomes
        .iter()
        .filter_map(|o| Some((o.source.clone(), o.result.as_ref().err()?.clone())))
        .collect();
    Err(Failure {
        error: Error::TooFewSucceeded {
            succeeded,
            total,
            min,
            failed,
        },
        finished: outcomes,
    })
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn outcome(name: &str, result: Result<serde_json::Value, SourceError>) -> Outcome {
        Outcome {
            source: name.into(),
            optional: true,
            result,
            elapsed: Duration::ZERO,
            attempts: 1,
            coalesced: false,
            skipped: false,
            fallback: None,
            cached: None,
        }
    }

    fn failed(code: Code) -> Result<serde_json::Value, SourceError> {
        Err(SourceError::Grpc {
            code,
            message: String::new(),
        })
    }

    #[test]
    fn too_few_successes_fail_with_the_highest_ranked_code() {
        let outcomes = vec![
            outcome("a", failed(Code::Unavailable)),
            outcome("b", Ok(serde_json::Value::Null)),
            outcome("c", failed(Code::NotFound)),
            outcome("d", failed(Code::Internal)),
        ];
        let failure = judge(outcomes, 2).unwrap_err();
        assert_eq!(
            failure.error.to_string(),
            "1 of 4 sources succeeded (min_success = 2)"
        );
        assert_eq!(failure.error.code(), Code::NotFound);
        assert_eq!(failure.finished.len(), 4);
    }

    #[test]
    fn min_success_is_capped_at_the_number_of_sources() {
        let outcomes = vec![outcome("a", Ok(serde_json::Value::Null))];
        assert!(judge(outcomes, 3).is_ok());
        let none = vec![outcome("a", failed(Code::Unavailable))];
        assert!(judge(none, 0).is_ok(), "min_success = 0 never fails");
    }
}
