//! The one mapping from [`Error`] to the wire: a code, a message and a
//! `google.rpc.ErrorInfo` per failure, bounded in size whatever a caller
//! named or an upstream answered (a default gRPC client reads at most
//! 16 KiB of metadata, and a status is metadata).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetail, ErrorInfo, QuotaFailure, RetryInfo, StatusExt};

use super::{ERROR_DOMAIN, Error, SourceError, codes::code_name, truncate};
use crate::template::RenderError;

/// The message and every detail of a status together stay under this.
pub const MAX_STATUS_BYTES: usize = 4096;
/// The longest message; the rest of the budget is for details.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// The longest value in an ErrorInfo's metadata.
const MAX_METADATA_VALUE_BYTES: usize = 256;
/// What an ErrorInfo costs on the wire besides its strings: the `Any`
/// wrapping it (a 40-byte type URL) and the protobuf framing.
const ERROR_INFO_OVERHEAD: usize = 64;

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Self::UnknownAggregation(_) => Code::NotFound,
            Self::UnknownSource { .. } | Self::Param(_) | Self::RateLimitKey { .. } => {
                Code::InvalidArgument
            }
            Self::RateLimited { .. } => Code::ResourceExhausted,
            Self::RateLimitUnchecked { .. } => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Source { error, .. } => error.code(),
            Self::Overloaded(_) | Self::AnswerTooLarge { .. } | Self::PayloadTooLarge { .. } => {
                Code::ResourceExhausted
            }
            Self::Shape(_) => Code::Internal,
            Self::TooFewSucceeded { failed, .. } => failed
                .iter()
                .map(|(_, e)| e.code())
                .min_by_key(|c| super::codes::rank(*c))
                .unwrap_or(Code::Unavailable),
        }
    }

    /// The status the caller gets. Source failures carry a
    /// `google.rpc.ErrorInfo` whose metadata names the source and its code,
    /// so clients need not parse the message.
    pub fn to_status(&self) -> Status {
        let code = self.code();
        let message = truncate(&self.to_string(), MAX_MESSAGE_BYTES);
        let infos = match self {
            Self::Source { source_name, error } => vec![source_failed(source_name, error)],
            Self::TooFewSucceeded { failed, .. } => failed
                .iter()
                .map(|(name, error)| source_failed(name, error))
                .collect(),
            Self::UnknownAggregation(name) => {
                vec![info("UNKNOWN_AGGREGATION", [("aggregation", name.clone())])]
            }
            Self::UnknownSource { source_name, .. } => {
                vec![info("UNKNOWN_SOURCE", [("source", source_name.clone())])]
            }
            Self::Param(RenderError::Missing(name)) => match name.strip_prefix('@') {
                Some(meta) => vec![info("MISSING_METADATA", [("metadata", meta.to_owned())])],
                None if name.starts_with('$') => {
                    vec![info("MISSING_PATH", [("path", name.to_string())])]
                }
                None => vec![info("MISSING_PARAMETER", [("parameter", name.to_string())])],
            },
            Self::Param(RenderError::Invalid { name, .. }) => {
                vec![info("INVALID_PARAMETER", [("parameter", name.to_string())])]
            }
            Self::Param(RenderError::Mismatch { name, field, .. }) => vec![info(
                "INVALID_PARAMETER",
                [("parameter", name.to_string()), ("field", field.clone())],
            )],
            Self::Param(RenderError::TooLong { params, .. }) => {
                vec![info("INVALID_PARAMETER", [("parameter", params.clone())])]
            }
            Self::DeadlineExceeded(_) => vec![info("DEADLINE_EXCEEDED", [])],
            Self::Overloaded(full) => vec![info(
                "GATEWAY_OVERLOADED",
                [("max_concurrent_calls", full.max.to_string())],
            )],
            Self::AnswerTooLarge { max, .. } => vec![info(
                "ANSWER_TOO_LARGE",
                [("max_answer_bytes", max.to_string())],
            )],
            Self::PayloadTooLarge { max, .. } => vec![info(
                "PAYLOAD_TOO_LARGE",
                [("max_payload_bytes", max.to_string())],
            )],
            Self::Shape(_) => vec![info("SHAPE_FAILED", [])],
            Self::RateLimited { .. } => vec![],
            Self::RateLimitKey { limit, error } => {
                let missing = match error {
                    RenderError::Missing(name) | RenderError::Invalid { name, .. } => {
                        name.to_string()
                    }
                    other => other.to_string(),
                };
                vec![info(
                    "RATE_LIMIT_KEY_MISSING",
                    [("limit", limit.to_string()), ("key", missing)],
                )]
            }
            Self::RateLimitUnchecked { limit } => {
                vec![info("RATE_LIMIT_UNCHECKED", [("limit", limit.to_string())])]
            }
        };
        if let Self::RateLimited {
            limit,
            rate,
            burst,
            retry_after,
        } = self
        {
            // When to come back, and which quota: what gRPC clients and
            // their retry policies read.
            let details = [
                ErrorDetail::RetryInfo(RetryInfo::new(Some(*retry_after))),
                ErrorDetail::QuotaFailure(QuotaFailure::with_violation(
                    truncate(&format!("rate_limits.{limit}"), MAX_METADATA_VALUE_BYTES),
                    format!("{rate}, burst {burst}"),
                )),
                ErrorDetail::ErrorInfo(info("RATE_LIMITED", [("limit", limit.to_string())])),
            ];
            return Status::with_error_details_vec(code, message, details);
        }
        // As many details as fit: with many failed sources, the first ones.
        // The details travel as a google.rpc.Status that repeats the message.
        let mut budget = MAX_STATUS_BYTES.saturating_sub(2 * message.len() + 16);
        let details = infos.into_iter().take_while(|i| {
            let size = ERROR_INFO_OVERHEAD
                + i.reason.len()
                + i.domain.len()
                + i.metadata
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 8)
                    .sum::<usize>();
            budget = budget.saturating_sub(size);
            budget > 0
        });
        Status::with_error_details_vec(code, message, details.map(ErrorDetail::ErrorInfo))
    }
}

