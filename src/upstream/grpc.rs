//! gRPC upstreams: one lazily connected HTTP/2 channel per source, requests
//! built from the JSON template against the method's schema, responses
//! turned into JSON within the source's size cap. The caller's remaining
//! budget travels as `grpc-timeout`.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering::Relaxed},
};

use bytes::Bytes;
use prost_reflect::{DynamicMessage, SerializeOptions};
use tonic::{
    Code,
    client::Grpc,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{codec::DynamicCodec, lookup::Lookup, schema};
use crate::{
    config::{GrpcSpec, SourceKind, SourceSpec},
    deadline::Deadline,
    error::SourceError,
};

pub struct GrpcUpstream {
    spec: Arc<SourceSpec>,
    /// Kept for `aggregator check --probe`, which dials a connection of its
    /// own. Boxed: large, and never needed by calls.
    endpoint: Box<Endpoint>,
    /// One per connection (`connections`); calls take them in turn.
    channels: Box<[Channel]>,
    next: AtomicUsize,
    schema: Lookup<schema::MethodSchema>,
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct GrpcRequest {
    /// The rendered JSON as text: what identical calls have in common.
    pub key: String,
    pub body: GrpcBody,
    /// Metadata from the source's templates and the caller's forwarded keys.
    pub metadata: http::HeaderMap,
}

/// Encoded once the method's schema is known, else JSON until the first call
/// has learned it.
#[derive(Debug, Clone)]
pub enum GrpcBody {
    Encoded(Bytes),
    Json(serde_json::Value),
}

/// Protobuf JSON with the field names of the .proto, and every field present,
/// so merged documents look the same whatever the values.
pub fn json_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
}

impl GrpcUpstream {
    /// The channel connects lazily; TLS (for an `https://` endpoint) is
    /// set up now, so a bad configuration fails at startup.
    pub fn new(spec: Arc<SourceSpec>, grpc: &GrpcSpec) -> Result<Self, tonic::transport::Error> {
        let mut endpoint = Endpoint::from(grpc.endpoint.clone()).tcp_nodelay(true);
        if let Some(tls) = &grpc.tls {
            let mut config = ClientTlsConfig::new();
            config = match &tls.ca_pem {
                Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
                None => config.with_native_roots(),
            };
            if let Some((cert, key)) = &tls.identity_pem {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name.to_str());
            }
            endpoint = endpoint.tls_config(config)?;
        }
        Ok(Self {
            spec,
            channels: (0..grpc.connections.max(1))
                .map(|_| endpoint.connect_lazy())
                .collect(),
            next: AtomicUsize::new(0),
            endpoint: Box::new(endpoint),
            schema: Lookup::new(grpc.schema.clone()),
        })
    }

    /// Whether `grpc.health.v1.Health/Check` says `service` is SERVING; the
    /// reason when not.
    pub async fn check_health(&self, service: &str) -> Result<(), String> {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        match HealthClient::new(self.channel().clone())
            .check(request)
            .await
        {
            Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
            Ok(r) => Err(format!(
                "grpc.health.v1 says `{service}` is {:?}",
                ServingStatus::try_from(r.get_ref().status).unwrap_or(ServingStatus::Unknown)
            )),
            Err(status) => Err(format!(
                "grpc.health.v1 Check of `{service}`: {}",
                SourceError::from_status(status)
            )),
        }
    }

    /// The next connection in turn: streams spread evenly over them, so no
    /// single connection carries more than its share of a burst.
    fn channel(&self) -> &Channel {
        let i = self.next.fetch_add(1, Relaxed) % self.channels.len();
        &self.channels[i]
    }

    fn grpc(&self) -> Option<&GrpcSpec> {
        match &self.spec.kind {
            SourceKind::Grpc(g) => Some(g),
            SourceKind::Http(_) => None,
        }
    }

    /// The method's schema, if known yet (descriptors, or a lookup done).
    pub fn known_schema(&self) -> Option<&schema::MethodSchema> {
        self.schema.get()
    }

    /// Dials the upstream (TCP, TLS, HTTP/2 handshake) on a connection of
    /// its own.
    pub async fn connect(&self) -> Result<(), SourceError> {
        match self.endpoint.connect().await {
            Ok(_) => Ok(()),
            Err(e) => Err(SourceError::from_transport(&e)),
        }
    }

    /// The method's schema; learned by reflection on first use, one lookup
    /// at a time and backed off after failures ([`Lookup`]).
    pub async fn schema(&self) -> Result<&schema::MethodSchema, SourceError> {
        let Some(grpc) = self.grpc() else {
            return Err(SourceError::Schema("not a gRPC source".into()));
        };
        // Owned: the lookup runs on a task of its own. Boxed: it is a large
        // future needed once, and inline it would weigh on every call.
        // Lookups are rare: they go over the first connection, leaving the
        // turn of calls alone.
        let (channel, service, method) = (
            self.channels[0].clone(),
            grpc.service.clone(),
            grpc.method.clone(),
        );
        let template = grpc.request.clone();
        self.schema
            .get_or_lookup(move || {
                Box::pin(async move {
                    let s = schema::resolve(channel, &service, &method).await?;
                    schema::check_template(&template, &s.input).map_err(SourceError::Schema)?;
                    Ok(s)
                })
            })
            .await
    }

    pub async fn call(
        &self,
        request: GrpcRequest,
        deadline: Deadline,
    ) -> Result<serde_json::Value, SourceError> {
        let schema = self.schema().await?;
        let path = match self.grpc() {
            Some(g) => g.path.clone(),
            None => return Err(SourceError::Schema("not a gRPC source".into())),
        };
        let GrpcRequest {
            body,
            metadata: request_metadata,
            ..
        } = request;
        let message = match body {
            GrpcBody::Encoded(bytes) => bytes,
            GrpcBody::Json(json) => {
                schema::encode(&schema.input, json).map_err(|detail| SourceError::Request {
                    message: schema.input.full_name().to_owned(),
                    detail,
                })?
            }
        };
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(request_metadata);
        let budget = deadline.remaining();
        request.set_timeout(budget);
        let limit = self.spec.max_response_bytes;
        let mut grpc = Grpc::new(self.channel().clone()).max_decoding_message_size(limit);
        grpc.ready()
            .await
            .map_err(|e| SourceError::Connect(Arc::from(e)))?;
        let response = grpc
            .unary(request, path, DynamicCodec::new(schema.output.clone()))
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
        to_json(&response.into_inner(), limit)
    }
}

/// The answer as JSON, refused beyond `limit` bytes of it: protobuf writes
/// nothing for a default field, JSON here writes every one, so a small
/// answer of many empty sub-messages would otherwise become a huge document.
/// The size is counted first, without building anything.
fn to_json(message: &DynamicMessage, limit: usize) -> Result<serde_json::Value, SourceError> {
    let mut counted = Counter { written: 0, limit };
    let options = json_options();
    let mut counter = serde_json::Serializer::new(&mut counted);
    match message.serialize_with_options(&mut counter, &options) {
        Err(e) if e.is_io() => return Err(SourceError::Expanded(limit)),
        Err(e) => return Err(SourceError::Decode(e.to_string())),
        Ok(()) => {}
    }
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| SourceError::Decode(e.to_string()))
}

/// Counts bytes written, failing past `limit`.
struct Counter {
    written: usize,
    limit: usize,
}

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len();
        if self.written > self.limit {
            return Err(std::io::Error::other("over the limit"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn status_error(status: tonic::Status, limit: usize) -> SourceError {
    // tonic refuses an oversized message before buffering it, as OUT_OF_RANGE.
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        return SourceError::TooLarge(limit);
    }
    SourceError::from_status(status)
}
