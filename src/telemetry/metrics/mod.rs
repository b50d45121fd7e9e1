//! Prometheus metrics: the families dashboards and alerts are built on
//! (names and labels are a contract), the per-call and per-source handles
//! the hot path records into (an atomic add, no lookup), and at
//! `GET /metrics` the resilience state read from the live gateway
//! ([`state`]) and the process's own ([`process`]).
//!
//! Label values are configured names only (`aggregation`, `source`), the
//! two RPC names and the canonical code names: a caller cannot grow the
//! label set; an unknown aggregation counts as `aggregation="unknown"`.

mod format;
mod process;
mod serve;
mod state;
mod store;

use std::sync::{Arc, OnceLock};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tonic::Code;

pub use self::{
    serve::serve,
    store::{CacheMetrics, CacheResult, StoreMetrics},
};
use crate::error::code_name;

/// Which of the two RPCs a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Aggregate,
    FetchAll,
}

impl Rpc {
    pub fn name(self) -> &'static str {
        match self {
            Self::Aggregate => "Aggregate",
            Self::FetchAll => "FetchAll",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    rpc: &'static str,
    aggregation: Arc<str>,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AggregationLabels {
    rpc: &'static str,
    aggregation: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceCodeLabels {
    source: Arc<str>,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 0.5 ms to 10 s.
fn latency() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// Every family; cheap to clone (each is shared), kept across reloads so
/// counters go on.
#[derive(Clone)]
pub struct Metrics {
    calls: Family<CallLabels, Counter>,
    incomplete: Family<AggregationLabels, Counter>,
    call_duration: Histograms<AggregationLabels>,
    in_flight: Gauge,
    shed: Counter,
    source_requests: Family<SourceCodeLabels, Counter>,
    source_duration: Histograms<SourceLabels>,
    retries: Family<SourceLabels, Counter>,
    hedges: Family<SourceLabels, Counter>,
    source_shed: Family<SourceLabels, Counter>,
    skipped: Family<SourceLabels, Counter>,
    coalesce_wait: Histograms<SourceLabels>,
    build_info: Family<VersionLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    trace_export_failures: Counter,
    store: StoreMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Self {
            calls: Family::default(),
            incomplete: Family::default(),
            call_duration: Family::new_with_constructor(latency),
            in_flight: Gauge::default(),
            shed: Counter::default(),
            source_requests: Family::default(),
            source_duration: Family::new_with_constructor(latency),
            retries: Family::default(),
            hedges: Family::default(),
            source_shed: Family::default(),
            skipped: Family::default(),
            coalesce_wait: Family::new_with_constructor(latency),
            build_info: Family::default(),
            reloads: Family::default(),
            trace_export_failures: Counter::default(),
            store: StoreMetrics::default(),
        };
        metrics
            .build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        metrics
    }
}

impl Metrics {
    /// Registers every family (names without `_total`: the encoder adds it).
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "aggregator_calls",
            "Calls answered, by RPC, aggregation and code.",
            self.calls.clone(),
        );
        registry.register(
            "aggregator_calls_incomplete",
            "Calls answered OK with complete = false.",
            self.incomplete.clone(),
        );
        registry.register(
            "aggregator_call_duration_seconds",
            "Time from a call's arrival to its answer.",
            self.call_duration.clone(),
        );
        registry.register(
            "aggregator_calls_in_flight",
            "Calls being served now.",
            self.in_flight.clone(),
        );
        registry.register(
            "aggregator_calls_shed",
            "Calls refused at max_concurrent_calls.",
            self.shed.clone(),
        );
        registry.register(
            "aggregator_source_requests",
            "Requests sent to a source (retries and hedges included), by code.",
            self.source_requests.clone(),
        );
        registry.register(
            "aggregator_source_request_duration_seconds",
            "Time of each request to a source.",
            self.source_duration.clone(),
        );
        registry.register(
            "aggregator_source_retries",
            "Retries sent to a source.",
            self.retries.clone(),
        );
        registry.register(
            "aggregator_source_hedges",
            "Hedged requests sent to a source.",
            self.hedges.clone(),
        );
        registry.register(
            "aggregator_source_shed",
            "Calls of a source refused at its max_concurrent cap.",
            self.source_shed.clone(),
        );
        registry.register(
            "aggregator_source_skipped",
            "Calls of a source skipped: its circuit was open.",
            self.skipped.clone(),
        );
        registry.register(
            "aggregator_coalesce_wait_seconds",
            "Time callers waited on a request another call had started.",
            self.coalesce_wait.clone(),
        );
        registry.register(
            "aggregator_build_info",
            "The gateway's version; always 1.",
            self.build_info.clone(),
        );
        registry.register(
            "aggregator_config_reloads",
            "Config reloads, by result.",
            self.reloads.clone(),
        );
        registry.register(
            "aggregator_trace_export_failures",
            "Batches of spans the collector did not take (they are dropped).",
            self.trace_export_failures.clone(),
        );
        self.store.register(registry);
    }

    /// The families of caches, rate limits and their store.
    pub fn store(&self) -> StoreMetrics {
        self.store.clone()
    }

    /// Counted by the trace exporter.
    pub fn trace_export_failures(&self) -> Counter {
        self.trace_export_failures.clone()
    }

    /// The handles of one aggregation's calls through `rpc`.
    pub fn calls(&self, rpc: Rpc, aggregation: &Arc<str>) -> CallMetrics {
        let labels = AggregationLabels {
            rpc: rpc.name(),
            aggregation: aggregation.clone(),
        };
        CallMetrics {
            calls: self.calls.clone(),
            codes: Default::default(),
            incomplete: self.incomplete.get_or_create(&labels).clone(),
            duration: self.call_duration.get_or_create(&labels).clone(),
            in_flight: self.in_flight.clone(),
            labels,
        }
    }

    /// The handles of one source.
    pub fn source(&self, source: &Arc<str>) -> SourceMetrics {
        let labels = SourceLabels {
            source: source.clone(),
        };
        SourceMetrics {
            requests: self.source_requests.clone(),
            codes: Default::default(),
            duration: self.source_duration.get_or_create(&labels).clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            hedges: self.hedges.get_or_create(&labels).clone(),
            shed: self.source_shed.get_or_create(&labels).clone(),
            skipped: self.skipped.get_or_create(&labels).clone(),
            coalesce_wait: self.coalesce_wait.get_or_create(&labels).clone(),
            source: source.clone(),
        }
    }

    /// A call refused at the gateway-wide cap.
    pub fn shed(&self) {
        self.shed.inc();
    }

    /// A config reload tried: `"success"` or `"failure"`.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }
}

/// A counter per gRPC code, made on first use so that only codes seen show.
type ByCode = [OnceLock<Counter>; 17];

/// One aggregation's calls through one RPC.
pub struct CallMetrics {
    calls: Family<CallLabels, Counter>,
    codes: ByCode,
    labels: AggregationLabels,
    incomplete: Counter,
    duration: Histogram,
    in_flight: Gauge,
}

impl CallMetrics {
    /// A call has arrived; the guard records it when dropped.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight {
            metrics: self,
            started: tokio::time::Instant::now(),
            answer: None,
        }
    }
}

