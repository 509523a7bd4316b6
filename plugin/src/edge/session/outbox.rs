//! Everything written toward the client: control packets as they come, and publishes — the
//! hook layer's own (digests, replies), live chat and rumqttd's — under the client's Receive
//! Maximum and Maximum Packet Size, with packet ids that never collide.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{Packet, PubRecReason};

use super::fit;
use super::packet_ids::{Origin, PacketIds};
use crate::edge::codec::{self, kind, CodecError, Protocol, PublishView};
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

/// MQTT 5's Topic Alias property.
const TOPIC_ALIAS: u8 = 0x23;

/// What a client's CONNECT said it takes (MQTT 5).
#[derive(Debug, Clone, Copy)]
pub(in crate::edge) struct ClientLimits {
    pub(in crate::edge) receive_max: Option<u16>,
    pub(in crate::edge) max_packet: Option<usize>,
    pub(in crate::edge) topic_alias_max: Option<u16>,
    /// The Receive Maximum the CONNACK announced to the client.
    pub(in crate::edge) inbound_max: u16,
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
    /// A publish from rumqttd, as the client gets it (under rumqttd's packet id).
    Upstream(PublishView),
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
    /// Topic aliases the client takes (its Topic Alias Maximum), and those given so far.
    alias_max: u16,
    aliases: HashMap<Vec<u8>, u16>,
    /// The client's QoS 1 and 2 publishes not answered yet (PUBACK, PUBCOMP, or a PUBREC
    /// refusing it), under the Receive Maximum the CONNACK announced (MQTT 5).
    inbound: HashSet<u16>,
    inbound_max: usize,
}

