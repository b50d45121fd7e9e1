//! The `aggregator.v1.Aggregator` handlers: protobuf in, domain call, protobuf out.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prost_types::{ListValue, Struct, Value, value::Kind};
use tonic::{Request, Response, Status};

use crate::{
    cache::Cached,
    config::Mode,
    deadline::Deadline,
    error::{Error, status::MAX_MESSAGE_BYTES, truncate},
    fanout::Outcome,
    gateway::{Call, Gateway, Shape},
    pb::aggregator::v1::{
        self as pb, AggregateRequest, AggregateResponse, FetchAllRequest, FetchAllResponse,
        SourceResult,
    },
    request_id,
    telemetry::metrics::Rpc,
};

pub struct AggregatorApi {
    /// The gateway in force; swapped on reload.
    gateway: Arc<ArcSwap<Gateway>>,
}

impl AggregatorApi {
    pub fn new(gateway: Arc<ArcSwap<Gateway>>) -> Self {
        Self { gateway }
    }
}

/// What a call brings besides its message: the deadline the server's edge
/// stamped on arrival, the caller's metadata and the call's request id.
struct Caller {
    deadline: Option<Deadline>,
    metadata: http::HeaderMap,
    request_id: http::HeaderValue,
}

impl Caller {
    fn from<T>(request: Request<T>) -> (Self, T) {
        let (metadata, extensions, message) = request.into_parts();
        let mut metadata = metadata.into_headers();
        let request_id = request_id::take(&mut metadata);
        let caller = Self {
            deadline: extensions.get::<Deadline>().copied(),
            metadata,
            request_id,
        };
        (caller, message)
    }

    #[allow(clippy::too_many_arguments)]
    fn call<'a>(
        &'a self,
        rpc: Rpc,
        aggregation: &'a str,
        params: &'a crate::template::Params,
        payload: &'a Payload,
        sources: &'a [String],
        mode: Option<Mode>,
    ) -> Call<'a> {
        Call {
            rpc,
            aggregation,
            params,
            payload: payload.json.as_ref(),
            payload_bytes: payload.bytes,
            metadata: &self.metadata,
            // Visible ASCII by construction.
            request_id: self.request_id.to_str().unwrap_or_default(),
            sources,
            mode,
            deadline: self.deadline,
        }
    }

    /// The answer, success or failure, carrying the request id back.
    fn answer<T>(&self, result: Result<T, Status>) -> Result<Response<T>, Status> {
        let id = tonic::metadata::MetadataValue::try_from(self.request_id.as_bytes()).ok();
        match result {
            Ok(message) => {
                let mut response = Response::new(message);
                if let Some(id) = id {
                    response.metadata_mut().insert(X_REQUEST_ID, id);
                }
                Ok(response)
            }
            Err(mut status) => {
                if let Some(id) = id {
                    status.metadata_mut().insert(X_REQUEST_ID, id);
                }
                Err(status)
            }
        }
    }
}

const X_REQUEST_ID: &str = "x-request-id";

#[tonic::async_trait]
impl pb::aggregator_server::Aggregator for AggregatorApi {
    async fn aggregate(
        &self,
        request: Request<AggregateRequest>,
    ) -> Result<Response<AggregateResponse>, Status> {
        let (caller, req) = Caller::from(request);
        let gateway = self.gateway.load_full();
        let payload = Payload::new(req.payload, gateway.max_payload_bytes);
        let call = caller.call(
            Rpc::Aggregate,
            &req.aggregation,
            &req.params,
            &payload,
            &[],
            None,
        );
        let answer = gateway.call(call, merge).await;
        caller.answer(answer.map_err(|e| e.to_status()))
    }

