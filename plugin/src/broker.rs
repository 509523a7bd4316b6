//! The rumqttd embedded behind the hook layer: the `[broker]` section that sizes it when no
//! `rumqttd.toml` does.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{Period, Problems};

/// Bounded router settings for rumqttd: IM traffic never enters its router, so small
/// commit logs are enough for pass-through topics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Connections rumqttd accepts.
    pub max_connections: usize,
    /// rumqttd listeners for the hook layer's links (each accepts about 1,000 per second).
    pub private_listeners: usize,
    /// Bytes per commit-log segment of each topic filter.
    pub max_segment_size: usize,
    /// Segments kept per filter.
    pub max_segment_count: usize,
    /// Unacknowledged QoS 1/2 publishes per connection.
    pub max_inflight_count: usize,
    /// Largest packet a client may send, in bytes.
    pub max_packet_size: usize,
    /// Time a new connection has for its transport handshake, then again for CONNECT (and
    /// rumqttd to accept a link).
    pub connect_timeout: Period,
}

impl Settings {
    /// Values that parse but cannot work.
    pub fn check(&self, problems: &mut Problems) {
        problems.check(
            self.max_segment_size >= 1024,
            "broker.max_segment_size: at least 1024",
        );
        problems.check(
            self.max_segment_count >= 1,
            "broker.max_segment_count: at least 1",
        );
        problems.check(
            self.max_connections >= 1,
            "broker.max_connections: at least 1",
        );
        problems.check(
            (1..=u16::MAX as usize).contains(&self.max_inflight_count),
            "broker.max_inflight_count: between 1 and 65535",
        );
        problems.check(
            self.max_packet_size >= 1024,
            "broker.max_packet_size: at least 1024",
        );
        problems.within(
            "broker.connect_timeout",
            self.connect_timeout,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        );
    }
}
