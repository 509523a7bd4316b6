//! Packet ids towards the client. rumqttd numbers its publishes to the client, and the hook
//! layer writes deliveries, digests and replies into the same connection: every outgoing id
//! is allocated here, so the two never collide, and mapped back when the client acks.

use std::collections::HashMap;

use crate::im::Conversation;

/// Who a client-side packet id belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A rumqttd publish, with rumqttd's own id.
    Upstream(u16),
    /// A live chat delivery; the ack records it for the device.
    Chat {
        /// The conversation.
        conversation: Conversation,
        /// Seq of the message.
        seq: u64,
    },
    /// A digest or reply written by the hook layer.
    Own,
}

/// The client-side id space of one connection.
#[derive(Debug)]
pub(crate) struct PacketIds {
    next: u16,
    used: HashMap<u16, Origin>,
    by_upstream: HashMap<u16, u16>,
}

impl Default for PacketIds {
    fn default() -> Self {
        Self {
            next: 1,
            used: HashMap::new(),
            by_upstream: HashMap::new(),
        }
    }
}

impl PacketIds {
    /// A free id for `origin`, or `None` if all 65535 are in flight.
    pub(crate) fn allocate(&mut self, origin: Origin) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next;
            self.next = if self.next == u16::MAX {
                1
            } else {
                self.next + 1
            };
            if !self.used.contains_key(&id) {
                if let Origin::Upstream(upstream) = origin {
                    self.by_upstream.insert(upstream, id);
                }
                self.used.insert(id, origin);
                return Some(id);
            }
        }
        None
    }

    /// Packets in flight towards the client.
    pub(crate) fn in_flight(&self) -> usize {
        self.used.len()
    }

    /// The client id for rumqttd's id `upstream`, reusing it for a retransmission.
    pub(crate) fn for_upstream(&mut self, upstream: u16) -> Option<u16> {
        match self.by_upstream.get(&upstream) {
            Some(id) => Some(*id),
            None => self.allocate(Origin::Upstream(upstream)),
        }
    }

    /// The client id already mapped to rumqttd's id `upstream` (for PUBREL).
    pub(crate) fn mapped(&self, upstream: u16) -> Option<u16> {
        self.by_upstream.get(&upstream).copied()
    }

    /// Who owns `id`, keeping it in flight (PUBREC).
    pub(crate) fn owner(&self, id: u16) -> Option<&Origin> {
        self.used.get(&id)
    }

    /// Frees `id` (PUBACK, PUBCOMP) and returns who owned it.
    pub(crate) fn release(&mut self, id: u16) -> Option<Origin> {
        let origin = self.used.remove(&id)?;
        if let Origin::Upstream(upstream) = origin {
            self.by_upstream.remove(&upstream);
        }
        Some(origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_and_own_ids_never_collide() {
        let mut ids = PacketIds::default();
        let own = ids.allocate(Origin::Own).unwrap();
        let relayed = ids.for_upstream(own).unwrap();
        assert_ne!(own, relayed);
        assert_eq!(ids.for_upstream(own), Some(relayed));
        assert_eq!(ids.release(relayed), Some(Origin::Upstream(own)));
        assert_eq!(ids.mapped(own), None);
        assert_eq!(ids.release(own), Some(Origin::Own));
    }

    #[test]
    fn exhaustion_is_reported() {
        let mut ids = PacketIds::default();
        for _ in 0..u16::MAX {
            assert!(ids.allocate(Origin::Own).is_some());
        }
        assert!(ids.allocate(Origin::Own).is_none());
    }
}
