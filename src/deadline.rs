//! A deadline is a value: computed once at the edge from the caller's
//! `grpc-timeout` and the aggregation's cap, then passed down so every
//! upstream call asks it how much time is left.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn at(instant: Instant) -> Self {
        Self(instant)
    }

    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// The earlier of this deadline and `timeout` from now.
    pub fn cap(self, timeout: Duration) -> Self {
        self.min(Self::after(timeout))
    }

    pub fn instant(self) -> Instant {
        self.0
    }

    pub fn is_expired(self) -> bool {
        Instant::now() >= self.0
    }

    /// Time left, zero once passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// Parses a `grpc-timeout` header value: at most 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`), per the gRPC over HTTP/2 spec.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_garbage() {
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_grpc_timeout(b"999m"),
            Some(Duration::from_millis(999))
        );
        assert_eq!(parse_grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(
            parse_grpc_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            &b""[..],
            b"S",
            b"123456789S",
            b"1x",
            b"-1S",
            b"1.5S",
            b" 1S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_counts_down_and_saturates() {
        let d = Deadline::after(Duration::from_millis(100));
        assert_eq!(d.cap(Duration::from_secs(1)), d);
        tokio::time::advance(Duration::from_millis(40)).await;
        assert_eq!(d.remaining(), Duration::from_millis(60));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(d.remaining(), Duration::ZERO);
    }
}
