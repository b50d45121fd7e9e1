//! The one event per call: which aggregation, the request id, how it ended
//! and what each source came to.

use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    error::code_name,
    fanout::{self, Outcome},
    upstream::Source,
};

/// Emits the one event per call; a call dropped before it finished (the
/// caller cancelled or disconnected) is logged as cancelled.
pub(super) struct CallLog<'a> {
    aggregation: &'a str,
    request_id: &'a str,
    trace_id: Option<&'a str>,
    sources: Vec<Arc<str>>,
    started: Instant,
    done: bool,
}

impl<'a> CallLog<'a> {
    pub(super) fn new(
        aggregation: &'a str,
        request_id: &'a str,
        trace_id: Option<&'a str>,
        selected: impl Iterator<Item = &'a Arc<Source>>,
    ) -> Self {
        Self {
            aggregation,
            request_id,
            trace_id,
            sources: selected.map(|s| s.name().clone()).collect(),
            started: Instant::now(),
            done: false,
        }
    }

    pub(super) fn finish(&mut self, result: Result<&[Outcome], &fanout::Failure>) {
        self.done = true;
        let elapsed_ms = ms(self.started.elapsed());
        match result {
            Ok(outcomes) => {
                let complete = outcomes.iter().all(|o| o.result.is_ok());
                tracing::info!(
                    aggregation = self.aggregation,
                    request_id = self.request_id,
                    trace_id = self.trace_id,
                    outcome = if complete { "complete" } else { "partial" },
                    elapsed_ms,
                    sources = %Summary(&self.sources, outcomes),
                    "aggregation completed"
                );
            }
            Err(f) => tracing::warn!(
                aggregation = self.aggregation,
                request_id = self.request_id,
                trace_id = self.trace_id,
                outcome = "failed",
                code = %code_name(f.error.code()),
                error = %f.error,
                elapsed_ms,
                sources = %Summary(&self.sources, &f.finished),
                "aggregation failed"
            ),
        }
    }
}

impl Drop for CallLog<'_> {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!(
                aggregation = self.aggregation,
                request_id = self.request_id,
                trace_id = self.trace_id,
                outcome = "cancelled",
                elapsed_ms = ms(self.started.elapsed()),
                "aggregation cancelled by the caller"
            );
        }
    }
}

/// Milliseconds, to the microsecond: `4.118`, not `4.1184389999999995`.
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

/// `profile=OK/3.1ms/coalesced orders=UNAVAILABLE/0.4ms/3x slow=cancelled`
/// (`3x`: requests sent, with retries and hedges; `skipped`: circuit open;
/// `cached`: the response cache answered, `stale-if-error` in place of a
/// failure)
struct Summary<'a>(&'a [Arc<str>], &'a [Outcome]);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match self.1.iter().find(|o| &o.source == name) {
                Some(o) => {
                    let code = o
                        .result
                        .as_ref()
                        .err()
                        .map_or(tonic::Code::Ok, |e| e.code());
                    write!(f, "{name}={}/{:.1}ms", code_name(code), ms(o.elapsed))?;
                    // Only what differs from one plain request.
                    if o.attempts > 1 {
                        write!(f, "/{}x", o.attempts)?;
                    }
                    if o.coalesced {
                        f.write_str("/coalesced")?;
                    }
                    if o.skipped {
                        f.write_str("/skipped")?;
                    }
                    match &o.cached {
                        Some(c) if c.error.is_some() => f.write_str("/stale-if-error")?,
                        Some(_) => f.write_str("/cached")?,
                        None => {}
                    }
                }
                None => write!(f, "{name}=cancelled")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SourceError;

    fn outcome(name: &str, result: Result<serde_json::Value, SourceError>) -> Outcome {
        Outcome {
            source: name.into(),
            optional: false,
            result,
            elapsed: Duration::from_micros(3_140),
            attempts: 1,
            coalesced: false,
            skipped: false,
            fallback: None,
            cached: None,
        }
    }

    #[test]
    fn the_call_summary_shows_what_each_source_came_to() {
        let names: Vec<Arc<str>> = ["plain", "retried", "shared", "open", "slow"]
            .map(Arc::from)
            .into();
        let outcomes = [
            outcome("plain", Ok(serde_json::Value::Null)),
            Outcome {
                attempts: 3,
                ..outcome("retried", Err(SourceError::Timeout(Duration::from_secs(1))))
            },
            Outcome {
                coalesced: true,
                ..outcome("shared", Ok(serde_json::Value::Null))
            },
            Outcome {
                skipped: true,
                attempts: 0,
                ..outcome(
                    "open",
                    Err(SourceError::CircuitOpen {
                        source_name: "open".into(),
                        retry_in: Duration::from_secs(1),
                    }),
                )
            },
        ];
        assert_eq!(
            Summary(&names, &outcomes).to_string(),
            "plain=OK/3.1ms retried=DEADLINE_EXCEEDED/3.1ms/3x shared=OK/3.1ms/coalesced \
             open=UNAVAILABLE/3.1ms/skipped slow=cancelled"
        );
    }
}
