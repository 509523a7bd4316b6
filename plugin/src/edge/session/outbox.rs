//! Everything written toward the client: control packets as they come, and publishes — the
//! hook layer's own (digests, replies), live chat and rumqttd's — under the client's Receive
//! Maximum and Maximum Packet Size, with packet ids that never collide.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::Packet;

use super::fit;
use super::packet_ids::{Origin, PacketIds};
use crate::edge::codec::{self, CodecError, Frame, Protocol, PublishView};
use crate::edge::EdgeError;
use crate::im::Conversation;

/// Unacknowledged publishes towards a client beyond which live chat deliveries wait in the
/// backlog (keeps packet-id allocation cheap and memory bounded).
const MAX_LIVE_IN_FLIGHT: usize = 1024;

/// Outgoing buffers larger than this are given back once taken (after a burst).
const WRITE_KEEP: usize = 4 << 10;

/// The bytes written to `buf` so far, leaving it empty; a buffer a burst made large is given
/// back.
pub(super) fn take_bytes(buf: &mut BytesMut) -> BytesMut {
    let taken = buf.split();
    if buf.capacity() > WRITE_KEEP {
        *buf = BytesMut::new();
    }
    taken
}

/// A QoS 1/2 publish for the client that waits for a free place under its Receive Maximum.
#[derive(Debug)]
enum Held {
    /// A digest, reply or shared subscription's publish of the hook layer's own.
    Own {
        topic: String,
        qos: u8,
        properties: Vec<u8>,
        payload: Vec<u8>,
    },
    /// A publish from rumqttd, as rumqttd sent it.
    Upstream(Frame),
}

/// The client's side of the connection, as the session writes to it.
#[derive(Debug)]
pub(super) struct Outbox {
    version: Protocol,
    /// Bytes for the client, taken by the connection.
    out: BytesMut,
    ids: PacketIds,
    /// Publishes waiting for the client's Receive Maximum, in order.
    held: VecDeque<Held>,
    /// Publishes in flight towards the client at most (its Receive Maximum).
    receive_max: usize,
    /// The client's Maximum Packet Size (MQTT 5).
    max_packet: Option<usize>,
}

impl Outbox {
    /// The outbox of a client speaking `version`, with the limits its CONNECT announced.
    pub(super) fn new(
        version: Protocol,
        receive_max: Option<u16>,
        max_packet: Option<usize>,
    ) -> Self {
        Self {
            version,
            out: BytesMut::new(),
            ids: PacketIds::default(),
            held: VecDeque::new(),
            receive_max: receive_max.map_or(usize::MAX, |max| usize::from(max.max(1))),
            max_packet,
        }
    }

    /// The bytes written so far, for the connection to send.
    pub(super) fn take(&mut self) -> BytesMut {
        take_bytes(&mut self.out)
    }

    /// Publishes waiting for the client's Receive Maximum.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// A control packet (SUBACK, DISCONNECT, an ack with properties) in the client's version.
    pub(super) fn write_packet(&mut self, packet: Packet) -> Result<(), CodecError> {
        codec::write_packet(&mut self.out, self.version, packet)
    }

    /// A 4-byte publish ack (or PUBREL), valid in both versions.
    pub(super) fn ack(&mut self, kind: u8, pkid: u16) {
        codec::write_ack(&mut self.out, kind, pkid);
    }

    /// Bytes that are already a packet for the client (an ack rumqttd wrote, PINGRESP).
    pub(super) fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Payload bytes a publish on `topic` with `properties` bytes of properties may carry.
    pub(super) fn payload_budget(&self, topic: &str, properties: usize) -> usize {
        self.max_packet.map_or(usize::MAX, |max| {
            max.saturating_sub(fit::overhead(topic, properties))
        })
    }

    /// A hook-layer publish (digest, reply, a shared subscription's) now, or once the
    /// client's Receive Maximum lets it go; dropped if it cannot fit the client's Maximum
    /// Packet Size.
    pub(super) fn own_publish(&mut self, topic: &str, qos: u8, properties: &[u8], payload: &[u8]) {
        if !self.fits(topic, properties.len() + payload.len()) {
            return;
        }
        if qos > 0 && self.must_hold() {
            self.held.push_back(Held::Own {
                topic: topic.to_owned(),
                qos,
                properties: properties.to_vec(),
                payload: payload.to_vec(),
            });
            return;
        }
        self.write_publish_now(topic, qos, Origin::Own, properties, payload);
    }

