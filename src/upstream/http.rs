//! HTTP/JSON upstreams: one connection pool per source ([`super::pool`]).
//! Bodies are read up to the source's size cap and must be JSON.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioTimer},
};
use tokio::sync::Semaphore;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};

use super::{Answer, pool::CappedConnector};
use crate::{
    cache::Directive,
    config::{HttpSpec, PoolSpec, UpstreamTls},
    deadline::Deadline,
    error::{Cause, SourceError},
    template::{Inputs, RenderError, render_header},
};

/// The longest URL a rendered request may have: far above what real
/// services take (8 KiB is common), far below what breaks a URI (64 KiB).
pub const MAX_URL_BYTES: usize = 16 * 1024;

/// A pool's connector: TLS where the URL says `https://`.
type Connector = HttpsConnector<CappedConnector>;

/// One HTTP source's client.
pub struct HttpUpstream {
    client: Client<Connector, Full<Bytes>>,
    /// One per connection: a request holds one from before it is sent until
    /// its body is read, so calls beyond the cap wait here, in order. None
    /// for HTTP/2, where requests share connections.
    slots: Option<Arc<Semaphore>>,
    max_connections: usize,
    /// Health checks have a connection of their own: a saturated pool must
    /// not read as an unhealthy upstream.
    checks: Client<Connector, Full<Bytes>>,
    /// For `aggregator check --probe`, which dials a connection of its own.
    dialer: Connector,
}

impl HttpUpstream {
    pub fn new(pool: &PoolSpec, tls: Option<&UpstreamTls>) -> Self {
        let connector = |sockets| {
            let builder = HttpsConnectorBuilder::new().with_tls_config(match tls {
                Some(tls) => (*tls.http).clone(),
                // A plain http:// source never makes a TLS connection.
                None => no_tls(),
            });
            let builder = builder.https_or_http();
            let builder = match tls.and_then(|t| t.server_name.clone()) {
                Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
                None => builder,
            };
            let sockets = CappedConnector::new(sockets);
            // Over TLS, ALPN offers h2 and HTTP/1.1 and the server picks.
            if pool.http2 {
                builder.enable_all_versions().wrap_connector(sockets)
            } else {
                builder.enable_http1().wrap_connector(sockets)
            }
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(pool.max_idle)
            .pool_idle_timeout(pool.idle_timeout)
            // Plain TCP has no ALPN: h2c with prior knowledge.
            .http2_only(pool.http2 && tls.is_none())
            .build(connector(pool.max_connections));
        let checks = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(1)
            .http2_only(pool.http2 && tls.is_none())
            .build(connector(1));
        Self {
            dialer: connector(1),
            client,
            slots: (!pool.http2).then(|| Arc::new(Semaphore::new(pool.max_connections))),
            max_connections: pool.max_connections,
            checks,
        }
    }

    /// Sends the request once a connection is free, within the deadline.
    pub async fn call(
        &self,
        request: Request<Bytes>,
        deadline: Deadline,
        limit: usize,
    ) -> Result<(Answer, StatusCode), SourceError> {
        let _slot = match &self.slots {
            Some(slots) => match tokio::time::timeout_at(deadline.instant(), slots.acquire()).await
            {
                Ok(Ok(slot)) => Some(slot),
                _ => return Err(SourceError::NoConnection(self.max_connections)),
            },
            None => None,
        };
        send(&self.client, request, limit).await
    }

    /// Opens a connection (TCP, then TLS for https) to `origin`.
    pub async fn connect(&self, origin: &str) -> Result<(), SourceError> {
        use tower::ServiceExt as _;
        let uri: http::Uri = origin
            .parse()
            .map_err(|e: http::uri::InvalidUri| SourceError::from_transport(&e))?;
        match self.dialer.clone().oneshot(uri).await {
            Ok(_) => Ok(()),
            Err(e) => Err(SourceError::from_transport(&*e)),
        }
    }

    /// Whether a GET of `uri` answers 2xx; the reason when not.
    pub async fn check_health(&self, uri: &http::Uri) -> Result<(), String> {
        let mut request = Request::new(Full::default());
        *request.uri_mut() = uri.clone();
        match self.checks.request(request).await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("GET {uri} answered HTTP {}", r.status())),
            Err(e) => Err(format!("GET {uri}: {}", SourceError::from_transport(&e))),
        }
    }
}

/// A TLS config that trusts nothing, for sources that never use TLS.
fn no_tls() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(crate::config::tls_provider())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
}

static JSON: header::HeaderValue = header::HeaderValue::from_static("application/json");

/// The rendered request; the body stays plain bytes so that the request can
/// be copied for a retry and keyed for coalescing.
pub fn prepare(spec: &HttpSpec, inputs: &Inputs) -> Result<Request<Bytes>, RenderError> {
    let uri = spec.url.render_with(inputs)?;
    if uri.len() > MAX_URL_BYTES {
        let names: Vec<&str> = spec.url.inputs().map(|p| &**p).collect();
        return Err(RenderError::TooLong {
            what: "URL",
            len: uri.len(),
            max: MAX_URL_BYTES,
            params: names.join(", "),
        });
    }
    let mut builder = Request::builder()
        .method(spec.method.clone())
        .uri(uri)
        .header(header::ACCEPT, JSON.clone());
    for (name, value) in &spec.headers {
        builder = builder.header(name, render_header(value, inputs)?);
    }
    let body = match &spec.body {
        Some(body) => {
            builder = builder.header(header::CONTENT_TYPE, JSON.clone());
            Bytes::from(body.render_with(inputs)?.to_string())
        }
        None => Bytes::new(),
    };
    // Parameters were percent-encoded and header values checked, so this
    // should hold; if it does not, the caller hears why, nothing panics.
    builder.body(body).map_err(|_| RenderError::Invalid {
        name: spec
            .url
            .params()
            .next()
            .cloned()
            .unwrap_or_else(|| "url".into()),
        reason: "does not make a valid request",
    })
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

async fn send(
    client: &Client<Connector, Full<Bytes>>,
    request: Request<Bytes>,
    limit: usize,
) -> Result<(Answer, StatusCode), SourceError> {
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
    let directive = Directive::from_headers(response.headers());
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
        let value = serde_json::Value::Null;
        return Ok((Answer { value, directive }, status));
    }
    let value = serde_json::from_slice(&body).map_err(|e| SourceError::NotJson(Arc::new(e)))?;
    Ok((Answer { value, directive }, status))
}
