//! Message schemas of gRPC upstream methods: from descriptor files given in the
//! config, or learned from the upstream's own server reflection (v1, falling
//! back to v1alpha) on first use and cached.

use std::collections::{HashMap, HashSet};

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor};
use prost_types::FileDescriptorProto;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, client::Grpc, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_prost::ProstCodec;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, ServerReflectionResponse, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse,
};

use crate::{
    error::SourceError,
    template::{Inputs, JsonTemplate, RenderError},
};

/// Request and response types of one method.
#[derive(Debug, Clone)]
pub struct MethodSchema {
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
}

pub fn method_schema(
    pool: &DescriptorPool,
    service: &str,
    method: &str,
) -> Result<MethodSchema, String> {
    let svc = pool
        .get_service_by_name(service)
        .ok_or_else(|| format!("service `{service}` is not in the descriptors"))?;
    let m = svc
        .methods()
        .find(|m| m.name() == method)
        .ok_or_else(|| format!("service `{service}` has no method `{method}`"))?;
    if m.is_client_streaming() || m.is_server_streaming() {
        return Err(format!(
            "`{service}/{method}` is streaming; only unary methods can be aggregated"
        ));
    }
    Ok(MethodSchema {
        input: m.input(),
        output: m.output(),
    })
}

/// Checks that every key of the request template names a field of `message`,
/// recursively, so a typo is reported when the schema is known, not per call.
pub fn check_template(template: &JsonTemplate, message: &MessageDescriptor) -> Result<(), String> {
    let fields = match template {
        JsonTemplate::Literal(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| (k.as_str(), JsonTemplate::Literal(v.clone())))
            .collect::<Vec<_>>(),
        other => match other.keys() {
            Some(keys) => keys.iter().map(|(k, v)| (k.as_str(), v.clone())).collect(),
            None => return Ok(()),
        },
    };
    for (key, value) in fields {
        let field = field_of(message, key).ok_or_else(|| {
            format!(
                "request template: `{}` has no field `{key}`",
                message.full_name()
            )
        })?;
        // Well-known types have their own JSON forms; only plain messages nest fields.
        if let Kind::Message(inner) = field.kind() {
            if !field.is_list()
                && !field.is_map()
                && !inner.full_name().starts_with("google.protobuf.")
            {
                check_template(&value, &inner)?;
            }
        }
    }
    Ok(())
}

/// Checks that `path` (proto field names and list indices) can exist in
/// an answer of type `message`. Well-known types (`Struct`, `Value`...) and
/// maps can hold any key.
pub fn check_path(message: &MessageDescriptor, path: &[Box<str>]) -> Result<(), String> {
    let mut current = message.clone();
    let mut segments = path.iter();
    while let Some(segment) = segments.next() {
        if current.full_name().starts_with("google.protobuf.") {
            return Ok(());
        }
        let field = current.get_field_by_name(segment).ok_or_else(|| {
            format!(
                "`{}` has no field `{segment}` (answers use the .proto's field names)",
                current.full_name()
            )
        })?;
        if field.is_map() {
            return Ok(());
        }
        if field.is_list() {
            match segments.next() {
                None => return Ok(()),
                Some(index) if index.parse::<usize>().is_ok() => {}
                Some(other) => {
                    return Err(format!(
                        "`{}` is a list: `{other}` is not an index",
                        field.full_name()
                    ));
                }
            }
        }
        match field.kind() {
            Kind::Message(inner) => current = inner,
            _ => {
                return match segments.next() {
                    None => Ok(()),
                    Some(next) => Err(format!(
                        "`{}` is a {}: it has no `{next}`",
                        field.full_name(),
                        kind_name(&field)
                    )),
                };
            }
        }
    }
    Ok(())
}

/// A request field by its JSON name or its `.proto` name, as protobuf JSON
/// takes either.
fn field_of(message: &MessageDescriptor, key: &str) -> Option<prost_reflect::FieldDescriptor> {
    message
        .get_field_by_json_name(key)
        .or_else(|| message.get_field_by_name(key))
}

