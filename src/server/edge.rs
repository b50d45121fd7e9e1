//! The edge of every call, before tonic sees it: only gRPC gets in (HTTP 415
//! otherwise, as grpc-go answers), the caller's `grpc-timeout` becomes a
//! deadline measured from the moment the headers arrived, and a unary
//! `Aggregator` request is read here, under that deadline and within
//! `max_request_bytes`, holding only the bytes actually received (never the
//! length a client declares). The answer is then bounded in time too
//! ([`super::stream`]).

use std::{convert::Infallible, pin::Pin, sync::Arc, task::Poll, time::Duration};

use bytes::{Buf, Bytes};
use futures_util::future::BoxFuture;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body, service::Routes};

use super::stream;
use crate::{
    api::AggregatorApi,
    deadline::{Deadline, parse_grpc_timeout},
    pb::aggregator::v1::aggregator_server::AggregatorServer,
    request_id,
};

/// Limits of reading a request and sending its answer.
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    /// The largest request message accepted.
    pub max_request_bytes: usize,
    /// Bytes of requests being received, gateway-wide: one permit a byte.
    pub buffered: Arc<Semaphore>,
    /// How long a request may take to arrive when the caller set no deadline.
    pub request_read_timeout: Duration,
    /// How long an answer may take to reach the client once it is ready.
    pub send_timeout: Duration,
}

const AGGREGATOR_PREFIX: &str = "/aggregator.v1.Aggregator/";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// The gRPC service the gateway serves: `Aggregator` straight to its
/// server, the rest (health, reflection) through tonic's router.
#[derive(Clone)]
pub struct Edge {
    aggregator: AggregatorServer<AggregatorApi>,
    others: Routes,
    limits: EdgeLimits,
}

impl Edge {
    pub fn new(api: AggregatorApi, others: Routes, limits: EdgeLimits) -> Self {
        let aggregator = AggregatorServer::new(api)
            .max_decoding_message_size(limits.max_request_bytes.saturating_add(HEADER));
        Self {
            aggregator,
            others,
            limits,
        }
    }
}

impl tower::Service<Request<Incoming>> for Edge {
    type Response = Response<Rechunk<Body>>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        // tonic services hold no capacity: always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        if let Some(refusal) = refuse_non_grpc(&request) {
            return Box::pin(std::future::ready(Ok(refusal.map(Rechunk::new))));
        }
        let deadline = stamp_deadline(&mut request);
        let limits = self.limits.clone();
        let path = request.uri().path();
        if path.starts_with(AGGREGATOR_PREFIX) {
            let aggregator = self.aggregator.clone();
            return Box::pin(unary(aggregator, request, deadline, limits));
        }
        let unary = path == HEALTH_CHECK;
        let call = tower::Service::call(&mut self.others, request);
        Box::pin(async move {
            let response = call.await?;
            // Streams (Watch, reflection) live as long as the client wants.
            if unary {
                stream::answer_within(limits.send_timeout);
            }
            Ok(response.map(Rechunk::new))
        })
    }
}

/// The caller's `grpc-timeout`, as a deadline from now (the headers have
/// just arrived). A malformed value is ignored, as gRPC servers do.
fn stamp_deadline<B>(request: &mut Request<B>) -> Option<Deadline> {
    let timeout = request
        .headers()
        .get("grpc-timeout")
        .and_then(|v| parse_grpc_timeout(v.as_bytes()))?;
    let deadline = Deadline::after(timeout);
    request.extensions_mut().insert(deadline);
    Some(deadline)
}

/// HTTP 405 for anything but POST, 415 for anything but gRPC with protobuf.
fn refuse_non_grpc<B>(request: &Request<B>) -> Option<Response<Body>> {
    let refuse = |status: StatusCode, text: String| {
        let mut response = Response::new(Body::new(Full::new(Bytes::from(text))));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Some(response)
    };
    if request.method() != Method::POST {
        let mut response = refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "gRPC requests are POST\n".to_owned(),
        )?;
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Some(response);
    }
    let content_type = request.headers().get(header::CONTENT_TYPE);
    let media_type = content_type
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim());
    match media_type {
        Some(t) if t.eq_ignore_ascii_case("application/grpc") => None,
        Some(t) if t.eq_ignore_ascii_case("application/grpc+proto") => None,
        _ => {
            let shown = content_type.map_or_else(
                || "none".to_owned(),
                |v| crate::error::truncate(&String::from_utf8_lossy(v.as_bytes()), 100),
            );
            refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("invalid gRPC request content-type {shown:?}: expected application/grpc\n"),
            )
        }
    }
}

/// The length-prefix of a gRPC message: a compression flag and 4 bytes.
const HEADER: usize = 5;

#[derive(Debug)]
enum ReadError {
    TooLarge(Option<u64>),
    /// More than the one message of a unary call.
    Trailing,
    /// The gateway holds `buffered` bytes of requests already.
    Full,
    /// The client reset the stream or the connection failed.
    Body(hyper::Error),
}

