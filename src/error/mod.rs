//! Typed errors and the one place they become a gRPC `Status`.
//!
//! tonic's implicit mapping would report an expired deadline as CANCELLED and
//! lose which source failed, so every error the gateway answers with goes
//! through [`Error::to_status`] ([`status`]), and every per-source outcome
//! through [`SourceError::code`]. [`codes`] holds the code tables.

pub mod codes;
pub mod status;

use std::{sync::Arc, time::Duration};

use tonic::{Code, Status};

pub use self::codes::{code_name, http_status_code};

use crate::{resilience::bulkhead::Full, template::RenderError};

/// The `google.rpc.ErrorInfo` domain of errors raised by the gateway.
pub const ERROR_DOMAIN: &str = "aggregator";

/// A shared, cloneable cause (one failure may be reported to many places).
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Why a call failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown aggregation '{0}'")]
    UnknownAggregation(String),
    #[error("aggregation '{aggregation}' has no source '{source_name}'")]
    UnknownSource {
        aggregation: Arc<str>,
        source_name: String,
    },
    #[error("{0}")]
    Param(#[from] RenderError),
    #[error("deadline exceeded after {0:?}")]
    DeadlineExceeded(Duration),
    #[error("source '{source_name}': {error}")]
    Source {
        source_name: Arc<str>,
        error: SourceError,
    },
    /// The gateway-wide cap on calls in flight was reached.
    #[error("gateway at capacity: {0}")]
    Overloaded(Full),
    /// The encoded answer would be larger than `[server] max_answer_bytes`:
    /// a client would not read it (gRPC clients take 4 MiB by default).
    #[error("the answer would be {len} bytes, over the {max}-byte limit (max_answer_bytes)")]
    AnswerTooLarge { len: usize, max: usize },
    /// The caller's payload is larger than `[server] max_payload_bytes`.
    #[error("the payload is {len} bytes, over the {max}-byte limit (max_payload_bytes)")]
    PayloadTooLarge { len: usize, max: usize },
    /// The answer could not be shaped: a landing-key collision or a failed
    /// aggregation `transform`.
    #[error("{0}")]
    Shape(String),
    /// The caller is over a `[rate_limits.NAME]`; no upstream was called.
    #[error("rate limit '{limit}' exceeded ({rate}, burst {burst}): retry in {retry_after:?}")]
    RateLimited {
        limit: Arc<str>,
        rate: Arc<str>,
        burst: u32,
        retry_after: Duration,
    },
    /// A rate limit's key could not be rendered from the call.
    #[error("rate limit '{limit}': {error}")]
    RateLimitKey { limit: Arc<str>, error: RenderError },
    /// The store did not answer in time and the limit says `on_store_error = "deny"`.
    #[error(
        "rate limit '{limit}' cannot be checked: the store did not answer (on_store_error = \"deny\")"
    )]
    RateLimitUnchecked { limit: Arc<str> },
    /// Fewer sources of the call succeeded than its aggregation's `min_success`.
    #[error("{succeeded} of {total} sources succeeded (min_success = {min})")]
    TooFewSucceeded {
        succeeded: usize,
        total: usize,
        min: usize,
        /// Each failed (or skipped) source, in the aggregation's order.
        failed: Vec<(Arc<str>, SourceError)>,
    },
}

