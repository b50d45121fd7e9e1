//! The `aggregator.v1.Aggregator` handlers: protobuf in, domain call, protobuf out.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prost_types::{ListValue, Struct, Value, value::Kind};
use tonic::{Request, Response, Status};

use crate::{
    config::Mode,
    deadline::Deadline,
    error::{status::MAX_MESSAGE_BYTES, truncate},
    fanout::Outcome,
    gateway::{Call, Gateway},
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

    fn call<'a>(
        &'a self,
        rpc: Rpc,
        aggregation: &'a str,
        params: &'a crate::template::Params,
        sources: &'a [String],
        mode: Option<Mode>,
    ) -> Call<'a> {
        Call {
            rpc,
            aggregation,
            params,
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
        let call = caller.call(Rpc::Aggregate, &req.aggregation, &req.params, &[], None);
        let gateway = self.gateway.load_full();
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
        let call = caller.call(
            Rpc::FetchAll,
            &req.aggregation,
            &req.params,
            &req.sources,
            mode,
        );
        // The config in force when the call arrived answers it to the end.
        let gateway = self.gateway.load_full();
        let answer = gateway.call(call, fetch_all).await;
        caller.answer(answer.map_err(|e| e.to_status()))
    }
}

/// The FetchAll answer: one result per source, its data in it. Takes the
/// data out of `outcomes`.
fn fetch_all(outcomes: &mut [Outcome]) -> FetchAllResponse {
    let results: Vec<SourceResult> = outcomes
        .iter_mut()
        .map(|o| {
            let (mut result, value) = source_result(o);
            result.data = value;
            result
        })
        .collect();
    FetchAllResponse {
        complete: results.iter().all(|r| r.code == 0),
        results,
    }
}

/// The Aggregate answer: each successful source's data under its name, and
/// every source's result without data. Takes the data out of `outcomes`.
pub fn merge(outcomes: &mut [Outcome]) -> AggregateResponse {
    let mut data = Struct::default();
    let mut sources = Vec::with_capacity(outcomes.len());
    let mut complete = true;
    for outcome in outcomes {
        let (result, value) = source_result(outcome);
        complete &= result.code == 0;
        if let Some(value) = value {
            data.fields.insert(result.source.clone(), value);
        }
        sources.push(result);
    }
    AggregateResponse {
        data: Some(data),
        complete,
        sources,
    }
}

/// The result without data, and the data (taken out) as a protobuf value.
fn source_result(outcome: &mut Outcome) -> (SourceResult, Option<Value>) {
    let (code, message, value) = match &mut outcome.result {
        Ok(json) => (0, String::new(), Some(to_value(std::mem::take(json)))),
        // A fallback stands in for the data; the code still tells the truth.
        Err(e) => (
            e.code() as i32,
            truncate(&e.to_string(), MAX_MESSAGE_BYTES),
            outcome.fallback.take().map(to_value),
        ),
    };
    let result = SourceResult {
        source: outcome.source.to_string(),
        code,
        message,
        data: None,
        elapsed: prost_types::Duration::try_from(outcome.elapsed).ok(),
        attempts: outcome.attempts,
        coalesced: outcome.coalesced,
        skipped: outcome.skipped,
    };
    (result, value)
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