/// A unary call: read the request whole, then hand it to the service.
async fn unary(
    mut service: AggregatorServer<AggregatorApi>,
    request: Request<Incoming>,
    deadline: Option<Deadline>,
    limits: EdgeLimits,
) -> Result<Response<Rechunk<Body>>, Infallible> {
    let (mut parts, body) = request.into_parts();
    // Taken here so that the answers made here and tonic's own errors carry
    // it too; the API layer finds it well-formed and keeps it.
    let id = request_id::take(&mut parts.headers);
    let status = |status: Status| with_id(status.into_http::<Body>().map(Rechunk::new), &id);
    let read_timeout = Deadline::after(limits.request_read_timeout);
    let read_by = deadline.map_or(read_timeout, |d| d.min(read_timeout));
    let read = tokio::time::timeout_at(
        read_by.instant(),
        read_message(body, limits.max_request_bytes, &limits.buffered),
    );
    let message = match read.await {
        Ok(Ok((message, _held))) => message,
        Ok(Err(ReadError::Trailing)) => {
            return Ok(status(Status::invalid_argument(
                "a unary call carries one request message; this one carried more",
            )));
        }
        Ok(Err(ReadError::Full)) => {
            let message = "the gateway is receiving as many request bytes as it holds \
                           (max_buffered_request_bytes); try again";
            return Ok(status(Status::resource_exhausted(message)));
        }
        Ok(Err(ReadError::TooLarge(declared))) => {
            let max = limits.max_request_bytes;
            let message = match declared {
                Some(n) => format!(
                    "request message of {n} bytes exceeds the {max}-byte limit (max_request_bytes)"
                ),
                None => format!("request exceeds the {max}-byte limit (max_request_bytes)"),
            };
            return Ok(status(Status::resource_exhausted(message)));
        }
        Ok(Err(ReadError::Body(error))) => {
            // The client reset the stream (or the connection is gone): no
            // answer can reach it. Waiting for hyper to drop this call lets
            // the connection count it as reset, as the rapid-reset guard must.
            tracing::debug!(%error, "the request body failed");
            return std::future::pending().await;
        }
        Err(_) => {
            let message = match deadline {
                Some(d) if d <= read_timeout => {
                    "deadline exceeded while receiving the request".to_owned()
                }
                _ => format!(
                    "the request was not received within {:?} (request_read_timeout)",
                    limits.request_read_timeout
                ),
            };
            return Ok(status(Status::deadline_exceeded(message)));
        }
    };
    let request = Request::from_parts(parts, Full::new(message));
    let response = tower::Service::call(&mut service, request).await?;
    stream::answer_within(limits.send_timeout);
    Ok(with_id(response.map(Rechunk::new), &id))
}

/// The request id in the answer's headers (the trailers, when the answer is
/// only trailers), unless the API layer put it there already.
fn with_id<B>(mut response: Response<B>, id: &HeaderValue) -> Response<B> {
    response
        .headers_mut()
        .entry(request_id::X_REQUEST_ID)
        .or_insert_with(|| id.clone());
    response
}

/// Reads the body, refusing it as soon as it declares or sends more than
/// one message of `max` bytes. Memory held is what has arrived, and counted
/// against `buffered`, the gateway's bound on bytes being received; the
/// permits are held as long as the returned ones.
async fn read_message(
    body: Incoming,
    max: usize,
    buffered: &Arc<Semaphore>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ReadError> {
    let mut body = std::pin::pin!(body);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let mut declared: Option<u64> = None;
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(ReadError::Body)?.into_data() else {
            continue;
        };
        len += data.len();
        if len > max.saturating_add(HEADER) {
            return Err(ReadError::TooLarge(None));
        }
        let more = u32::try_from(data.len()).map_err(|_| ReadError::TooLarge(None))?;
        let permit = buffered
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| ReadError::Full)?;
        match &mut held {
            Some(held) => held.merge(permit),
            None => held = Some(permit),
        }
        chunks.push(data);
        if declared.is_none() && len >= HEADER {
            let length = declared_length(&chunks);
            if length > max as u64 {
                return Err(ReadError::TooLarge(Some(length)));
            }
            declared = Some(length);
        }
        if declared.is_some_and(|d| len as u64 > HEADER as u64 + d) {
            return Err(ReadError::Trailing);
        }
    }
    let message = match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = Vec::with_capacity(len);
            for chunk in &chunks {
                all.extend_from_slice(chunk);
            }
            Bytes::from(all)
        }
    };
    Ok((message, held))
}

/// The message length in the first five bytes, which may span chunks.
fn declared_length(chunks: &[Bytes]) -> u64 {
    let mut header = [0u8; HEADER];
    let mut bytes = chunks.iter().flat_map(|c| c.iter()).skip(1);
    for b in header.iter_mut().skip(1) {
        *b = bytes.next().copied().unwrap_or_default();
    }
    u64::from(u32::from_be_bytes([
        header[1], header[2], header[3], header[4],
    ]))
}

/// Hands the answer to hyper in pieces of at most 16 KiB, so that
/// it sits here, not in h2's send queue, while the client's window is shut;
/// the stream then stays open and can be reset when its time is up.
pub struct Rechunk<B> {
    inner: B,
    pending: Bytes,
}

const CHUNK: usize = 16 * 1024;

impl<B> Rechunk<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            pending: Bytes::new(),
        }
    }
}

impl<B> http_body::Body for Rechunk<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            }
        }
        let n = this.pending.len().min(CHUNK);
        Poll::Ready(Some(Ok(Frame::data(this.pending.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let pending = self.pending.remaining() as u64;
        hint.set_lower(hint.lower() + pending);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_length_is_read_across_chunks() {
        let chunks = [
            Bytes::from_static(&[0, 0]),
            Bytes::from_static(&[0x01, 0x00]),
            Bytes::from_static(&[0x05, 1, 2]),
        ];
        assert_eq!(declared_length(&chunks), 0x0001_0005);
    }

    #[tokio::test]
    async fn an_answer_is_handed_over_in_small_pieces() {
        let big = Bytes::from(vec![7u8; 3 * CHUNK + 5]);
        let mut body = Rechunk::new(Full::new(big));
        let mut sizes = Vec::new();
        while let Some(frame) = body.frame().await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
        }
        assert_eq!(sizes, [CHUNK, CHUNK, CHUNK, 5]);
    }
}