/// Why one source failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The upstream answered with a non-OK gRPC status; it passes through.
    #[error("{}", .message)]
    Grpc { code: Code, message: String },
    /// The HTTP upstream answered with a non-2xx status.
    #[error("upstream answered HTTP {status}")]
    Http {
        status: http::StatusCode,
        /// Its `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    #[error("cannot connect to upstream: {0}")]
    Connect(Cause),
    /// The connection failed after it was established (reset, closed early).
    #[error("upstream connection failed: {0}")]
    Transport(Cause),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("response body is not JSON: {0}")]
    NotJson(Arc<serde_json::Error>),
    /// The source's circuit breaker is open; nothing was sent.
    #[error("circuit open for source '{source_name}' (next probe in {retry_in:?})")]
    CircuitOpen {
        source_name: Arc<str>,
        retry_in: Duration,
    },
    /// The source's cap on requests in flight was reached; nothing was sent.
    #[error("source at capacity: {0}")]
    Overloaded(Full),
    #[error("response exceeds the {0}-byte size cap")]
    TooLarge(usize),
    /// Converted to JSON, the response would exceed the source's size cap
    /// (default fields written out, e.g. many empty sub-messages).
    #[error("response converts to more than {0} bytes of JSON (max_response_bytes)")]
    Expanded(usize),
    /// Every connection to the upstream stayed busy until the deadline.
    #[error(
        "no connection to the upstream became free within the deadline (max_connections = {0})"
    )]
    NoConnection(usize),
    /// The response could not be decoded against the method's schema.
    #[error("cannot decode response: {0}")]
    Decode(String),
    /// A parameter value does not fit the request message's field.
    #[error("request does not fit {message}: {detail}")]
    Request { message: String, detail: String },
    /// The method's schema could not be learned or does not match the config.
    #[error("{0}")]
    Schema(String),
    /// A request could not be rendered from the values it references.
    #[error("{0}")]
    Render(RenderError),
    /// A source it reads failed (or was skipped): it was not called.
    #[error("dependency '{0}' failed")]
    DependencyFailed(Arc<str>),
    /// The `for_each` list is not a list.
    #[error("`{list}` is {found}, not a list (for_each)")]
    NotAList {
        list: Arc<str>,
        found: &'static str,
        from_caller: bool,
    },
    /// The `for_each` list is longer than `max_items`; nothing was sent.
    #[error("`{list}` has {len} items, over max_items = {max} (for_each)")]
    TooManyItems {
        list: Arc<str>,
        len: usize,
        max: usize,
        from_caller: bool,
    },
    /// One item of a `for_each` list failed.
    #[error("item {index}: {error}")]
    Item {
        index: usize,
        error: Box<SourceError>,
        from_caller: bool,
    },
    /// The source's `transform` failed on its result.
    #[error("transform `{filter}` failed: {detail}")]
    Transform { filter: Arc<str>, detail: String },
}

impl SourceError {
    /// A failed gRPC call. A status the upstream sent passes through; one
    /// tonic made up from a local failure (it carries the cause as `source`)
    /// is reported as what it is, not as tonic's CANCELLED or UNKNOWN.
    pub fn from_status(status: Status) -> Self {
        use std::error::Error as _;
        let Some(cause) = status.source() else {
            return Self::Grpc {
                code: status.code(),
                message: status.message().to_owned(),
            };
        };
        Self::from_transport(cause)
    }

