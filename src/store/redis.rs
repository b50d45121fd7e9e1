//! The Redis store: one multiplexed connection, managed by the `redis`
//! crate, which reconnects by itself; and the GCRA as one script, so that
//! a decision is atomic however many replicas ask at once.

use std::time::Duration;

use redis::{
    AsyncCommands, Client, RedisResult, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

/// How long connecting may take. Calls do not wait for it: each store
/// operation has its own budget, and fails while the connection is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest wait between two attempts to reconnect.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// The generic cell rate algorithm on a bucket that holds its theoretical
/// arrival time (µs, on Redis's clock, so replicas' clocks do not matter).
/// Returns `{1, 0}` when the call may go, `{0, µs to wait}` when not.
const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - tolerance > now then
  return {0, tat - tolerance - now}
end
local next = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.max(1, math.ceil((next - now) / 1000)))
return {1, 0}
";

/// A rate limit's parameters for one decision.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    /// One call per this, on average...
    pub interval: Duration,
    /// ...and this many at once.
    pub burst: u32,
}

pub struct Redis {
    connection: ConnectionManager,
    gcra: Script,
}

impl Redis {
    pub fn connect(url: &str) -> RedisResult<Self> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            // Back within a second of Redis coming back, however long it
            // was gone.
            .set_max_delay(MAX_RECONNECT_DELAY)
            // Operations are bounded by the caller (`store_timeout`).
            .set_response_timeout(None);
        Ok(Self {
            connection: ConnectionManager::new_lazy_with_config(client, config)?,
            gcra: Script::new(GCRA),
        })
    }

    pub async fn get(&self, key: &str) -> RedisResult<Option<Vec<u8>>> {
        self.connection.clone().get(key).await
    }

    pub async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> RedisResult<()> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.connection.clone().pset_ex(key, value, ms).await
    }

    /// `Ok(())` when the call may go; `Err(wait)` when it must come back
    /// after `wait`.
    pub async fn gcra(&self, key: &str, gcra: Gcra) -> RedisResult<Result<(), Duration>> {
        let interval = u64::try_from(gcra.interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let (allowed, wait): (i64, i64) = self
            .gcra
            .key(key)
            .arg(interval)
            .arg(gcra.burst)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(match allowed {
            1 => Ok(()),
            _ => Err(Duration::from_micros(wait.max(0).unsigned_abs())),
        })
    }
}