fn source_failed(name: &str, error: &SourceError) -> ErrorInfo {
    info(
        "SOURCE_FAILED",
        [
            ("source", name.to_owned()),
            ("code", code_name(error.code()).to_owned()),
        ],
    )
}

fn info<const N: usize>(reason: &str, metadata: [(&str, String); N]) -> ErrorInfo {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k.to_owned(), truncate(&v, MAX_METADATA_VALUE_BYTES)))
        .collect();
    ErrorInfo::new(reason, ERROR_DOMAIN, metadata)
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    #[test]
    fn source_errors_name_the_source_and_carry_error_info() {
        let err = Error::Source {
            source_name: "profile".into(),
            error: SourceError::Timeout(Duration::from_millis(500)),
        };
        let status = err.to_status();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(status.message(), "source 'profile': timed out after 500ms");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.metadata["source"], "profile");
        assert_eq!(info.metadata["code"], "DEADLINE_EXCEEDED");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn a_huge_upstream_message_comes_back_bounded() {
        let err = Error::Source {
            source_name: "profile".into(),
            error: SourceError::Grpc {
                code: Code::Internal,
                message: "x".repeat(1 << 20),
            },
        };
        let status = err.to_status();
        assert!(status.message().len() <= MAX_MESSAGE_BYTES + 32);
        assert!(status.message().len() + status.details().len() <= MAX_STATUS_BYTES);
    }

    #[test]
    fn many_failed_sources_keep_the_status_under_the_bound() {
        let failed = (0..500)
            .map(|i| {
                let name: Arc<str> = format!("source-{i}-{}", "n".repeat(40)).into();
                (name, SourceError::Timeout(Duration::from_secs(1)))
            })
            .collect();
        let err = Error::TooFewSucceeded {
            succeeded: 0,
            total: 500,
            min: 1,
            failed,
        };
        let status = err.to_status();
        assert!(status.message().len() + status.details().len() <= MAX_STATUS_BYTES);
        let infos = status.get_error_details_vec();
        assert!(
            infos.len() > 1 && infos.len() < 500,
            "{} details",
            infos.len()
        );
    }
}
