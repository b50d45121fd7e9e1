//! The gateway's domain entry point: resolve an aggregation, check the
//! caller's parameters, compute the deadline, fan out, and log the call.

use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    config::{Config, Mode},
    deadline::Deadline,
    error::{Error, code_name},
    fanout::{self, Outcome},
    resilience::bulkhead::Bulkhead,
    template::{Inputs, Params, RenderError},
    upstream::Source,
};

/// Longest parameter value accepted; larger ones are refused, not forwarded.
pub const MAX_PARAM_BYTES: usize = 8 * 1024;

/// The sources and aggregations of a config, with live clients.
pub struct Gateway {
    aggregations: HashMap<Arc<str>, Aggregation>,
    /// Every source, by name.
    sources: Vec<Arc<Source>>,
    /// Active health checks; they stop with the gateway.
    _health_checks: tokio::task::JoinSet<()>,
    /// The gateway-wide cap on calls in flight, if configured.
    calls: Option<Bulkhead>,
}

struct Aggregation {
    name: Arc<str>,
    members: Vec<(Arc<Source>, bool)>,
    mode: Mode,
    min_success: usize,
    timeout: Duration,
}

/// A source whose client cannot be built (its TLS, for one).
#[derive(Debug, thiserror::Error)]
#[error("source '{source_name}': {error}")]
pub struct GatewayError {
    pub source_name: Arc<str>,
    pub error: tonic::transport::Error,
}

/// One call, as the API layer hands it over.
pub struct Call<'a> {
    pub aggregation: &'a str,
    pub params: &'a Params,
    /// The caller's metadata (request headers), its request id included.
    pub metadata: &'a http::HeaderMap,
    pub request_id: &'a str,
    /// A subset of the aggregation's sources; empty means all.
    pub sources: &'a [String],
    /// Overrides the aggregation's configured mode.
    pub mode: Option<Mode>,
    /// The caller's deadline, if it sent one.
    pub deadline: Option<Deadline>,
}

impl Gateway {
    /// Builds one client per source (shared by every aggregation using it).
    /// Must run inside a tokio runtime: gRPC channels spawn their workers.
    pub fn new(config: &Config) -> Result<Self, GatewayError> {
        let sources: HashMap<Arc<str>, Arc<Source>> = config
            .sources
            .iter()
            .map(|spec| {
                let source = Source::new(spec.clone()).map_err(|error| GatewayError {
                    source_name: spec.name.clone(),
                    error,
                })?;
                Ok((spec.name.clone(), Arc::new(source)))
            })
            .collect::<Result<_, GatewayError>>()?;
        let aggregations = config
            .aggregations
            .iter()
            .map(|a| {
                let members = a
                    .members
                    .iter()
                    .map(|(spec, optional)| (sources[&spec.name].clone(), *optional))
                    .collect();
                let agg = Aggregation {
                    name: a.name.clone(),
                    members,
                    mode: a.mode,
                    min_success: a.min_success,
                    timeout: a.timeout,
                };
                (a.name.clone(), agg)
            })
            .collect();
        let mut all: Vec<Arc<Source>> = sources.values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        let mut health_checks = tokio::task::JoinSet::new();
        for source in sources.values() {
            if source.spec.health_check.is_some() {
                health_checks.spawn(source.clone().watch_health());
            }
        }
        Ok(Self {
            aggregations,
            sources: all,
            calls: config.server.max_concurrent_calls.map(Bulkhead::new),
            _health_checks: health_checks,
        })
    }