/// The rendered request as protobuf bytes.
pub fn encode(
    input: &MessageDescriptor,
    mut json: serde_json::Value,
) -> Result<bytes::Bytes, String> {
    as_text_where_text(&mut json, input);
    let message = DynamicMessage::deserialize(input.clone(), json).map_err(|e| e.to_string())?;
    Ok(message.encode_to_vec().into())
}

/// Numbers and booleans bound for `string` fields become their text: a
/// reference to another source's numeric id fills a string id field, as a
/// user writing `user_id = "{$account.id}"` means. (Protobuf JSON already
/// takes strings for numeric fields.)
fn as_text_where_text(json: &mut serde_json::Value, message: &MessageDescriptor) {
    use serde_json::Value;
    let Value::Object(fields) = json else { return };
    for (key, value) in fields.iter_mut() {
        let Some(field) = field_of(message, key) else {
            continue;
        };
        let values: Vec<&mut Value> = match value {
            Value::Array(items) if field.is_list() => items.iter_mut().collect(),
            other if !field.is_list() && !field.is_map() => vec![other],
            _ => continue,
        };
        for value in values {
            match field.kind() {
                Kind::String if matches!(value, Value::Number(_) | Value::Bool(_)) => {
                    *value = Value::String(value.to_string());
                }
                Kind::Message(inner) if !inner.full_name().starts_with("google.protobuf.") => {
                    as_text_where_text(value, &inner);
                }
                _ => {}
            }
        }
    }
}

/// [`encode`] at render time, when the schema is known: a parameter that
/// cannot fill its field (`"abc"` for an `int32`) is the caller's error,
/// named with the field, before any upstream is called.
pub fn encode_request(
    input: &MessageDescriptor,
    json: serde_json::Value,
    template: &JsonTemplate,
    inputs: &Inputs,
) -> Result<bytes::Bytes, RenderError> {
    encode(input, json).map_err(|detail| {
        culprit(template, inputs, input).unwrap_or_else(|| {
            let names: Vec<&str> = template.inputs().map(|p| &**p).collect();
            RenderError::Mismatch {
                name: names.join(", ").into(),
                field: format!("`{}`", input.full_name()),
                detail,
            }
        })
    })
}

/// The first templated field whose rendered value alone does not fit.
fn culprit(
    template: &JsonTemplate,
    inputs: &Inputs,
    message: &MessageDescriptor,
) -> Option<RenderError> {
    for (key, sub) in template.keys()? {
        if sub.inputs().next().is_none() {
            continue;
        }
        let Some(field) = field_of(message, key) else {
            continue;
        };
        if let (Kind::Message(inner), Some(_)) = (field.kind(), sub.keys()) {
            if !field.is_list() && !field.is_map() {
                if let Some(found) = culprit(sub, inputs, &inner) {
                    return Some(found);
                }
                continue;
            }
        }
        let probe = serde_json::json!({ key: sub.render_with(inputs).ok()? });
        if let Err(e) = DynamicMessage::deserialize(message.clone(), probe) {
            let mut names: Vec<&str> = sub.inputs().map(|p| &**p).collect();
            names.dedup();
            return Some(RenderError::Mismatch {
                name: names.join(", ").into(),
                field: format!("`{}` ({})", field.full_name(), kind_name(&field)),
                detail: e.to_string(),
            });
        }
    }
    None
}

/// The field's type as the .proto spells it.
fn kind_name(field: &prost_reflect::FieldDescriptor) -> String {
    let base = match field.kind() {
        Kind::Double => "double".to_owned(),
        Kind::Float => "float".to_owned(),
        Kind::Int32 => "int32".to_owned(),
        Kind::Int64 => "int64".to_owned(),
        Kind::Uint32 => "uint32".to_owned(),
        Kind::Uint64 => "uint64".to_owned(),
        Kind::Sint32 => "sint32".to_owned(),
        Kind::Sint64 => "sint64".to_owned(),
        Kind::Fixed32 => "fixed32".to_owned(),
        Kind::Fixed64 => "fixed64".to_owned(),
        Kind::Sfixed32 => "sfixed32".to_owned(),
        Kind::Sfixed64 => "sfixed64".to_owned(),
        Kind::Bool => "bool".to_owned(),
        Kind::String => "string".to_owned(),
        Kind::Bytes => "bytes".to_owned(),
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
    };
    if field.is_list() {
        format!("repeated {base}")
    } else {
        base
    }
}

