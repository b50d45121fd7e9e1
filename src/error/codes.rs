//! gRPC codes: their canonical names (what logs, ErrorInfo metadata and
//! metrics show), the HTTP statuses that map to them, and the order in which
//! one is chosen to stand for several failures.

use tonic::Code;

/// The canonical name: `NOT_FOUND`, not `NotFound`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Maps an HTTP status the way google.rpc.Code documents it.
pub fn http_status_code(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        416 => Code::OutOfRange,
        429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ if status.is_success() => Code::Ok,
        _ if status.is_client_error() => Code::FailedPrecondition,
        _ if status.is_server_error() => Code::Internal,
        _ => Code::Unknown,
    }
}

/// Which code speaks for a call that failed through several sources (the
/// `min_success` error): lower ranks first. What the caller can fix comes
/// first (its request, then its credentials), then what waiting may fix
/// (capacity, availability, time), and last what nobody but the upstream's
/// owners can fix.
pub fn rank(code: Code) -> u8 {
    match code {
        Code::InvalidArgument => 0,
        Code::FailedPrecondition => 1,
        Code::OutOfRange => 2,
        Code::NotFound => 3,
        Code::Unauthenticated => 4,
        Code::PermissionDenied => 5,
        Code::ResourceExhausted => 6,
        Code::DeadlineExceeded => 8,
        Code::Internal => 9,
        Code::Unknown => 10,
        Code::DataLoss => 11,
        // UNAVAILABLE and every code not named above.
        _ => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_the_google_rpc_way() {
        for (status, code) in [
            (400, Code::InvalidArgument),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::NotFound),
            (409, Code::Aborted),
            (429, Code::ResourceExhausted),
            (500, Code::Internal),
            (501, Code::Unimplemented),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::DeadlineExceeded),
        ] {
            let status = http::StatusCode::from_u16(status).unwrap();
            assert_eq!(http_status_code(status), code, "{status}");
        }
    }

    #[test]
    fn names_are_the_canonical_ones() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(Code::Ok), "OK");
    }

    #[test]
    fn the_rank_follows_the_documented_order() {
        let order = [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::OutOfRange,
            Code::NotFound,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
        ];
        for pair in order.windows(2) {
            assert!(rank(pair[0]) < rank(pair[1]), "{pair:?}");
        }
        for unnamed in [
            Code::Aborted,
            Code::AlreadyExists,
            Code::Unimplemented,
            Code::Cancelled,
        ] {
            assert_eq!(rank(unnamed), rank(Code::Unavailable), "{unnamed:?}");
        }
    }
}
