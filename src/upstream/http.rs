//! HTTP/JSON upstreams over one pooled hyper client. Bodies are read up to the
//! source's size cap and must be JSON.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::{
    config::HttpSpec,
    error::{Cause, SourceError},
    template::{Params, RenderError, render_header},
};

/// The connection pool shared by every HTTP source.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

static JSON: header::HeaderValue = header::HeaderValue::from_static("application/json");

/// The rendered request; the body stays plain bytes so that the request can
/// be copied for a retry and keyed for coalescing.
pub fn prepare(spec: &HttpSpec, params: &Params) -> Result<Request<Bytes>, RenderError> {
    let uri = spec.url.render(params)?;
    let mut builder = Request::builder()
        .method(spec.method.clone())
        .uri(uri)
        .header(header::ACCEPT, JSON.clone());
    for (name, value) in &spec.headers {
        builder = builder.header(name, render_header(value, params)?);
    }
    let body = match &spec.body {
        Some(body) => {
            builder = builder.header(header::CONTENT_TYPE, JSON.clone());
            Bytes::from(serde_json::to_vec(&body.render(params)?).expect("JSON values serialize"))
        }
        None => Bytes::new(),
    };
    // Parameters were percent-encoded and header values checked, so this holds.
    Ok(builder.body(body).expect("rendered request is valid"))
}

/// `Retry-After` as delay-seconds or an HTTP date; a date in the past is no
/// wait at all.
fn retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Whether a GET of `uri` answers 2xx.
pub async fn check_health(client: &HttpClient, uri: &http::Uri) -> bool {
    let mut request = Request::new(Full::default());
    *request.uri_mut() = uri.clone();
    client
        .request(request)
        .await
        .is_ok_and(|r| r.status().is_success())
}

pub async fn call(
    client: &HttpClient,
    request: Request<Bytes>,
    limit: usize,
) -> Result<serde_json::Value, SourceError> {
    let response = client
        .request(request.map(Full::new))
        .await
        .map_err(|e| SourceError::from_transport(&e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(SourceError::Http {
            status,
            retry_after: response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| retry_after(v.to_str().ok()?)),
        });
    }
    let declared = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(SourceError::TooLarge(limit));
    }
    let body = Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
            Ok(_) => SourceError::TooLarge(limit),
            Err(e) => SourceError::Transport(Cause::from(e)),
        })?
        .to_bytes();
    if status == StatusCode::NO_CONTENT || body.is_empty() && status != StatusCode::OK {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&body).map_err(|e| SourceError::NotJson(Arc::new(e)))
}
