//! The `[im]` and `[cluster]` sections: the IM topics, digests, pages, background work and
//! retention, and the nodes that share one store and one Redis.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{Period, Problems, DAY};
use crate::store::{GroupErasure, RedisSettings};

/// IM behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// First topic level of every IM topic.
    pub prefix: String,
    /// Newest messages per conversation in a digest.
    pub digest_last_n: usize,
    /// Page size of a Pull or History that asks for none.
    pub page_size_default: usize,
    /// Largest page; bigger requests are capped.
    pub page_size_max: usize,
    /// Largest chat payload, in bytes.
    pub max_message_bytes: usize,
    /// How often online senders get the batched read-receipt updates.
    pub receipt_interval: Period,
    /// How often this node reads the removal log, to cut off members removed elsewhere (on
    /// another node or by an operator's command).
    pub removal_poll: Period,
    /// How often acknowledged live deliveries are written, merged per device and
    /// conversation (a Pull or digest of the device, or its leaving, writes its own at once).
    pub live_ack_flush: Period,
    /// Unacknowledged messages a device keeps per conversation (0: no cap): a phone back
    /// from a month offline pages through at most this many, and learns how many it missed.
    pub max_backlog: u64,
    /// A device unseen this long is forgotten, so it holds no state for good.
    pub device_ttl: Period,
    /// How long messages are kept.
    pub retention: RetentionSettings,
    /// How often retention and device expiry run.
    pub gc_interval: Period,
    /// Rows one garbage-collection step deletes (one short transaction each).
    pub gc_batch: usize,
    /// What erasing a user does to its group messages.
    pub erase_group_messages: GroupErasure,
}

/// How long messages are kept, per kind of conversation: `im.retention = "30d"` for both, or
/// a table with `direct` and `group`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(try_from = "RetentionForm")]
pub struct RetentionSettings {
    /// 1:1 chats.
    pub direct: Period,
    /// Groups.
    pub group: Period,
}

/// The two ways `im.retention` may be written.
#[derive(Deserialize)]
#[serde(untagged)]
enum RetentionForm {
    Both(String),
    PerKind { direct: String, group: String },
}

impl TryFrom<RetentionForm> for RetentionSettings {
    type Error = String;

    fn try_from(form: RetentionForm) -> Result<Self, Self::Error> {
        match form {
            RetentionForm::Both(text) => {
                let period: Period = text.parse()?;
                Ok(Self {
                    direct: period,
                    group: period,
                })
            }
            RetentionForm::PerKind { direct, group } => Ok(Self {
                direct: direct.parse().map_err(|e| format!("direct: {e}"))?,
                group: group.parse().map_err(|e| format!("group: {e}"))?,
            }),
        }
    }
}

/// Scale-out: presence per node and hand-over of live messages through Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Redis URL; empty runs a single node without Redis. With `redis_cluster`, the
    /// comma-separated seed URLs of a Redis Cluster.
    pub redis_url: String,
    /// Whether `redis_url` names a Redis Cluster (keys spread by hash slot, sharded pub/sub).
    pub redis_cluster: bool,
    /// This node's id; empty generates one at start.
    pub node_id: String,
    /// Prefix of every Redis key and channel (several deployments or tests can share Redis).
    pub key_prefix: String,
    /// How often this node refreshes its liveness and its devices' presence.
    pub heartbeat: Period,
    /// A node that has not refreshed within this time no longer counts as holding its users.
    pub node_ttl: Period,
    /// A Redis call unanswered this long fails; the digest is then computed from the store.
    pub redis_timeout: Period,
}

impl Settings {
    /// Values that parse but cannot work.
    pub fn check(&self, problems: &mut Problems) {
        let prefix = &self.prefix;
        problems.check(
            !prefix.is_empty() && !prefix.contains(['/', '+', '#', '$']),
            "im.prefix: must be one topic level without '/', '+', '#' or '$'",
        );
        problems.check(
            self.page_size_max >= 1,
            "im.page_size_max: must be at least 1",
        );
        problems.check(
            (1..=self.page_size_max).contains(&self.page_size_default),
            "im.page_size_default: must be between 1 and im.page_size_max",
        );
        let (ms, minute) = (Duration::from_millis(1), Duration::from_secs(60));
        let ten_ms = Duration::from_millis(10);
        problems.within("im.receipt_interval", self.receipt_interval, ten_ms, DAY);
        problems.within("im.removal_poll", self.removal_poll, ten_ms, DAY);
        problems.within("im.live_ack_flush", self.live_ack_flush, ms, minute);
        problems.check(self.digest_last_n <= 50, "im.digest_last_n: at most 50");
        problems.within("im.gc_interval", self.gc_interval, ms, DAY);
        problems.check(
            (1..=100_000).contains(&self.gc_batch),
            "im.gc_batch: between 1 and 100000",
        );
        // Each node marks its connected devices as seen once a round; a shorter time to live
        // would let another node's round expire them while they are connected.
        problems.check(
            self.device_ttl.get().is_none_or(|ttl| {
                let rounds = self.gc_interval.0.checked_mul(2);
                rounds.is_some_and(|two_rounds| ttl >= two_rounds)
            }),
            "im.device_ttl: 0 or at least twice im.gc_interval",
        );
        problems.check(
            self.max_message_bytes >= 64,
            "im.max_message_bytes: must be at least 64",
        );
    }
}

impl ClusterSettings {
    /// How to reach the cluster's Redis.
    pub fn redis(&self) -> RedisSettings<'_> {
        RedisSettings {
            url: &self.redis_url,
            cluster: self.redis_cluster,
            prefix: &self.key_prefix,
            timeout: self.redis_timeout.0,
        }
    }

    /// Values that parse but cannot work.
    pub fn check(&self, problems: &mut Problems) {
        let fifty_ms = Duration::from_millis(50);
        problems.within("cluster.heartbeat", self.heartbeat, fifty_ms, DAY);
        problems.check(
            self.node_ttl.0 > self.heartbeat.0 && self.node_ttl.0 <= DAY,
            "cluster.node_ttl: must exceed cluster.heartbeat (at most 1d)",
        );
        let ms = Duration::from_millis(1);
        problems.within("cluster.redis_timeout", self.redis_timeout, ms, DAY);
        problems.check(
            self.node_id.len() <= 64 && !self.node_id.contains([':', ' ']),
            "cluster.node_id: at most 64 characters, no ':' or spaces",
        );
    }
}