    /// A request that failed below HTTP (dial, reset, timeout), named with
    /// its whole cause chain: "client error (Connect)" alone would not say
    /// that the connection was refused.
    pub fn from_transport(error: &(dyn std::error::Error + 'static)) -> Self {
        let chain = std::iter::successors(Some(error), next_cause);
        let mut message = String::new();
        for e in chain.clone() {
            // The budget is filled in by the caller, who knows it.
            if e.is::<tonic::TimeoutExpired>() {
                return Self::Timeout(Duration::ZERO);
            }
            // Some errors print their cause too ("tcp connect error: ..."),
            // and some causes repeat their parent: say each thing once.
            let text = e.to_string();
            if message.contains(&text) {
                continue;
            }
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
        let cause: Cause = Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(message));
        let refused = |e: &(dyn std::error::Error + 'static)| {
            e.is::<tonic::ConnectError>()
                || e.downcast_ref::<hyper_util::client::legacy::Error>()
                    .is_some_and(|e| e.is_connect())
        };
        if chain.clone().any(refused) {
            Self::Connect(cause)
        } else {
            Self::Transport(cause)
        }
    }

    /// Whether this failure says the upstream is unwell (what a circuit
    /// breaker counts), rather than that the request was wrong or that the
    /// gateway refused it itself.
    pub fn is_upstream_fault(&self) -> bool {
        match self {
            Self::Connect(_)
            | Self::Transport(_)
            | Self::Timeout(_)
            | Self::NotJson(_)
            | Self::Decode(_) => true,
            Self::Grpc { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Internal
                    | Code::Unknown
                    | Code::ResourceExhausted
                    | Code::DataLoss
            ),
            Self::Http { status, .. } => status.is_server_error() || status.as_u16() == 429,
            Self::Item { error, .. } => error.is_upstream_fault(),
            Self::TooLarge(_)
            | Self::Expanded(_)
            | Self::NoConnection(_)
            | Self::Request { .. }
            | Self::Schema(_)
            | Self::Overloaded(_)
            | Self::CircuitOpen { .. }
            | Self::Render(_)
            | Self::DependencyFailed(_)
            | Self::NotAList { .. }
            | Self::TooManyItems { .. }
            | Self::Transform { .. } => false,
        }
    }

    /// A wait for one of the source's connections that lasted until the
    /// deadline: reported as itself, since it is why the deadline passed.
    pub fn is_wait_for_connection(&self) -> bool {
        match self {
            Self::Item { error, .. } => error.is_wait_for_connection(),
            other => matches!(other, Self::NoConnection(_)),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::Grpc { code, .. } => *code,
            Self::Http { status, .. } => http_status_code(*status),
            Self::Connect(_) | Self::Transport(_) | Self::CircuitOpen { .. } => Code::Unavailable,
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::NotJson(_) | Self::Decode(_) => Code::Internal,
            Self::TooLarge(_) | Self::Expanded(_) | Self::Overloaded(_) | Self::NoConnection(_) => {
                Code::ResourceExhausted
            }
            Self::Request { .. } => Code::InvalidArgument,
            Self::Schema(_) | Self::DependencyFailed(_) => Code::FailedPrecondition,
            Self::Render(e) => match e.reference() {
                // Another source's answer lacks what this one needs.
                Some(path) if !reads(path, "$payload") => Code::FailedPrecondition,
                _ => Code::InvalidArgument,
            },
            Self::NotAList { from_caller, .. } | Self::TooManyItems { from_caller, .. } => {
                caller_or_upstream(*from_caller)
            }
            Self::Item {
                error, from_caller, ..
            } => match &**error {
                Self::Render(e) if e.reference().is_some_and(|p| reads(p, "$item")) => {
                    caller_or_upstream(*from_caller)
                }
                other => other.code(),
            },
            Self::Transform { .. } => Code::Internal,
        }
    }

    /// Whether the source was not called at all (circuit open, or a
    /// dependency failed).
    pub fn is_skip(&self) -> bool {
        match self {
            Self::Item { error, .. } => error.is_skip(),
            other => matches!(other, Self::CircuitOpen { .. } | Self::DependencyFailed(_)),
        }
    }
}

/// Whether the reference `path` starts at `root` (`$payload`, not `$payload_store`).
fn reads(path: &str, root: &str) -> bool {
    path.strip_prefix(root)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// A bad list or item is the caller's fault when the caller sent it.
fn caller_or_upstream(from_caller: bool) -> Code {
    if from_caller {
        Code::InvalidArgument
    } else {
        Code::FailedPrecondition
    }
}

fn next_cause<'a>(
    e: &&'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    (*e).source()
}

/// `text` cut to at most `max` bytes (on a character boundary), marked with
/// an ellipsis and the full length when cut: callers and upstreams choose
/// what they send, not how much of it comes back in a status or a log.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_is_the_callers_fault_only_when_it_reads_the_payload() {
        let missing = |path: &str| SourceError::Render(RenderError::Missing(path.into())).code();
        assert_eq!(missing("$payload.alert"), Code::InvalidArgument);
        assert_eq!(missing("$payload"), Code::InvalidArgument);
        // A source whose name starts with "payload" is another source.
        assert_eq!(missing("$payload_store.id"), Code::FailedPrecondition);
        assert_eq!(missing("$profile.id"), Code::FailedPrecondition);
        let item = |path: &str, from_caller| {
            SourceError::Item {
                index: 0,
                error: Box::new(SourceError::Render(RenderError::Missing(path.into()))),
                from_caller,
            }
            .code()
        };
        assert_eq!(item("$item.sku", true), Code::InvalidArgument);
        assert_eq!(item("$item.sku", false), Code::FailedPrecondition);
        assert_eq!(item("$items.sku", true), Code::FailedPrecondition);
    }
}