    pub async fn call(&self, call: Call<'_>) -> Result<Vec<Outcome>, Error> {
        let agg = self
            .aggregations
            .get(call.aggregation)
            .ok_or_else(|| Error::UnknownAggregation(shown(call.aggregation)))?;
        let selected = agg.select(call.sources)?;
        let mut dispatch = Vec::with_capacity(selected.len());
        let inputs = Inputs::new(call.params, call.metadata);
        for (source, optional) in &selected {
            check_params(source, call.params)?;
            dispatch.push((source, *optional, source.prepare(&inputs)?));
        }
        let deadline = match call.deadline {
            Some(d) => d.cap(agg.timeout),
            None => Deadline::after(agg.timeout),
        };
        let _slot = match &self.calls {
            Some(calls) => Some(calls.enter(deadline).await.map_err(|full| {
                if deadline.is_expired() {
                    return Error::DeadlineExceeded(full.waited);
                }
                // Per call, so not at WARN: a flood would flood the log too.
                tracing::debug!(aggregation = %agg.name, %full, "call shed: gateway at capacity");
                Error::Overloaded(full)
            })?),
            None => None,
        };
        let mut log = CallLog::new(&agg.name, call.request_id, &selected);
        let policy = fanout::Policy {
            mode: call.mode.unwrap_or(agg.mode),
            min_success: agg.min_success,
            deadline,
        };
        let result = fanout::run(dispatch, policy).await;
        log.finish(&result);
        result.map_err(|f| f.error)
    }
}

impl Gateway {
    pub fn sources(&self) -> &[Arc<Source>] {
        &self.sources
    }

    /// Each aggregation's name with the open-state of its required sources'
    /// circuit breakers (those that have one).
    pub fn required_breakers(&self) -> Vec<(Arc<str>, Vec<tokio::sync::watch::Receiver<bool>>)> {
        let mut out: Vec<_> = self
            .aggregations
            .values()
            .map(|agg| {
                let breakers = agg
                    .members
                    .iter()
                    .filter(|(_, optional)| !optional)
                    .filter_map(|(source, _)| source.breaker().map(|b| b.watch()))
                    .collect();
                (agg.name.clone(), breakers)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Aggregation {
    /// The requested subset in the aggregation's order; all when none is named.
    fn select(&self, names: &[String]) -> Result<Vec<(Arc<Source>, bool)>, Error> {
        if let Some(unknown) = names
            .iter()
            .find(|n| !self.members.iter().any(|(s, _)| &**s.name() == n.as_str()))
        {
            return Err(Error::UnknownSource {
                aggregation: self.name.clone(),
                source_name: shown(unknown),
            });
        }
        Ok(self
            .members
            .iter()
            .filter(|(s, _)| names.is_empty() || names.iter().any(|n| n == &**s.name()))
            .cloned()
            .collect())
    }
}

/// A name the caller sent, as the gateway echoes it: never more than a
/// screenful, whatever was sent.
fn shown(name: &str) -> String {
    crate::error::truncate(name, 128)
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

/// Emits the one event per call; a call dropped before it finished (the
/// caller cancelled or disconnected) is logged as cancelled.
struct CallLog<'a> {
    aggregation: &'a str,
    request_id: &'a str,
    sources: Vec<Arc<str>>,
    started: Instant,
    done: bool,
}

impl<'a> CallLog<'a> {
    fn new(aggregation: &'a str, request_id: &'a str, selected: &[(Arc<Source>, bool)]) -> Self {
        Self {
            aggregation,
            request_id,
            sources: selected.iter().map(|(s, _)| s.name().clone()).collect(),
            started: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, result: &Result<Vec<Outcome>, fanout::Failure>) {
        self.done = true;
        let elapsed_ms = ms(self.started.elapsed());
        match result {
            Ok(outcomes) => {
                let complete = outcomes.iter().all(|o| o.result.is_ok());
                tracing::info!(
                    aggregation = self.aggregation,
                    request_id = self.request_id,
                    outcome = if complete { "complete" } else { "partial" },
                    elapsed_ms,
                    sources = %Summary(&self.sources, outcomes),
                    "aggregation completed"
                );
            }
            Err(f) => tracing::warn!(
                aggregation = self.aggregation,
                request_id = self.request_id,
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
/// (`3x`: requests sent, with retries and hedges; `skipped`: circuit open)
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
