//! The resilience state of every source, read from the gateway in force at
//! each scrape: what request coalescing did, whether its circuit is open and
//! how many requests its bulkhead holds. Nothing is kept twice.

use std::{fmt, sync::Arc};

use arc_swap::ArcSwap;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use crate::{gateway::Gateway, upstream::Source};

/// Reads every source's state at scrape time.
pub struct Sources(pub Arc<ArcSwap<Gateway>>);

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sources")
    }
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let gateway = self.0.load();
        let sources = gateway.sources();
        type Read = fn(&Source) -> Option<u64>;
        let counters: [(&str, &str, Read); 2] = [
            (
                "aggregator_coalesce_upstream_calls",
                "Shared upstream requests started by request coalescing.",
                |s| s.coalescing().map(|c| c.calls),
            ),
            (
                "aggregator_coalesce_joined_calls",
                "Calls that joined an identical request already in flight.",
                |s| s.coalescing().map(|c| c.coalesced),
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for source in sources {
                if let Some(value) = read(source) {
                    let labels = [("source", &*source.spec.name)];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let gauges: [(&str, &str, Read); 5] = [
            (
                "aggregator_cache_entries",
                "Entries held by the source's response cache in this process (memory store).",
                Source::cache_entries,
            ),
            (
                "aggregator_coalesce_keys_in_flight",
                "Distinct coalesced requests in flight now.",
                |s| s.coalescing().map(|c| c.in_flight as u64),
            ),
            (
                "aggregator_coalesce_peak_waiters",
                "The most callers that ever waited on one coalesced request.",
                |s| s.coalescing().map(|c| c.peak_waiters as u64),
            ),
            (
                "aggregator_circuit_open",
                "1 while the source's circuit breaker is open.",
                |s| s.breaker().map(|b| u64::from(b.is_open())),
            ),
            (
                "aggregator_source_requests_in_flight",
                "Requests holding a slot of the source's max_concurrent cap.",
                |s| s.in_flight().map(|n| n as u64),
            ),
        ];
        for (name, help, read) in gauges {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for source in sources {
                if let Some(value) = read(source) {
                    let labels = [("source", &*source.spec.name)];
                    ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
