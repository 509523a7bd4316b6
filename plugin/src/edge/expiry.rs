//! How long a session outlives its connection. rumqttd 0.20 knows only 3.1.1's clean
//! session (kept for ever, or dropped at once) and ignores MQTT 5's Session Expiry Interval,
//! so the hook layer keeps the clock: a session is kept for its interval after its
//! connection ends, and a CONNECT after that starts a new one (session present false).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::codec::Protocol;
use crate::domain::Device;

/// MQTT 5's Session Expiry Interval meaning "never".
const NEVER: u32 = u32::MAX;

/// How long a session lasts after its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// It ends with the connection (3.1.1 clean session; MQTT 5 interval 0, the default).
    Ends,
    /// MQTT 5: this long after the connection ends.
    For(Duration),
    /// A 3.1.1 persistent session; MQTT 5 interval 0xFFFFFFFF.
    Forever,
}

impl Lifetime {
    /// The lifetime a CONNECT asks for.
    pub(crate) fn of(version: Protocol, clean_session: bool, interval: Option<u32>) -> Self {
        match version {
            Protocol::V4 if clean_session => Self::Ends,
            Protocol::V4 => Self::Forever,
            Protocol::V5 => Self::interval(interval.unwrap_or(0)),
        }
    }

    /// The lifetime of an MQTT 5 Session Expiry Interval (CONNECT or DISCONNECT).
    pub(crate) fn interval(seconds: u32) -> Self {
        match seconds {
            0 => Self::Ends,
            NEVER => Self::Forever,
            seconds => Self::For(Duration::from_secs(u64::from(seconds))),
        }
    }

    /// Whether the session outlives its connection at all.
    pub(crate) fn persists(self) -> bool {
        self != Self::Ends
    }
}

/// Sessions whose connection ended and that expire at a known time, by client id (with
/// the IM device they belong to, if any).
#[derive(Debug, Default)]
pub(crate) struct Expiring {
    at: Mutex<HashMap<String, (Instant, Option<Device>)>>,
}

impl Expiring {
    /// The session of `client_id` ends at `at` unless its client comes back before.
    pub(crate) fn expire_at(&self, client_id: &str, at: Instant, device: Option<&Device>) {
        if let Ok(mut expiring) = self.at.lock() {
            expiring.insert(client_id.to_owned(), (at, device.cloned()));
        }
    }

    /// Whether the session of `client_id` expired by `now`: then it is forgotten here (and
    /// the caller ends it) with its device; a session that did not is the caller's again
    /// (a CONNECT resuming it), and no longer expires.
    pub(crate) fn expired(&self, client_id: &str, now: Instant) -> Option<Option<Device>> {
        let taken = self.at.lock().ok().and_then(|mut e| e.remove(client_id));
        taken.and_then(|(at, device)| (at <= now).then_some(device))
    }

    /// The client ids whose sessions are due by `now`.
    pub(crate) fn due(&self, now: Instant) -> Vec<String> {
        let Ok(expiring) = self.at.lock() else {
            return Vec::new();
        };
        let due = expiring.iter().filter(|(_, (at, _))| *at <= now);
        due.map(|(client_id, _)| client_id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_versions_map_to_lifetimes() {
        assert_eq!(Lifetime::of(Protocol::V4, true, Some(9)), Lifetime::Ends);
        assert_eq!(Lifetime::of(Protocol::V4, false, None), Lifetime::Forever);
        assert_eq!(Lifetime::of(Protocol::V5, false, None), Lifetime::Ends);
        assert_eq!(
            Lifetime::of(Protocol::V5, true, Some(u32::MAX)),
            Lifetime::Forever
        );
        let five = Lifetime::of(Protocol::V5, true, Some(5));
        assert_eq!(five, Lifetime::For(Duration::from_secs(5)));
        assert!(five.persists() && !Lifetime::Ends.persists());
    }

    #[test]
    fn a_session_expires_only_once_its_time_passed() {
        let expiring = Expiring::default();
        let now = Instant::now();
        expiring.expire_at("a", now + Duration::from_secs(5), None);
        assert!(expiring.due(now).is_empty());
        assert_eq!(expiring.expired("a", now), None);
        // Taken back by that connection: nothing expires any more.
        assert_eq!(expiring.expired("a", now + Duration::from_secs(9)), None);
        expiring.expire_at("a", now, None);
        assert_eq!(expiring.due(now), vec!["a".to_string()]);
        assert_eq!(expiring.expired("a", now), Some(None));
        assert!(expiring.due(now).is_empty());
    }
}
