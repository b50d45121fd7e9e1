//! gRPC upstreams: one lazily connected HTTP/2 channel per source, requests
//! built from the JSON template against the method's schema, responses
//! turned into JSON. The caller's remaining budget travels as `grpc-timeout`.

use std::sync::Arc;

use prost_reflect::{DynamicMessage, SerializeOptions};
use tokio::sync::OnceCell;
use tonic::{
    Code,
    client::Grpc,
    transport::{Channel, Endpoint},
};

use super::{codec::DynamicCodec, schema};
use crate::{config::GrpcSpec, deadline::Deadline, error::SourceError};

pub struct GrpcUpstream {
    spec: Arc<crate::config::SourceSpec>,
    channel: Channel,
    schema: OnceCell<schema::MethodSchema>,
}

/// Protobuf JSON with the field names of the .proto, and every field present,
/// so merged documents look the same whatever the values.
pub fn json_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
}

impl GrpcUpstream {
    pub fn new(spec: Arc<crate::config::SourceSpec>, grpc: &GrpcSpec) -> Self {
        let channel = Endpoint::from(grpc.endpoint.clone())
            .tcp_nodelay(true)
            .connect_lazy();
        let schema = OnceCell::new_with(grpc.schema.clone());
        Self {
            spec,
            channel,
            schema,
        }
    }

    /// Whether `grpc.health.v1.Health/Check` says `service` is SERVING.
    pub async fn check_health(&self, service: &str) -> bool {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        HealthClient::new(self.channel.clone())
            .check(request)
            .await
            .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
    }

    fn grpc(&self) -> &GrpcSpec {
        match &self.spec.kind {
            crate::config::SourceKind::Grpc(g) => g,
            crate::config::SourceKind::Http(_) => unreachable!("built from a gRPC spec"),
        }
    }

    /// The method's schema; learned by reflection once, and not cached on
    /// failure, so an upstream that was down at first use is asked again.
    async fn schema(&self) -> Result<&schema::MethodSchema, SourceError> {
        let grpc = self.grpc();
        // Boxed: the reflection exchange is a large future needed once, and
        // inline it would weigh on every call in flight.
        self.schema
            .get_or_try_init(|| {
                Box::pin(async {
                    let s =
                        schema::resolve(self.channel.clone(), &grpc.service, &grpc.method).await?;
                    schema::check_template(&grpc.request, &s.input).map_err(SourceError::Schema)?;
                    Ok(s)
                })
            })
            .await
    }

    pub async fn call(
        &self,
        request: serde_json::Value,
        deadline: Deadline,
    ) -> Result<serde_json::Value, SourceError> {
        let schema = self.schema().await?;
        let message = DynamicMessage::deserialize(schema.input.clone(), request).map_err(|e| {
            SourceError::Request {
                message: schema.input.full_name().to_owned(),
                detail: e.to_string(),
            }
        })?;
        let mut request = tonic::Request::new(message);
        let budget = deadline.remaining();
        request.set_timeout(budget);
        let limit = self.spec.max_response_bytes;
        let mut grpc = Grpc::new(self.channel.clone()).max_decoding_message_size(limit);
        grpc.ready()
            .await
            .map_err(|e| SourceError::Connect(Arc::from(e)))?;
        let response = grpc
            .unary(
                request,
                self.grpc().path.clone(),
                DynamicCodec::new(schema.output.clone()),
            )
            .await;
        let response = match response {
            Ok(response) => response,
            Err(status) => match status_error(status, limit) {
                // The channel enforces the `grpc-timeout` it sends, from a
                // duration rounded down on the wire: let the deadline itself
                // pass so callers see it expired.
                SourceError::Timeout(_) => {
                    tokio::time::sleep_until(deadline.instant()).await;
                    return Err(SourceError::Timeout(budget));
                }
                other => return Err(other),
            },
        };
        response
            .into_inner()
            .serialize_with_options(serde_json::value::Serializer, &json_options())
            .map_err(|e| SourceError::Decode(e.to_string()))
    }
}

fn status_error(status: tonic::Status, limit: usize) -> SourceError {
    // tonic refuses an oversized message before buffering it, as OUT_OF_RANGE.
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        return SourceError::TooLarge(limit);
    }
    SourceError::from_status(status)
}