    /// A live chat message, if it can go now: one that would have to wait (the client is
    /// slow to acknowledge) or cannot fit stays in the backlog, which the digest and pulls
    /// serve.
    pub(super) fn live_chat(
        &mut self,
        topic: &str,
        qos: u8,
        conversation: Conversation,
        seq: u64,
        payload: &Bytes,
    ) {
        if qos > 0 && (self.must_hold() || self.ids.in_flight() >= MAX_LIVE_IN_FLIGHT) {
            tracing::debug!(
                seq,
                "too many unacknowledged deliveries; left in the backlog"
            );
            return;
        }
        if self.fits(topic, payload.len()) {
            let origin = Origin::Chat { conversation, seq };
            self.write_publish_now(topic, qos, origin, &[], payload);
        }
    }

    /// rumqttd's publish under a client-side packet id, now or once the client's Receive
    /// Maximum lets it go (a retransmission goes at once).
    pub(super) fn upstream_publish(&mut self, frame: Frame) -> Result<(), EdgeError> {
        let publish = PublishView::parse(&frame, Protocol::V5)?;
        if publish.qos() == 0 {
            publish.write(self.version, 0, &mut self.out);
            return Ok(());
        }
        let pkid = match self.ids.mapped(publish.pkid) {
            Some(pkid) => pkid,
            None if self.must_hold() => {
                self.held.push_back(Held::Upstream(frame));
                return Ok(());
            }
            None => return self.write_upstream_now(&publish),
        };
        publish.write(self.version, pkid, &mut self.out);
        Ok(())
    }

    /// The client acknowledged `pkid` (PUBACK, PUBCOMP): it comes free, publishes that
    /// waited for it go, and its owner is returned.
    pub(super) fn release(&mut self, pkid: u16) -> Result<Option<Origin>, EdgeError> {
        let origin = self.ids.release(pkid);
        self.release_held()?;
        Ok(origin)
    }

    /// Who owns client-side `pkid`, keeping it in flight (PUBREC).
    pub(super) fn owner(&self, pkid: u16) -> Option<&Origin> {
        self.ids.owner(pkid)
    }

    /// The client-side id of rumqttd's `upstream` id, if it is in flight (PUBREL).
    pub(super) fn mapped(&self, upstream: u16) -> Option<u16> {
        self.ids.mapped(upstream)
    }

    /// Whether a QoS 1/2 publish towards the client must wait now: the client's Receive
    /// Maximum is reached, or others wait before it.
    fn must_hold(&self) -> bool {
        !self.held.is_empty() || self.ids.in_flight() >= self.receive_max
    }

    /// Whether a publish on `topic` with `rest` bytes of properties and payload fits the
    /// client's Maximum Packet Size (MQTT 5 forbids sending it otherwise).
    fn fits(&self, topic: &str, rest: usize) -> bool {
        let fits = rest <= self.payload_budget(topic, 0);
        if !fits {
            tracing::debug!(
                topic,
                rest,
                "publish exceeds the client's maximum packet size"
            );
        }
        fits
    }

    fn write_publish_now(
        &mut self,
        topic: &str,
        qos: u8,
        origin: Origin,
        properties: &[u8],
        payload: &[u8],
    ) {
        let pkid = if qos > 0 {
            match self.ids.allocate(origin) {
                Some(pkid) => pkid,
                None => {
                    tracing::warn!(topic, "no free packet id; publish dropped");
                    return;
                }
            }
        } else {
            0
        };
        codec::write_publish(
            &mut self.out,
            self.version,
            qos << 1,
            topic.as_bytes(),
            pkid,
            properties,
            payload,
        );
    }

    /// Writes rumqttd's publish to the client under a newly allocated client-side id.
    fn write_upstream_now(&mut self, publish: &PublishView) -> Result<(), EdgeError> {
        let pkid = self
            .ids
            .for_upstream(publish.pkid)
            .ok_or(EdgeError::Protocol("client packet ids exhausted"))?;
        publish.write(self.version, pkid, &mut self.out);
        Ok(())
    }

    /// A packet id came free: publishes that waited for it go, in order.
    fn release_held(&mut self) -> Result<(), EdgeError> {
        while self.ids.in_flight() < self.receive_max {
            let Some(held) = self.held.pop_front() else {
                break;
            };
            match held {
                Held::Own {
                    topic,
                    qos,
                    properties,
                    payload,
                } => self.write_publish_now(&topic, qos, Origin::Own, &properties, &payload),
                Held::Upstream(frame) => {
                    self.write_upstream_now(&PublishView::parse(&frame, Protocol::V5)?)?;
                }
            }
        }
        Ok(())
    }
}
