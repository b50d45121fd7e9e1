//! One source of a call: its requests, rendered at the start of the call or
//! once the sources it reads have finished, and the future that sends them:
//! one request, or one per element of its `for_each` list, at most
//! `max_parallel` at a time, results in the list's order.

use std::sync::Arc;

use futures_util::{StreamExt, stream};
use tokio::time::Instant;

use super::Outcome;
use crate::{
    cache::Cached,
    deadline::Deadline,
    error::SourceError,
    telemetry::traces::CallSpan,
    template::{Inputs, Values, refs::type_name},
    upstream::{Fetched, Prepared, Source},
};

/// A source of the call, as the graph runs it.
pub struct Node<'a> {
    pub source: &'a Arc<Source>,
    pub optional: bool,
    /// The nodes it reads (indices into the call's nodes).
    pub deps: Vec<usize>,
    pub start: Start,
}

/// What a node starts from.
// Unboxed: `Ready(One(..))` is what nearly every call makes, and boxing it
// would cost an allocation per source per call.
#[allow(clippy::large_enum_variant)]
pub enum Start {
    /// Rendered at the start of the call: it reads no other source.
    Ready(Requests),
    /// Failed before anything was sent (a `for_each` list too long).
    Failed(SourceError),
    /// Rendered once the sources it reads have finished.
    Later,
}

/// A source's rendered requests for one call.
#[allow(clippy::large_enum_variant)]
pub enum Requests {
    One(Prepared),
    /// One per element of its `for_each` list, in order.
    Each(Vec<Prepared>),
}

/// How requests are rendered: the caller's inputs, and the trace they go under.
#[derive(Clone, Copy)]
pub struct Renderer<'a> {
    pub inputs: Inputs<'a>,
    pub span: Option<&'a CallSpan>,
    pub aggregation: &'a Arc<str>,
}

impl Renderer<'_> {
    /// Renders `source`'s requests, references reading `sources` (the
    /// results of the sources it reads).
    pub fn render(
        &self,
        source: &Source,
        sources: &[(&str, &serde_json::Value)],
    ) -> Result<Requests, SourceError> {
        let values = Values {
            sources,
            ..self.inputs.values
        };
        let inputs = self.inputs.with_values(values);
        let prepare = |inputs: &Inputs| {
            let prepared = source.prepare(inputs)?;
            Ok(prepared.traced(self.span, self.aggregation))
        };
        let Some(each) = &source.spec.for_each else {
            return prepare(&inputs)
                .map(Requests::One)
                .map_err(SourceError::Render);
        };
        let from_caller = each.from_caller();
        let list = values.resolve(&each.list).map_err(SourceError::Render)?;
        let items = list.as_array().ok_or_else(|| SourceError::NotAList {
            list: each.list.display.clone(),
            found: type_name(list),
            from_caller,
        })?;
        if items.len() > each.max_items {
            return Err(SourceError::TooManyItems {
                list: each.list.display.clone(),
                len: items.len(),
                max: each.max_items,
                from_caller,
            });
        }
        items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let values = Values {
                    item: Some(item),
                    ..values
                };
                prepare(&inputs.with_values(values)).map_err(|e| SourceError::Item {
                    index,
                    error: Box::new(SourceError::Render(e)),
                    from_caller,
                })
            })
            .collect::<Result<_, _>>()
            .map(Requests::Each)
    }
}

/// Runs one node to its outcome; `i` is its index in the call.
pub async fn run(
    i: usize,
    source: &Arc<Source>,
    optional: bool,
    start: Result<Requests, SourceError>,
    deadline: Deadline,
) -> (usize, Outcome) {
    let t0 = Instant::now();
    let (result, attempts, coalesced, cached) = match start {
        Err(error) => (Err(error), 0, false, None),
        Ok(Requests::One(prepared)) => fetch(source, prepared, deadline).await,
        // Boxed: a list's future is twice a single request's, and inline it
        // would weigh on every source of every call in flight.
        Ok(Requests::Each(requests)) => Box::pin(each(source, requests, deadline)).await,
    };
    let result = result.and_then(|value| match &source.spec.transform {
        None => Ok(value),
        Some(filter) => filter
            .apply(&value, source.spec.max_response_bytes, "max_response_bytes")
            .map_err(|detail| SourceError::Transform {
                filter: filter.text.clone(),
                detail,
            }),
    });
    let skipped = matches!(&result, Err(e) if e.is_skip()) && attempts == 0;
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
        cached,
    };
    (i, outcome)
}

type Fetch = (
    Result<serde_json::Value, SourceError>,
    u32,
    bool,
    Option<Cached>,
);

async fn fetch(source: &Arc<Source>, prepared: Prepared, deadline: Deadline) -> Fetch {
    let Fetched {
        result,
        sent,
        coalesced,
        cached,
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
    (result, attempts, coalesced, cached)
}

/// Every item's request, `max_parallel` at a time. The first failure, in
/// time, fails the source and drops (cancels) the requests still in flight,
/// which count as sent. The result is an array in the list's order, whose
/// JSON may take at most the source's `max_response_bytes` in all.
async fn each(source: &Arc<Source>, requests: Vec<Prepared>, deadline: Deadline) -> Fetch {
    let (max_parallel, from_caller) = source
        .spec
        .for_each
        .as_ref()
        .map_or((1, false), |e| (e.max_parallel, e.from_caller()));
    let max_bytes = source.spec.max_response_bytes;
    let total = requests.len();
    let mut slots: Vec<Option<serde_json::Value>> = vec![None; total];
    let (mut attempts, mut coalesced, mut bytes, mut done) = (0u32, false, 0usize, 0usize);
    // Cached only if every item was: the oldest item's age, and the first
    // failure an item stood in for.
    let mut cached = (total > 0).then_some(Cached {
        age: std::time::Duration::ZERO,
        error: None,
    });
    let mut items = stream::iter(requests.into_iter().enumerate())
        .map(|(index, prepared)| async move { (index, fetch(source, prepared, deadline).await) })
        .buffer_unordered(max_parallel);
    let mut started = max_parallel.min(total);
    while let Some((index, (result, sent, shared, item_cached))) = items.next().await {
        attempts = attempts.saturating_add(sent);
        coalesced |= shared;
        cached = match (cached, item_cached) {
            (Some(all), Some(item)) => Some(Cached {
                age: all.age.max(item.age),
                error: all.error.or(item.error),
            }),
            _ => None,
        };
        done += 1;
        let error = match result {
            Ok(value) => {
                bytes = bytes.saturating_add(json_len(&value));
                if bytes <= max_bytes {
                    slots[index] = Some(value);
                    started = (started + 1).min(total);
                    continue;
                }
                // The list as a whole is the source's response.
                SourceError::Expanded(max_bytes)
            }
            Err(error) => SourceError::Item {
                index,
                error: Box::new(error),
                from_caller,
            },
        };
        // The requests in flight now are dropped, but were sent.
        let in_flight = u32::try_from(started - done).unwrap_or(u32::MAX);
        let attempts = attempts.saturating_add(in_flight);
        return (Err(error), attempts, coalesced, None);
    }
    let results = slots.into_iter().flatten().collect();
    let results = Ok(serde_json::Value::Array(results));
    (results, attempts, coalesced, cached)
}

/// The length of `value` as compact JSON, without writing it out.
fn json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}
