//! The gateway's domain entry point: resolve an aggregation, check the
//! caller's parameters, compute the deadline, fan out, and log the call.

use std::{collections::HashMap, sync::Arc};

use tonic::Code;

mod aggregation;
mod log;
mod shape;

pub use self::shape::Shape;
use self::{aggregation::Aggregation, log::CallLog};
use crate::{
    config::{Config, Mode},
    deadline::Deadline,
    error::Error,
    fanout::{self, Outcome, Renderer},
    ratelimit::RateLimits,
    resilience::bulkhead::Bulkhead,
    store::Store,
    telemetry::{
        metrics::{CallMetrics, Metrics, Rpc},
        traces::{CallSpan, Tracing, trace_id_of},
    },
    template::{Inputs, Params, Values},
    upstream::Source,
};

pub use self::aggregation::MAX_PARAM_BYTES;

/// The sources and aggregations of a config, with live clients.
pub struct Gateway {
    aggregations: HashMap<Arc<str>, Aggregation>,
    /// Every source, by name.
    sources: Vec<Arc<Source>>,
    /// Active health checks; they stop with the gateway.
    _health_checks: tokio::task::JoinSet<()>,
    /// The gateway-wide cap on calls in flight, if configured.
    calls: Option<Bulkhead>,
    metrics: Metrics,
    /// Calls naming no configured aggregation, by RPC.
    unknown: [CallMetrics; 2],
    tracing: Option<Tracing>,
    /// Where caches and rate limits keep state.
    store: Store,
    rate_limits: RateLimits,
    /// The largest answer to send (`[server] max_answer_bytes`).
    pub max_answer_bytes: usize,
    /// The largest payload a call may bring (`[server] max_payload_bytes`).
    pub max_payload_bytes: usize,
}

/// What a valid config may still fail at: a source whose client cannot be
/// built (its TLS, for one), or the store.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("`sources.{source_name}`: cannot build its client: {error}")]
    Client {
        source_name: Arc<str>,
        error: tonic::transport::Error,
    },
    #[error("`server.store`: {0}")]
    Store(#[from] redis::RedisError),
}

