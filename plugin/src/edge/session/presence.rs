//! The device as the IM service sees it: online while the connection holds its inbox
//! subscription, the live events pushed to it, and how the session leaves (presence, group
//! watches, a persistent session's IM subscriptions, a DISCONNECT that says why).

use std::sync::Arc;

use bytes::Bytes;

use super::{End, Lifetime, Session};
use crate::domain::Conversation;
use crate::edge::codec::Protocol;
use crate::edge::topics::Topics;
use crate::im::DeviceEvent;

impl Session {
    /// The connection ends for `end`: presence and group watches end, a persistent session
    /// keeps its IM subscriptions, and an MQTT 5 client is told why the server closes.
    /// Called once every started operation has been applied.
    pub(in crate::edge) fn leave(&mut self, end: &End) {
        if matches!(end, End::TakenOver) {
            // The session lives on in the newer connection, whatever this one's expiry: it
            // is the latest connection the session lasts as long as.
            self.lifetime = Lifetime::Forever;
        }
        self.go_offline();
        for (_, gid) in self.group_filters() {
            self.ctx.im.unwatch_group(&gid, self.id);
        }
        let persists = self.lifetime.persists();
        if let (true, Some(device)) = (persists, &self.im) {
            let filters = std::mem::take(&mut self.im_filters);
            self.ctx.keep_session(device, filters);
        }
        if let Lifetime::For(interval) = self.lifetime {
            let at = tokio::time::Instant::now() + interval;
            self.ctx
                .expiring
                .expire_at(&self.client_id, at, self.im.as_ref());
        }
        self.leave_routes();
        if let Some(cluster) = &self.ctx.cluster {
            cluster.client_left(&self.client_id, !persists);
        }
        self.say_why(end);
    }

    /// rumqttd has closed this client's link: a session linked without a clean session
    /// stays with rumqttd, and the client's next connection links at once to resume it —
    /// or to discard it, when it was to end with the connection (MQTT 5 Session Expiry
    /// Interval 0 on a resumed session: rumqttd knows no expiry).
    pub(in crate::edge) fn link_closed(&mut self) {
        let persists = self.lifetime.persists();
        if persists || !self.clean_start {
            self.ctx.keep_upstream_session(&self.client_id);
        }
        if !persists && !self.clean_start {
            let now = tokio::time::Instant::now();
            self.ctx
                .expiring
                .expire_at(&self.client_id, now, self.im.as_ref());
        }
    }

    /// Marks the device online for live delivery.
    pub(super) fn go_online(&mut self) {
        if let (false, Some(device)) = (self.online, &self.im) {
            self.online = true;
            let sink = Arc::clone(&self.sink);
            self.ctx.im.online(device, self.id, sink);
        }
    }

    /// Marks the device offline (unsubscribed or gone).
    pub(super) fn go_offline(&mut self) {
        if let (true, Some(device)) = (self.online, &self.im) {
            self.online = false;
            self.ctx.im.offline(device, self.id);
        }
    }

    /// Tells an MQTT 5 client why the server closes its connection (3.1.1 has no way to).
    fn say_why(&mut self, end: &End) {
        use rumqttd::protocol::{
            Disconnect, DisconnectProperties, DisconnectReasonCode as Reason, Packet,
        };
        let (reason_code, why) = match end {
            End::Shutdown => (Reason::ServerShuttingDown, "server shutting down"),
            End::TakenOver => (
                Reason::SessionTakenOver,
                "another connection took the session",
            ),
            End::KeepAliveExpired => (Reason::KeepAliveTimeout, "keep-alive expired"),
            End::CredentialsExpired => (Reason::MaximumConnectTime, "credentials expired"),
            End::TooManyDevices => (
                Reason::QuotaExceeded,
                "a newer device of this user took this connection's place",
            ),
            End::ReceiveMaximumExceeded => (
                Reason::ReceiveMaximumExceeded,
                "more unacknowledged QoS 1 and 2 publishes than Receive Maximum",
            ),
            End::Evicted => (
                Reason::AdministrativeAction,
                "an operator forgot this device or erased its user",
            ),
            _ => return,
        };
        if self.version == Protocol::V5 {
            // With properties: rumqttd 0.20 miscounts the length of a DISCONNECT without them.
            let properties = DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(why.to_owned()),
                user_properties: Vec::new(),
                server_reference: None,
            };
            let packet = Packet::Disconnect(Disconnect { reason_code }, Some(properties));
            if let Err(e) = self.outbox.write_packet(packet) {
                tracing::debug!(error = %e, "cannot write DISCONNECT");
            }
        }
    }

    /// Applies what the IM service pushed to this connection.
    pub(super) fn on_device_event(&mut self, event: DeviceEvent) {
        match event {
            DeviceEvent::Chat {
                conversation,
                seq,
                payload,
            } => {
                let topic = match conversation.gid() {
                    Some(gid) => Some(self.ctx.topics.group(gid)),
                    None => self.own_topic(Topics::inbox),
                };
                if let Some(topic) = topic {
                    self.deliver(&topic, conversation, seq, &payload);
                }
            }
            DeviceEvent::Notice(payload) => {
                let Some(resp) = self.own_topic(Topics::response) else {
                    return;
                };
                if let Some(qos) = self.granted_qos(&resp) {
                    self.outbox.own_publish(&resp, qos.min(1), &[], &payload);
                }
            }
            DeviceEvent::Revoked { group } => {
                let topic = self.ctx.topics.group(&group);
                self.im_filters.remove(&topic);
                self.ctx.im.unwatch_group(&group, self.id);
                tracing::debug!(%group, "removed from the group: subscription dropped");
            }
            // Never queued: the sink cancels a token that ends the connection.
            DeviceEvent::TakenOver | DeviceEvent::Evicted => {}
        }
    }

    /// Writes a live chat message to `topic` if this connection subscribed to it.
    fn deliver(&mut self, topic: &str, conversation: Conversation, seq: u64, payload: &Bytes) {
        if let Some(qos) = self.granted_qos(topic) {
            self.outbox
                .live_chat(topic, qos.min(1), conversation, seq, payload);
        }
    }

    /// Highest QoS among this connection's IM filters matching `topic`.
    pub(super) fn granted_qos(&self, topic: &str) -> Option<u8> {
        self.im_filters
            .iter()
            .filter(|(filter, _)| rumqttd::protocol::matches(topic, filter))
            .map(|(_, qos)| *qos)
            .max()
    }
}