const REFLECTION_V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const REFLECTION_V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// Asks the upstream's reflection service for the method's schema.
pub async fn resolve(
    channel: Channel,
    service: &str,
    method: &str,
) -> Result<MethodSchema, SourceError> {
    let unimplemented = |r: &Result<_, SourceError>| {
        matches!(
            r,
            Err(SourceError::Grpc {
                code: Code::Unimplemented,
                ..
            })
        )
    };
    let mut files = fetch_files(channel.clone(), REFLECTION_V1, service).await;
    if unimplemented(&files) {
        files = fetch_files(channel, REFLECTION_V1ALPHA, service).await;
    }
    if unimplemented(&files) {
        return Err(SourceError::Schema(
            "the upstream does not serve gRPC server reflection (v1 or v1alpha) to learn the \
             method's schema from: give the source `protos` or `descriptor_set`"
                .into(),
        ));
    }
    let files = files?;
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(files).map_err(|e| {
        SourceError::Schema(format!("reflection returned invalid descriptors: {e}"))
    })?;
    method_schema(&pool, service, method).map_err(SourceError::Schema)
}

/// Fetches the file defining `symbol` and, transitively, the files it imports.
/// v1 and v1alpha messages are identical on the wire, so one codec serves both.
async fn fetch_files(
    channel: Channel,
    path: &'static str,
    symbol: &str,
) -> Result<Vec<FileDescriptorProto>, SourceError> {
    let (tx, rx) = mpsc::channel(4);
    let ask = |req: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(req),
    };
    tx.try_send(ask(MessageRequest::FileContainingSymbol(symbol.to_owned())))
        .expect("fresh channel has capacity");
    let mut grpc = Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| SourceError::Connect(std::sync::Arc::from(e)))?;
    let codec: ProstCodec<ServerReflectionRequest, ServerReflectionResponse> =
        ProstCodec::default();
    let mut responses = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(path),
            codec,
        )
        .await
        .map_err(grpc_error)?
        .into_inner();

    let mut files: HashMap<String, FileDescriptorProto> = HashMap::new();
    let mut requested: HashSet<String> = HashSet::new();
    let mut pending = 1usize;
    while pending > 0 {
        let response = responses
            .message()
            .await
            .map_err(grpc_error)?
            .ok_or_else(|| SourceError::Schema("reflection stream ended early".into()))?;
        pending -= 1;
        match response.message_response {
            Some(MessageResponse::FileDescriptorResponse(fd)) => {
                for bytes in fd.file_descriptor_proto {
                    let file = FileDescriptorProto::decode(bytes.as_slice()).map_err(|e| {
                        SourceError::Schema(format!("reflection returned an undecodable file: {e}"))
                    })?;
                    files.insert(file.name().to_owned(), file);
                }
            }
            Some(MessageResponse::ErrorResponse(e)) => {
                return Err(SourceError::Schema(format!(
                    "reflection cannot describe `{symbol}`: {}",
                    e.error_message
                )));
            }
            _ => return Err(SourceError::Schema("unexpected reflection response".into())),
        }
        let missing: Vec<String> = files
            .values()
            .flat_map(|f| f.dependency.iter())
            .filter(|d| !files.contains_key(*d) && !requested.contains(*d))
            .cloned()
            .collect();
        for dep in missing {
            requested.insert(dep.clone());
            pending += 1;
            tx.send(ask(MessageRequest::FileByFilename(dep)))
                .await
                .map_err(|_| SourceError::Schema("reflection stream closed".into()))?;
        }
    }
    Ok(files.into_values().collect())
}

fn grpc_error(status: tonic::Status) -> SourceError {
    match SourceError::from_status(status) {
        SourceError::Grpc { code, message } => SourceError::Grpc {
            code,
            message: format!("reflection: {message}"),
        },
        other => other,
    }
}