/// One call, as the API layer hands it over.
pub struct Call<'a> {
    pub rpc: Rpc,
    pub aggregation: &'a str,
    pub params: &'a Params,
    /// The caller's `payload`, as JSON, and its encoded size.
    pub payload: Option<&'a serde_json::Value>,
    pub payload_bytes: usize,
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
    pub fn new(config: &Config, metrics: &Metrics) -> Result<Self, GatewayError> {
        Self::build(config, metrics, None, None)
    }

    /// [`Self::new`], keeping from `previous` each source whose definition
    /// is the same: its connections, breaker, retry budget and coalescing
    /// state go on as they were.
    pub fn build(
        config: &Config,
        metrics: &Metrics,
        tracing: Option<Tracing>,
        previous: Option<&Gateway>,
    ) -> Result<Self, GatewayError> {
        let server = &config.server;
        let store = match previous.map(|p| &p.store) {
            Some(old) if old.is(server.store.as_deref(), server.store_timeout) => old.clone(),
            _ => Store::open(
                server.store.as_deref(),
                server.store_timeout,
                metrics.store(),
            )?,
        };
        let kept = |spec: &Arc<crate::config::SourceSpec>| {
            previous?
                .sources
                .iter()
                .find(|s| s.name() == &spec.name && s.spec.definition == spec.definition)
                .cloned()
        };
        let sources: HashMap<Arc<str>, Arc<Source>> = config
            .sources
            .iter()
            .map(|spec| {
                let source = match kept(spec) {
                    Some(source) => source,
                    None => Arc::new(
                        Source::new(spec.clone(), metrics.source(&spec.name), &store).map_err(
                            |error| GatewayError::Client {
                                source_name: spec.name.clone(),
                                error,
                            },
                        )?,
                    ),
                };
                Ok((spec.name.clone(), source))
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
                    deps: a.deps.clone(),
                    landing: a.landing.clone(),
                    transform: a.transform.clone(),
                    mode: a.mode,
                    min_success: a.min_success,
                    timeout: a.timeout,
                    metrics: [Rpc::Aggregate, Rpc::FetchAll].map(|rpc| metrics.calls(rpc, &a.name)),
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
            // The same cap keeps its slots: calls in flight across a reload
            // still count against it.
            calls: match (
                previous.and_then(|p| p.calls.as_ref()),
                config.server.max_concurrent_calls,
            ) {
                (Some(old), Some(limit)) if old.limit() == limit => Some(old.clone()),
                (_, limit) => limit.map(Bulkhead::new),
            },
            _health_checks: health_checks,
            unknown: [Rpc::Aggregate, Rpc::FetchAll]
                .map(|rpc| metrics.calls(rpc, &Arc::from("unknown"))),
            metrics: metrics.clone(),
            rate_limits: RateLimits::new(
                &config.rate_limits,
                &store,
                previous.map(|p| &p.rate_limits),
            ),
            store,
            tracing,
            max_answer_bytes: config.server.max_answer_bytes,
            max_payload_bytes: config.server.max_payload_bytes,
        })
    }

    /// Serves `call`; `answer` makes the RPC's answer from the outcomes,
    /// taking their data out. An answer over `max_answer_bytes` is an error,
    /// counted, logged and traced as such.
    pub async fn call<T: prost::Message>(
        &self,
        call: Call<'_>,
        answer: impl FnOnce(&mut [Outcome], &Shape) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let agg = self.aggregations.get(call.aggregation);
        let rpc = call.rpc as usize;
        let metrics = agg.map_or(&self.unknown[rpc], |a| &a.metrics[rpc]);
        let mut flight = metrics.start();
        let result = match agg {
            Some(agg) => self.call_in(agg, call, answer).await,
            None => Err(Error::UnknownAggregation(shown(call.aggregation))),
        };
        match result {
            Ok((answer, outcomes)) => {
                flight.answered(Code::Ok, outcomes.iter().all(|o| o.result.is_ok()));
                Ok(answer)
            }
            Err(error) => {
                flight.answered(error.code(), false);
                Err(error)
            }
        }
    }

    async fn call_in<T: prost::Message>(
        &self,
        agg: &Aggregation,
        call: Call<'_>,
        answer: impl FnOnce(&mut [Outcome], &Shape) -> Result<T, Error>,
    ) -> Result<(T, Vec<Outcome>), Error> {
        let span =
            (self.tracing.as_ref()).map(|t| t.call_span(call.rpc.name(), &agg.name, call.metadata));
        let trace_id = match &span {
            Some(span) => Some(span.trace_id()),
            None => trace_id_of(call.metadata),
        };
        let result = self
            .fan_out(agg, &call, span.as_ref(), trace_id.as_deref(), answer)
            .await;
        if let Some(span) = &span {
            let outcomes = result.as_ref().map_or(&[][..], |(_, o)| o);
            for o in outcomes {
                let code = o.result.as_ref().err().map_or(Code::Ok, |e| e.code());
                span.source(&o.source, code, o.attempts, o.coalesced, o.skipped);
            }
            let code = result.as_ref().err().map_or(Code::Ok, Error::code);
            span.end(code, call.request_id);
        }
        result
    }

    async fn fan_out<T: prost::Message>(
        &self,
        agg: &Aggregation,
        call: &Call<'_>,
        span: Option<&CallSpan>,
        trace_id: Option<&str>,
        answer: impl FnOnce(&mut [Outcome], &Shape) -> Result<T, Error>,
    ) -> Result<(T, Vec<Outcome>), Error> {
        if call.payload_bytes > self.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                len: call.payload_bytes,
                max: self.max_payload_bytes,
            });
        }
        let selected = agg.select(call.sources)?;
        let values = Values {
            payload: call.payload,
            ..Values::default()
        };
        let renderer = Renderer {
            inputs: Inputs::new(call.params, call.metadata).with_values(values),
            span,
            aggregation: &agg.name,
        };
        let nodes = agg.nodes(&selected, &renderer, call.params)?;
        let deadline = match call.deadline {
            Some(d) => d.cap(agg.timeout),
            None => Deadline::after(agg.timeout),
        };
        // After every check of the call's own inputs: a malformed call is
        // not counted against the caller's quota.
        self.rate_limits
            .check(&agg.name, &renderer.inputs, deadline)
            .await?;
        let _slot = match &self.calls {
            Some(calls) => Some(calls.enter(deadline).await.map_err(|full| {
                if deadline.is_expired() {
                    return Error::DeadlineExceeded(full.waited);
                }
                // Per call, so not at WARN: a flood would flood the log too.
                tracing::debug!(aggregation = %agg.name, %full, "call shed: gateway at capacity");
                self.metrics.shed();
                Error::Overloaded(full)
            })?),
            None => None,
        };
        let mut log = CallLog::new(
            &agg.name,
            call.request_id,
            trace_id,
            selected.iter().map(|(m, _)| &agg.members[*m].0),
        );
        let policy = fanout::Policy {
            mode: call.mode.unwrap_or(agg.mode),
            min_success: agg.min_success,
            deadline,
        };
        let shape = Shape {
            landing: selected.iter().map(|(m, _)| &agg.landing[*m]).collect(),
            transform: agg.transform.as_ref(),
            max_bytes: self.max_answer_bytes,
        };
        let result = fanout::run(nodes, renderer, policy)
            .await
            .and_then(|mut outcomes| {
                let answer = match answer(&mut outcomes, &shape) {
                    Ok(answer) => answer,
                    Err(error) => {
                        return Err(fanout::Failure {
                            error,
                            finished: outcomes,
                        });
                    }
                };
                let (len, max) = (answer.encoded_len(), self.max_answer_bytes);
                if len > max {
                    let error = Error::AnswerTooLarge { len, max };
                    return Err(fanout::Failure {
                        error,
                        finished: outcomes,
                    });
                }
                Ok((answer, outcomes))
            });
        log.finish(result.as_ref().map(|(_, outcomes)| &outcomes[..]));
        result.map_err(|f| f.error)
    }
}

impl Gateway {
    pub fn sources(&self) -> &[Arc<Source>] {
        &self.sources
    }

    /// How many of its sources it carried over from `old`.
    pub fn kept_from(&self, old: &Gateway) -> usize {
        self.sources
            .iter()
            .filter(|s| old.sources.iter().any(|o| Arc::ptr_eq(s, o)))
            .count()
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

/// A name the caller sent, as the gateway echoes it: never more than a
/// screenful, whatever was sent.
pub(super) fn shown(name: &str) -> String {
    crate::error::truncate(name, 128)
}