    async fn fetch_all(
        &self,
        request: Request<FetchAllRequest>,
    ) -> Result<Response<FetchAllResponse>, Status> {
        let (caller, req) = Caller::from(request);
        let mode = match pb::Mode::try_from(req.mode) {
            Ok(pb::Mode::Unspecified) => None,
            Ok(pb::Mode::FailFast) => Some(Mode::FailFast),
            Ok(pb::Mode::BestEffort) => Some(Mode::BestEffort),
            Err(_) => {
                return caller.answer(Err(Status::invalid_argument(format!(
                    "unknown mode {}: expected MODE_UNSPECIFIED, MODE_FAIL_FAST or MODE_BEST_EFFORT",
                    req.mode
                ))));
            }
        };
        // The config in force when the call arrived answers it to the end.
        let gateway = self.gateway.load_full();
        let payload = Payload::new(req.payload, gateway.max_payload_bytes);
        let call = caller.call(
            Rpc::FetchAll,
            &req.aggregation,
            &req.params,
            &payload,
            &req.sources,
            mode,
        );
        let answer = gateway.call(call, fetch_all).await;
        caller.answer(answer.map_err(|e| e.to_status()))
    }
}

/// The caller's payload as JSON, with its encoded size.
struct Payload {
    json: Option<serde_json::Value>,
    bytes: usize,
}

impl Payload {
    /// Converted only when within `max` bytes: a larger one is refused by
    /// the gateway, by its size.
    fn new(payload: Option<Struct>, max: usize) -> Self {
        let bytes = payload.as_ref().map_or(0, prost::Message::encoded_len);
        let json = payload
            .filter(|_| bytes <= max)
            .map(|s| from_value(Value::from(Kind::StructValue(s))));
        Self { json, bytes }
    }
}

/// The FetchAll answer: one result per source, its data in it. Takes the
/// data out of `outcomes`.
fn fetch_all(outcomes: &mut [Outcome], _: &Shape) -> Result<FetchAllResponse, Error> {
    let results: Vec<SourceResult> = outcomes
        .iter_mut()
        .map(|o| SourceResult {
            data: o.take_data().map(to_value),
            ..source_result(o)
        })
        .collect();
    Ok(FetchAllResponse {
        complete: results.iter().all(|r| r.code == 0),
        results,
    })
}

/// The Aggregate answer: the sources' data shaped into one document, and
/// every source's result without data. Takes the data out of `outcomes`.
pub fn merge(outcomes: &mut [Outcome], shape: &Shape) -> Result<AggregateResponse, Error> {
    let document = shape.document(outcomes)?;
    let sources: Vec<SourceResult> = outcomes.iter().map(source_result).collect();
    Ok(AggregateResponse {
        data: Some(Struct {
            fields: document
                .into_iter()
                .map(|(k, v)| (k, to_value(v)))
                .collect(),
        }),
        complete: sources.iter().all(|r| r.code == 0),
        sources,
    })
}

/// The result without data. A fallback may stand in for the data; the
/// code still tells the truth.
fn source_result(outcome: &Outcome) -> SourceResult {
    let (code, message) = match (&outcome.result, &outcome.cached) {
        // A stale entry stood in for this failure.
        (Ok(_), Some(Cached { error: Some(e), .. })) => (0, truncate(e, MAX_MESSAGE_BYTES)),
        (Ok(_), _) => (0, String::new()),
        (Err(e), _) => (e.code() as i32, truncate(&e.to_string(), MAX_MESSAGE_BYTES)),
    };
    SourceResult {
        source: outcome.source.to_string(),
        code,
        message,
        data: None,
        elapsed: prost_types::Duration::try_from(outcome.elapsed).ok(),
        attempts: outcome.attempts,
        coalesced: outcome.coalesced,
        skipped: outcome.skipped,
        cached: outcome.cached.is_some(),
        age: (outcome.cached.as_ref()).and_then(|c| prost_types::Duration::try_from(c.age).ok()),
    }
}

/// `google.protobuf.Value` to JSON. Whole numbers within 2^53 become
/// integers (`42`, not `42.0`), as a caller writing `42` meant; NaN and
/// infinities, which JSON cannot hold, become null.
pub fn from_value(value: Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(b),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_992.0 => {
            J::from(n as i64)
        }
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n).map_or(J::Null, J::Number),
        Some(Kind::StringValue(s)) => J::String(s),
        Some(Kind::ListValue(list)) => J::Array(list.values.into_iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => J::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| (k, from_value(v)))
                .collect(),
        ),
    }
}

/// JSON to `google.protobuf.Value`. Numbers become doubles, as in any
/// protobuf Struct: integers beyond 2^53 lose precision.
pub fn to_value(json: serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match json {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Kind::StringValue(s),
        J::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        J::Object(fields) => Kind::StructValue(Struct {
            fields: fields.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}