impl Outbox {
    /// The outbox of a client speaking `version`, with the limits its CONNECT announced.
    pub(super) fn new(version: Protocol, limits: ClientLimits) -> Self {
        let ClientLimits {
            receive_max,
            max_packet,
            topic_alias_max,
            ..
        } = limits;
        Self {
            version,
            out: BytesMut::new(),
            ids: PacketIds::default(),
            held: VecDeque::new(),
            receive_max: receive_max.map_or(usize::MAX, |max| usize::from(max.max(1))),
            max_packet,
            alias_max: topic_alias_max.unwrap_or(0),
            aliases: HashMap::new(),
            inbound: HashSet::new(),
            inbound_max: usize::from(limits.inbound_max),
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
        match &packet {
            Packet::PubAck(ack, _) => self.answered(kind::PUBACK, ack.pkid, false),
            Packet::PubRec(rec, _) => {
                let refused = !matches!(rec.reason, PubRecReason::Success);
                self.answered(kind::PUBREC, rec.pkid, refused);
            }
            _ => {}
        }
        codec::write_packet(&mut self.out, self.version, packet)
    }

    /// A 4-byte publish ack (or PUBREL), valid in both versions.
    pub(super) fn ack(&mut self, kind: u8, pkid: u16) {
        self.answered(kind, pkid, false);
        codec::write_ack(&mut self.out, kind, pkid);
    }

    /// Bytes that are already a packet for the client (an ack rumqttd wrote, PINGRESP).
    pub(super) fn raw(&mut self, bytes: &[u8]) {
        if let (Some(first), Some(pkid)) = (bytes.first(), bytes.get(2..4)) {
            let refused = bytes.get(4).is_some_and(|code| *code >= 0x80);
            self.answered(first >> 4, u16::from_be_bytes([pkid[0], pkid[1]]), refused);
        }
        self.out.extend_from_slice(bytes);
    }

    /// A QoS 1 or 2 publish of the client came in as `pkid`: `false` when the client has
    /// more unanswered than the Receive Maximum the CONNACK announced (MQTT 5: the
    /// connection then ends with 0x93).
    pub(super) fn received(&mut self, pkid: u16) -> bool {
        if self.version == Protocol::V4 {
            return true;
        }
        self.inbound.insert(pkid);
        self.inbound.len() <= self.inbound_max
    }

    /// An answer to the client's publish `pkid` is written: PUBACK and PUBCOMP end it, as
    /// does a PUBREC that refuses it.
    fn answered(&mut self, ack_kind: u8, pkid: u16, refused: bool) {
        if ack_kind == kind::PUBACK
            || ack_kind == kind::PUBCOMP
            || ack_kind == kind::PUBREC && refused
        {
            self.inbound.remove(&pkid);
        }
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

    /// Whether `publish` fits the client's Maximum Packet Size as it would be written (a
    /// server must not send a larger one).
    pub(super) fn fits_publish(&self, publish: &PublishView) -> bool {
        // A topic alias may add its 3 bytes.
        let alias = if self.alias_max > 0 { 3 } else { 0 };
        self.max_packet
            .is_none_or(|max| publish.encoded_len(self.version) + alias <= max)
    }

    /// rumqttd's publish (under rumqttd's packet id) under a client-side packet id, now or
    /// once the client's Receive Maximum lets it go (a retransmission goes at once).
    pub(super) fn upstream_publish(&mut self, publish: PublishView) -> Result<(), EdgeError> {
        if publish.qos() == 0 {
            self.write_aliased(&publish, 0);
            return Ok(());
        }
        let pkid = match self.ids.mapped(publish.pkid) {
            Some(pkid) => pkid,
            None if self.must_hold() => {
                self.held.push_back(Held::Upstream(publish));
                return Ok(());
            }
            None => return self.write_upstream_now(&publish),
        };
        self.write_aliased(&publish, pkid);
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
        self.write_publish(qos << 1, topic.as_bytes(), pkid, properties, payload);
    }

    /// Writes rumqttd's publish to the client (see [`Outbox::write_publish`]).
    fn write_aliased(&mut self, publish: &PublishView, pkid: u16) {
        let PublishView {
            flags,
            topic,
            properties,
            payload,
            ..
        } = publish;
        self.write_publish(*flags, topic, pkid, properties, payload);
    }

    /// Writes a publish, under a topic alias when the client takes them: the first publish
    /// on a topic names the topic and its alias, later ones the alias alone (rumqttd's own
    /// aliases go by subscription filter, so the hook layer gives them).
    fn write_publish(
        &mut self,
        flags: u8,
        topic: &[u8],
        pkid: u16,
        properties: &[u8],
        payload: &[u8],
    ) {
        let mut aliased = Vec::new();
        let (topic, properties) = match self.alias_for(topic) {
            None => (topic, properties),
            Some((alias, known)) => {
                aliased.reserve(properties.len() + 3);
                aliased.extend_from_slice(properties);
                aliased.push(TOPIC_ALIAS);
                aliased.extend_from_slice(&alias.to_be_bytes());
                (if known { &[][..] } else { topic }, &aliased[..])
            }
        };
        let version = self.version;
        codec::write_publish(
            &mut self.out,
            version,
            flags,
            topic,
            pkid,
            properties,
            payload,
        );
    }

    /// The alias of `topic` for this client, and whether the client knows it already; none
    /// when the client takes no aliases or all are given.
    fn alias_for(&mut self, topic: &[u8]) -> Option<(u16, bool)> {
        if self.version == Protocol::V4 || self.alias_max == 0 {
            return None;
        }
        if let Some(alias) = self.aliases.get(topic) {
            return Some((*alias, true));
        }
        let next = u16::try_from(self.aliases.len() + 1).ok()?;
        (next <= self.alias_max).then(|| {
            self.aliases.insert(topic.to_vec(), next);
            (next, false)
        })
    }

    /// Writes rumqttd's publish to the client under a newly allocated client-side id.
    fn write_upstream_now(&mut self, publish: &PublishView) -> Result<(), EdgeError> {
        let pkid = self
            .ids
            .for_upstream(publish.pkid)
            .ok_or(EdgeError::Protocol("client packet ids exhausted"))?;
        self.write_aliased(publish, pkid);
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
                Held::Upstream(publish) => self.write_upstream_now(&publish)?,
            }
        }
        Ok(())
    }
}
