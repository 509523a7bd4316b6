//! A session that moved here from another node (see `cluster::moves`): the connection
//! starts from its subscriptions, and what the old node had queued arrives later as an
//! event. Also where events from outside the connection are sorted.

use std::sync::Arc;

use super::Session;
use crate::edge::cluster::Moved;
use crate::edge::sink::SessionEvent;
use crate::wire::pb;

impl Session {
    /// Applies what reached this connection from outside it.
    pub(in crate::edge) fn on_event(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Device(event) => self.on_device_event(event),
            SessionEvent::Shared { filter, publish } => self.on_shared(&filter, &publish),
            SessionEvent::Restored(messages) => self.on_restored(&messages),
        }
    }

    /// Starts from a session taken over from another node: its plain subscriptions are in
    /// place at rumqttd already (with their routes), the shared ones are joined, and what
    /// the old node queued is awaited.
    pub(super) fn start_moved(&mut self, moved: Moved) {
        let Some(cluster) = self.ctx.cluster.clone() else {
            return;
        };
        self.hold_resumed(moved.plain);
        self.rejoin_shared(moved.shared);
        cluster.await_rest(&self.client_id, Arc::clone(&self.sink));
    }

    /// What the session had queued on the node it moved from, oldest first.
    fn on_restored(&mut self, messages: &[pb::Forward]) {
        for publish in messages {
            self.write_forwarded(publish, 2);
        }
    }
}
