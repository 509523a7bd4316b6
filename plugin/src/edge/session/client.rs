//! What the client sends besides PUBLISH: acknowledgements of what it was sent (mapped back
//! to rumqttd's ids, or recorded as delivered), SUBSCRIBE and UNSUBSCRIBE, pings, DISCONNECT.

use rumqttd::protocol::Packet;
use tokio::time::Instant;

use super::outcome::Outcome;
use super::packet_ids::Origin;
use super::{End, Lifetime, Session};
use crate::edge::codec::{kind, Frame, Protocol};
use crate::edge::EdgeError;

impl Session {
    /// Handles one frame from the client, which arrived at `now`.
    pub(in crate::edge) fn on_client_frame(
        &mut self,
        frame: Frame,
        now: Instant,
    ) -> Result<(), EdgeError> {
        match frame.kind() {
            kind::PUBLISH => self.on_client_publish(&frame, now),
            kind::PUBACK => {
                match self.outbox.release(frame.ack_pkid()?)? {
                    Some(Origin::Upstream(pkid)) => {
                        self.upstream_acks
                            .answered(pkid, kind::PUBACK, &mut self.to_rumqttd);
                    }
                    Some(Origin::Chat { conversation, seq }) => {
                        if let Some(device) = &self.im {
                            self.ctx.im.delivered(device, &conversation, seq);
                        }
                    }
                    Some(Origin::Own) | None => {}
                }
                Ok(())
            }
            kind::PUBREC => {
                let pkid = frame.ack_pkid()?;
                match self.outbox.owner(pkid) {
                    Some(Origin::Upstream(upstream)) => {
                        let upstream = *upstream;
                        self.upstream_acks
                            .answered(upstream, kind::PUBREC, &mut self.to_rumqttd);
                    }
                    // A QoS 2 publish of the hook layer's own: released at PUBCOMP.
                    Some(Origin::Own) => self.outbox.ack(kind::PUBREL, pkid),
                    Some(Origin::Chat { .. }) | None => {}
                }
                Ok(())
            }
            kind::PUBREL => {
                let pkid = frame.ack_pkid()?;
                self.forwarded_qos2.remove(&pkid);
                if self.im_qos2.remove(&pkid) || !self.linked {
                    // Ours, or unknown to anyone (rumqttd never had this client).
                    self.outbox.ack(kind::PUBCOMP, pkid);
                } else {
                    crate::edge::codec::write_ack(&mut self.to_rumqttd, kind::PUBREL, pkid);
                }
                Ok(())
            }
            kind::PUBCOMP => {
                if let Some(Origin::Upstream(pkid)) = self.outbox.release(frame.ack_pkid()?)? {
                    crate::edge::codec::write_ack(&mut self.to_rumqttd, kind::PUBCOMP, pkid);
                }
                Ok(())
            }
            kind::SUBSCRIBE => match frame.decode(self.version, self.listener.max_packet)? {
                Packet::Subscribe(subscribe, properties) => {
                    self.on_subscribe(subscribe, properties);
                    Ok(())
                }
                _ => Err(EdgeError::Protocol("malformed SUBSCRIBE")),
            },
            kind::UNSUBSCRIBE => match frame.decode(self.version, self.listener.max_packet)? {
                Packet::Unsubscribe(unsubscribe, properties) => {
                    self.on_unsubscribe(unsubscribe, properties);
                    Ok(())
                }
                _ => Err(EdgeError::Protocol("malformed UNSUBSCRIBE")),
            },
            kind::PINGREQ => {
                self.outbox.raw(&[kind::PINGRESP << 4, 0]);
                Ok(())
            }
            kind::DISCONNECT => {
                self.on_disconnect(frame);
                Ok(())
            }
            _ => Err(EdgeError::Protocol("unexpected packet type from client")),
        }
    }

    /// The client says goodbye: rumqttd hears it after what the client sent before (still
    /// in the ordered operations), so that it drops the will; nothing more is read.
    fn on_disconnect(&mut self, frame: Frame) {
        if let Ok(Packet::Disconnect(_, Some(properties))) =
            frame.decode(self.version, self.listener.max_packet)
        {
            // MQTT 5 lets DISCONNECT change the session's expiry, but not from 0 (a session
            // already to end with the connection stays so).
            if let (Some(seconds), true) =
                (properties.session_expiry_interval, self.lifetime.persists())
            {
                self.lifetime = Lifetime::interval(seconds);
            }
        }
        let farewell = match self.version {
            Protocol::V5 => frame.bytes,
            Protocol::V4 => bytes::Bytes::from_static(&[kind::DISCONNECT << 4, 0]),
        };
        self.start(std::future::ready(Outcome::Farewell(farewell)));
        self.disconnected = true;
        self.end.get_or_insert(End::ClientDisconnected);
    }
}
