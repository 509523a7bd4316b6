//! What one client, one user and one listener may use: publish rate and bandwidth per
//! connection (token buckets), devices per user, connections per listener.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// What a client exceeding the per-user device limit meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceOverflow {
    /// The new connection is refused (CONNACK quota exceeded).
    RefuseNewest,
    /// The user's oldest connection is closed (MQTT 5: DISCONNECT quota exceeded).
    DisconnectOldest,
}

/// Per-client, per-user and per-listener limits; 0 means unlimited.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// PUBLISH packets per second per connection (token bucket).
    pub publish_rate: u32,
    /// Publishes a connection may send at once above the rate (0: the rate).
    pub publish_burst: u32,
    /// PUBLISH bytes per second per connection (token bucket, one second of burst).
    pub publish_bytes_per_s: u64,
    /// Connections one user (identity) may hold at once.
    pub max_devices_per_user: u32,
    /// Which connection gives way when a user has too many.
    pub device_overflow: DeviceOverflow,
    /// Connections each public listener holds at once (checked before TLS or WebSocket).
    pub max_connections_per_listener: usize,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Taking more than there
/// is leaves a debt, which says how long the taker should wait.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.last = now;
    }

    /// Takes `n` if there are that many; `false` otherwise (nothing taken).
    pub(crate) fn try_take(&mut self, n: f64) -> bool {
        self.refill();
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` in any case; returns how long until the debt is paid (zero if none).
    pub(crate) fn take(&mut self, n: f64) -> Duration {
        self.refill();
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// One connection's publish limits.
#[derive(Debug, Default)]
pub(crate) struct PublishLimits {
    rate: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

/// What a publish meets.
#[derive(Debug, PartialEq)]
pub(crate) enum Throttled {
    /// Within the limits.
    No,
    /// Over the message rate: an MQTT 5 client is told (0x96), a 3.1.1 one slowed down.
    Rate(Duration),
    /// Over the bandwidth: reading pauses this long.
    Bytes(Duration),
}

impl PublishLimits {
    pub(crate) fn new(settings: &LimitSettings) -> Self {
        let rate = (settings.publish_rate > 0).then(|| {
            let rate = f64::from(settings.publish_rate);
            let burst = match settings.publish_burst {
                0 => rate,
                burst => f64::from(burst),
            };
            TokenBucket::new(rate, burst)
        });
        let bytes = (settings.publish_bytes_per_s > 0).then(|| {
            let rate = settings.publish_bytes_per_s as f64;
            TokenBucket::new(rate, rate)
        });
        Self { rate, bytes }
    }

    /// Charges one publish of `size` bytes.
    pub(crate) fn charge(&mut self, size: usize) -> Throttled {
        if let Some(rate) = &mut self.rate {
            if !rate.try_take(1.0) {
                let wait = rate.take(1.0);
                return Throttled::Rate(wait);
            }
        }
        match &mut self.bytes {
            Some(bytes) => match bytes.take(size as f64) {
                wait if wait.is_zero() => Throttled::No,
                wait => Throttled::Bytes(wait),
            },
            None => Throttled::No,
        }
    }
}

/// One open connection of a user.
#[derive(Debug)]
struct Held {
    connection: u64,
    client_id: String,
    opened: Instant,
    /// Ends that connection for the limit.
    close: CancellationToken,
}

/// Connections per user, for `max_devices_per_user`.
#[derive(Debug, Default)]
pub(crate) struct Devices {
    by_user: Mutex<HashMap<String, Vec<Held>>>,
}

/// A connection's place in its user's device count, given back when dropped.
#[derive(Debug)]
pub(crate) struct DeviceSlot {
    held: Option<(Arc<Devices>, String, u64)>,
    /// Cancelled when a newer device of the user takes this one's place.
    pub(crate) close: CancellationToken,
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        if let Some((devices, uid, connection)) = &self.held {
            devices.release(uid, *connection);
        }
    }
}

/// Why a connection may not be admitted.
#[derive(Debug)]
pub(crate) struct TooManyDevices;

impl Devices {
    /// Admits connection `connection` of `uid`, closing the user's oldest one or refusing this
    /// one when the user is at the limit; a take-over of the same client id does not count.
    pub(crate) fn admit(
        self: &Arc<Self>,
        settings: &LimitSettings,
        uid: &str,
        client_id: &str,
        connection: u64,
    ) -> Result<DeviceSlot, TooManyDevices> {
        let close = CancellationToken::new();
        let max = settings.max_devices_per_user as usize;
        if max == 0 {
            return Ok(DeviceSlot { held: None, close });
        }
        let mut users = self.by_user.lock().unwrap_or_else(PoisonError::into_inner);
        let held = users.entry(uid.to_owned()).or_default();
        {
            let others = |h: &&Held| h.client_id != client_id;
            while held.iter().filter(others).count() >= max {
                if settings.device_overflow == DeviceOverflow::RefuseNewest {
                    return Err(TooManyDevices);
                }
                let oldest = held
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| h.client_id != client_id)
                    .min_by_key(|(_, h)| h.opened)
                    .map(|(i, _)| i);
                match oldest {
                    Some(i) => held.swap_remove(i).close.cancel(),
                    None => break,
                }
            }
        }
        held.push(Held {
            connection,
            client_id: client_id.to_owned(),
            opened: Instant::now(),
            close: close.clone(),
        });
        Ok(DeviceSlot {
            held: Some((Arc::clone(self), uid.to_owned(), connection)),
            close,
        })
    }

    /// Connection `connection` of `uid` ended.
    fn release(&self, uid: &str, connection: u64) {
        let mut users = self.by_user.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = users.get_mut(uid) {
            held.retain(|h| h.connection != connection);
            if held.is_empty() {
                users.remove(uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max: u32, overflow: DeviceOverflow) -> LimitSettings {
        LimitSettings {
            max_devices_per_user: max,
            device_overflow: overflow,
            ..crate::config::Config::default().limits
        }
    }

    #[test]
    fn buckets_allow_the_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10.0, 3.0);
        assert!(bucket.try_take(1.0) && bucket.try_take(1.0) && bucket.try_take(1.0));
        assert!(!bucket.try_take(1.0));
        let wait = bucket.take(1.0);
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
    }

    #[test]
    fn devices_per_user() {
        let devices = Arc::new(Devices::default());
        let refuse = settings(2, DeviceOverflow::RefuseNewest);
        let _a = devices.admit(&refuse, "u", "a", 1);
        let b = devices.admit(&refuse, "u", "b", 2);
        assert!(b.is_ok());
        assert!(devices.admit(&refuse, "u", "c", 3).is_err());
        assert!(
            devices.admit(&refuse, "u", "a", 4).is_ok(),
            "a take-over of a"
        );
        drop(b);
        assert!(devices.admit(&refuse, "u", "c", 5).is_ok());
        let oldest = settings(1, DeviceOverflow::DisconnectOldest);
        let devices = Arc::new(Devices::default());
        let first = devices.admit(&oldest, "v", "a", 1);
        let _second = devices.admit(&oldest, "v", "b", 2);
        assert!(first.is_ok_and(|slot| slot.close.is_cancelled()));
    }
}
