//! A cached answer, how old it is, and what an upstream allows a cache to
//! do with it (`Cache-Control`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, header::CACHE_CONTROL};

/// What an answer's upstream allows a shared cache to do with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Directive {
    /// As the source's `cache` says.
    #[default]
    Default,
    /// `no-store`, `private` or `no-cache`: never stored.
    NoStore,
    /// `max-age` (or `s-maxage`, which a shared cache obeys first): fresh
    /// for at most this long.
    MaxAge(Duration),
}

impl Directive {
    /// Reads a response's `Cache-Control`; directives it does not know are
    /// ignored, as RFC 9111 asks.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let (mut max_age, mut s_maxage) = (None, None);
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                // Not text: no telling what it allows.
                return Self::NoStore;
            };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((name, arg)) => (name.trim(), Some(arg.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                // Delta-seconds too large to hold mean "a very long time"
                // (RFC 9111 5.2.1.1), not "not at all".
                let seconds = || {
                    arg.filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()))
                        .map(|a| a.parse::<u64>().unwrap_or(u64::MAX))
                };
                match name.to_ascii_lowercase().as_str() {
                    "no-store" | "private" | "no-cache" => return Self::NoStore,
                    "max-age" => max_age = seconds().or(Some(0)),
                    "s-maxage" => s_maxage = seconds().or(Some(0)),
                    _ => {}
                }
            }
        }
        match s_maxage.or(max_age) {
            Some(0) => Self::NoStore,
            Some(s) => Self::MaxAge(Duration::from_secs(s)),
            None => Self::Default,
        }
    }

    /// How long an answer is fresh, given the source's `ttl`; `None` when
    /// it is not to be stored.
    pub fn ttl(self, ttl: Duration) -> Option<Duration> {
        match self {
            Self::Default => Some(ttl),
            Self::NoStore => None,
            Self::MaxAge(max) => Some(ttl.min(max)),
        }
    }
}

/// A stored answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub value: serde_json::Value,
    /// When it was stored, in ms since the epoch: replicas share entries,
    /// so the age is told by the wall clock.
    stored_at: u64,
    /// How long it is fresh.
    ttl: Duration,
}

/// Bytes before the JSON in an encoded entry: `stored_at`, then `ttl`, in ms.
const HEADER: usize = 16;

impl Entry {
    pub fn new(value: serde_json::Value, ttl: Duration) -> Self {
        Self {
            value,
            stored_at: now_ms(),
            ttl,
        }
    }

    /// Its age now (zero if the clock went back).
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.stored_at))
    }

    /// How long past its freshness it is (zero while fresh).
    pub fn staleness(&self, age: Duration) -> Option<Duration> {
        age.checked_sub(self.ttl).filter(|s| !s.is_zero())
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 128);
        out.extend_from_slice(&self.stored_at.to_be_bytes());
        let ttl = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        out.extend_from_slice(&ttl.to_be_bytes());
        // Writing a Value to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &self.value);
        out
    }

    /// `None` for bytes that are not an entry (another program's key, or a
    /// format of another version): a miss.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let stored_at = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let ttl = u64::from_be_bytes(bytes.get(8..HEADER)?.try_into().ok()?);
        let value = serde_json::from_slice(&bytes[HEADER..]).ok()?;
        Some(Self {
            value,
            stored_at,
            ttl: Duration::from_millis(ttl),
        })
    }
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directive(values: &[&str]) -> Directive {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(CACHE_CONTROL, v.parse().unwrap());
        }
        Directive::from_headers(&headers)
    }

    #[test]
    fn cache_control_is_honoured() {
        let ttl = Duration::from_secs(30);
        assert_eq!(directive(&[]).ttl(ttl), Some(ttl));
        assert_eq!(directive(&["no-store"]).ttl(ttl), None);
        assert_eq!(directive(&["public, max-age=60", "private"]).ttl(ttl), None);
        assert_eq!(directive(&["No-Cache"]).ttl(ttl), None);
        assert_eq!(
            directive(&["max-age=5"]).ttl(ttl),
            Some(Duration::from_secs(5))
        );
        assert_eq!(directive(&["max-age=600"]).ttl(ttl), Some(ttl));
        assert_eq!(
            directive(&["max-age=600, s-maxage=2"]).ttl(ttl),
            Some(Duration::from_secs(2))
        );
        assert_eq!(directive(&["max-age=0"]).ttl(ttl), None);
        assert_eq!(directive(&["max-age=soon"]).ttl(ttl), None);
        assert_eq!(directive(&["immutable"]).ttl(ttl), Some(ttl));
        assert_eq!(
            directive(&["max-age=99999999999999999999999"]).ttl(ttl),
            Some(ttl)
        );
    }

    #[test]
    fn entries_round_trip_and_garbage_is_no_entry() {
        let entry = Entry::new(
            serde_json::json!({"a": [1, "b"]}),
            Duration::from_millis(1500),
        );
        assert_eq!(Entry::decode(&entry.encode()), Some(entry));
        assert_eq!(Entry::decode(b"short"), None);
        assert_eq!(Entry::decode(&[0; 20]), None);
    }
}
