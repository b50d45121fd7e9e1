//! Every call's request id: the caller's `x-request-id` when it is
//! well-formed (1 to 128 visible ASCII characters), else one made here. It
//! names the call in the log, goes back to the caller in the response
//! metadata, and is what a source forwarding `x-request-id` sends on.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The call's id; a malformed or missing one in `metadata` is replaced by a
/// new one, so that everything reading the metadata sees the same.
pub fn take(metadata: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = metadata
        .get(X_REQUEST_ID)
        .filter(|v| well_formed(v.as_bytes()))
    {
        return id.clone();
    }
    let id = generate();
    metadata.insert(X_REQUEST_ID, id.clone());
    id
}

fn well_formed(id: &[u8]) -> bool {
    (1..=128).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// 32 random hex digits.
fn generate() -> HeaderValue {
    let n = fastrand::u128(..);
    HeaderValue::try_from(format!("{n:032x}")).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_id_is_kept_and_anything_else_replaced() {
        let mut metadata = HeaderMap::new();
        metadata.insert(X_REQUEST_ID, HeaderValue::from_static("req-42"));
        assert_eq!(take(&mut metadata), "req-42");
        for bad in ["", "has space", &"x".repeat(129)] {
            let mut metadata = HeaderMap::new();
            metadata.insert(X_REQUEST_ID, HeaderValue::try_from(bad).unwrap());
            let id = take(&mut metadata);
            assert_eq!(id.len(), 32, "{bad:?} gave {id:?}");
            assert_eq!(metadata[X_REQUEST_ID], id);
        }
        let mut none = HeaderMap::new();
        let (a, b) = (take(&mut none), take(&mut HeaderMap::new()));
        assert_ne!(a, b);
        assert!(well_formed(&"x".repeat(128).into_bytes()));
    }
}
