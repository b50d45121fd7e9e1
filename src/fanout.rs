//! Concurrent dispatch under one deadline.
//!
//! Every source runs as a future inside the caller's own task, so nothing
//! outlives the request: returning (first required failure, deadline) or being
//! dropped (caller cancelled) drops the rest, which aborts their requests on
//! the wire (RST_STREAM for HTTP/2, a closed connection for HTTP/1).

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::time::Instant;

use crate::{
    config::Mode,
    deadline::Deadline,
    error::{Error, SourceError},
    upstream::{Fetched, Prepared, Source},
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
    /// Whether it was not called at all: its circuit is open.
    pub skipped: bool,
    /// The source's configured stand-in data, when it failed.
    pub fallback: Option<serde_json::Value>,
}

/// A failed call, with the sources that had finished by then (for the log).
#[derive(Debug)]
pub struct Failure {
    pub error: Error,
    pub finished: Vec<Outcome>,
}

/// One source to call: the source, whether it is optional, its rendered request.
pub type Dispatch<'a> = (&'a Arc<Source>, bool, Prepared);

/// How a call's sources are run and judged.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub mode: Mode,
    /// Fewer successful sources than this (at most the call's number of
    /// sources) fail the call, whatever the mode.
    pub min_success: usize,
    pub deadline: Deadline,
}

/// Calls every source concurrently. Results come back in the order given.
pub async fn run(calls: Vec<Dispatch<'_>>, policy: Policy) -> Result<Vec<Outcome>, Failure> {
    let Policy {
        mode,
        min_success,
        deadline,
    } = policy;
    let started = Instant::now();
    let mut slots: Vec<Option<Outcome>> = calls.iter().map(|_| None).collect();
    let mut pending: FuturesUnordered<_> = calls
        .into_iter()
        .enumerate()
        .map(|(i, (source, optional, prepared))| async move {
            let t0 = Instant::now();
            let Fetched {
                result,
                sent,
                coalesced,
            } = source.fetch(prepared, deadline).await;
            let attempts = match &result {
                // Nothing was sent: the request could not be built, or the
                // source was at capacity.
                Err(
                    SourceError::Request { .. }
                    | SourceError::Schema(_)
                    | SourceError::Overloaded(_)
                    | SourceError::CircuitOpen { .. },
                ) if sent <= 1 => 0,
                _ => sent,
            };
            let skipped = matches!(result, Err(SourceError::CircuitOpen { .. }));
            let fallback = match &result {
                Err(_) => source.spec.fallback.clone(),
                Ok(_) => None,
            };
            let outcome = Outcome {
                source: source.name().clone(),
                optional,
                result,
                elapsed: t0.elapsed(),
                attempts,
                coalesced,
                skipped,
                fallback,
            };
            (i, outcome)
        })
        .collect();

    let collect = async {
        while let Some((i, outcome)) = pending.next().await {
            // Kept before deciding anything, so the log tells who failed.
            let slot = slots[i].insert(outcome);
            let Err(error) = &slot.result else {
                continue;
            };
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
