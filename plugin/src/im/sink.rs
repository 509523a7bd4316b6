//! How the IM service reaches a device without knowing MQTT: the edge implements this for
//! each connection it owns.

use bytes::Bytes;

use crate::domain::{Conversation, Gid};

/// Something the IM service wants written into one device's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// A live chat message for the device's inbox; once the device acknowledges it, the
    /// edge reports it through `ImService::delivered`.
    Chat {
        /// The conversation, for the acknowledgement.
        conversation: Conversation,
        /// Seq, for the acknowledgement.
        seq: u64,
        /// Encoded `Envelope`; a group's message goes to the group's topic, not the inbox.
        payload: Bytes,
    },
    /// An encoded `Response` pushed to the device's `resp` topic (receipt updates).
    Notice(Bytes),
    /// The user was removed from the group: drop the connection's subscription to it, so
    /// that nothing of the group reaches it any more.
    Revoked {
        /// The group.
        group: Gid,
    },
    /// The same client id connected to another node: this connection is stale and ends,
    /// as in a session take-over within one node.
    TakenOver,
    /// An operator forgot the device or erased its user: the connection ends.
    Evicted,
}

/// One device connection, as seen from the IM service.
pub trait DeviceSink: Send + Sync + std::fmt::Debug {
    /// Queues an event without waiting; `false` if the connection is gone or saturated, in
    /// which case the message simply stays in the device's backlog.
    fn push(&self, event: DeviceEvent) -> bool;
}