/// A call being served; records how it ended when dropped (CANCELLED if
/// the caller left before it was answered).
pub struct InFlight<'a> {
    metrics: &'a CallMetrics,
    started: tokio::time::Instant,
    answer: Option<(Code, bool)>,
}

impl InFlight<'_> {
    /// How the call ended: its code, and whether every source succeeded.
    pub fn answered(&mut self, code: Code, complete: bool) {
        self.answer = Some((code, complete));
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let m = self.metrics;
        m.in_flight.dec();
        m.duration.observe(self.started.elapsed().as_secs_f64());
        let (code, complete) = self.answer.unwrap_or((Code::Cancelled, true));
        counter(&m.codes, code, || {
            m.calls.get_or_create(&CallLabels {
                rpc: m.labels.rpc,
                aggregation: m.labels.aggregation.clone(),
                code: code_name(code),
            })
        })
        .inc();
        if code == Code::Ok && !complete {
            m.incomplete.inc();
        }
    }
}

fn counter<F, G>(codes: &ByCode, code: Code, make: F) -> &Counter
where
    F: FnOnce() -> G,
    G: std::ops::Deref<Target = Counter>,
{
    let slot = &codes[(code as usize).min(16)];
    slot.get_or_init(|| make().clone())
}

/// One source's handles.
pub struct SourceMetrics {
    requests: Family<SourceCodeLabels, Counter>,
    codes: ByCode,
    source: Arc<str>,
    duration: Histogram,
    retries: Counter,
    hedges: Counter,
    shed: Counter,
    skipped: Counter,
    coalesce_wait: Histogram,
}

impl SourceMetrics {
    /// One request sent and answered (or failed) with `code` after `seconds`.
    pub fn request(&self, code: Code, seconds: f64) {
        self.duration.observe(seconds);
        counter(&self.codes, code, || {
            self.requests.get_or_create(&SourceCodeLabels {
                source: self.source.clone(),
                code: code_name(code),
            })
        })
        .inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    pub fn hedged(&self) {
        self.hedges.inc();
    }

    pub fn shed(&self) {
        self.shed.inc();
    }

    pub fn skipped(&self) {
        self.skipped.inc();
    }

    /// A caller that joined a shared request waited this long for it.
    pub fn coalesce_waited(&self, seconds: f64) {
        self.coalesce_wait.observe(seconds);
    }
}
