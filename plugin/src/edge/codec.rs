//! Framing and the packets the hook layer rewrites on the hot path.
//!
//! Control packets (CONNECT, SUBSCRIBE, acks with properties, ...) are decoded and encoded with
//! rumqttd's own codecs. PUBLISH and the four publish acks are handled here at the byte level:
//! rumqttd 0.20 keeps a publish's QoS and packet id crate-private, and relaying them as bytes
//! costs no more than a copy.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::{self, Packet, Protocol as _};

pub(crate) use crate::domain::Protocol;
use tokio::io::AsyncReadExt;

/// MQTT packet types the edge tells apart.
pub(crate) mod kind {
    pub(crate) const CONNECT: u8 = 1;
    pub(crate) const CONNACK: u8 = 2;
    pub(crate) const PUBLISH: u8 = 3;
    pub(crate) const PUBACK: u8 = 4;
    pub(crate) const PUBREC: u8 = 5;
    pub(crate) const PUBREL: u8 = 6;
    pub(crate) const PUBCOMP: u8 = 7;
    pub(crate) const SUBSCRIBE: u8 = 8;
    pub(crate) const SUBACK: u8 = 9;
    pub(crate) const UNSUBSCRIBE: u8 = 10;
    pub(crate) const UNSUBACK: u8 = 11;
    pub(crate) const PINGREQ: u8 = 12;
    pub(crate) const PINGRESP: u8 = 13;
    pub(crate) const DISCONNECT: u8 = 14;
}

/// Why bytes could not be turned into packets; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("unexpected packet type {0}")]
    UnexpectedType(u8),
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
    #[error("closed before a whole packet arrived")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// One complete packet.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    /// The whole packet, fixed header included.
    pub(crate) bytes: Bytes,
    /// Offset of the variable header.
    pub(crate) body: usize,
}

impl Frame {
    /// The packet type.
    pub(crate) fn kind(&self) -> u8 {
        self.bytes[0] >> 4
    }

    /// The packet id of a publish ack.
    pub(crate) fn ack_pkid(&self) -> Result<u16, CodecError> {
        read_u16(&self.bytes, self.body).ok_or(CodecError::Malformed("ack without packet id"))
    }

    /// Decodes with rumqttd's codec (control packets only).
    pub(crate) fn decode(&self, version: Protocol, max: usize) -> Result<Packet, CodecError> {
        // rumqttd's readers hit `unreachable!` on packet types a server never receives.
        if matches!(self.kind(), kind::CONNACK | kind::UNSUBACK) || self.kind() == 0 {
            return Err(CodecError::UnexpectedType(self.kind()));
        }
        let mut bytes = BytesMut::from(&self.bytes[..]);
        let packet = match version {
            Protocol::V4 => protocol::v4::V4.read_mut(&mut bytes, max)?,
            Protocol::V5 => protocol::v5::V5.read_mut(&mut bytes, max)?,
        };
        Ok(packet)
    }

    /// Decodes a packet rumqttd sent (always MQTT 5).
    pub(crate) fn decode_upstream(&self) -> Result<Packet, CodecError> {
        let mut bytes = BytesMut::from(&self.bytes[..]);
        upstream_read(&mut bytes)
    }
}

fn upstream_read(bytes: &mut BytesMut) -> Result<Packet, CodecError> {
    // The v5 reader has no arm for CONNACK/UNSUBACK bodies; parse those two by hand.
    let first = bytes.first().copied().unwrap_or(0) >> 4;
    let max = bytes.len();
    match first {
        kind::CONNACK => read_connack(bytes),
        kind::UNSUBACK => read_unsuback(bytes),
        _ => Ok(protocol::v5::V5.read_mut(bytes, max)?),
    }
}

fn read_connack(bytes: &BytesMut) -> Result<Packet, CodecError> {
    let (_, body) = fixed_header(bytes).ok_or(CodecError::Malformed("connack"))?;
    let flags = *bytes.get(body).ok_or(CodecError::Malformed("connack"))?;
    let code = *bytes
        .get(body + 1)
        .ok_or(CodecError::Malformed("connack"))?;
    let code = match code {
        0 => protocol::ConnectReturnCode::Success,
        0x86 => protocol::ConnectReturnCode::BadUserNamePassword,
        0x87 => protocol::ConnectReturnCode::NotAuthorized,
        0x85 => protocol::ConnectReturnCode::ClientIdentifierNotValid,
        0x88 | 0x89 => protocol::ConnectReturnCode::ServerUnavailable,
        _ => protocol::ConnectReturnCode::UnspecifiedError,
    };
    Ok(Packet::ConnAck(
        protocol::ConnAck {
            session_present: flags & 1 == 1,
            code,
        },
        None,
    ))
}

fn read_unsuback(bytes: &BytesMut) -> Result<Packet, CodecError> {
    let (_, body) = fixed_header(bytes).ok_or(CodecError::Malformed("unsuback"))?;
    let pkid = read_u16(bytes, body).ok_or(CodecError::Malformed("unsuback"))?;
    Ok(Packet::UnsubAck(
        protocol::UnsubAck {
            pkid,
            reasons: Vec::new(),
        },
        None,
    ))
}

/// Parses `(remaining length, offset of the variable header)`, if complete.
fn fixed_header(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for (i, byte) in bytes.iter().skip(1).take(4).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((len, i + 2));
        }
    }
    None
}

/// Spare read buffer of a quiet connection side, and of a busy one.
pub(crate) const READ_SMALL: usize = 512;
const READ_LARGE: usize = 64 << 10;
/// Makes room for the next read into `buf` and returns it, given what the last read got
/// (`read`) of the room it had (`room`): large after a read filled all the room (a burst gets
/// its bytes in few system calls), small again once a small read finds it drained (an idle
/// connection stays small), else as it is with at least a little room.
pub(crate) fn make_room(buf: &mut BytesMut, read: usize, room: usize) -> usize {
    if read > 0 && read >= room {
        buf.reserve(READ_LARGE);
    } else if read < READ_SMALL && buf.is_empty() && buf.capacity() > 2 * READ_SMALL {
        *buf = BytesMut::with_capacity(READ_SMALL);
    } else {
        buf.reserve(READ_SMALL);
    }
    buf.capacity() - buf.len()
}

/// Reads until one whole frame is in `buf`.
pub(crate) async fn read_frame(
    stream: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
    max: usize,
) -> Result<Frame, CodecError> {
    loop {
        if let Some(frame) = next_frame(buf, max)? {
            return Ok(frame);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(CodecError::Closed);
        }
    }
}

/// Takes the next complete packet off `buf`, or `None` if more bytes are needed.
pub(crate) fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, CodecError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let Some((remaining, body)) = fixed_header(buf) else {
        if buf.len() >= 5 {
            return Err(CodecError::Malformed(
                "remaining length longer than 4 bytes",
            ));
        }
        return Ok(None);
    };
    if remaining > max {
        return Err(CodecError::TooLarge(remaining));
    }
    if buf.len() < body + remaining {
        buf.reserve(body + remaining - buf.len());
        return Ok(None);
    }
    let bytes = buf.split_to(body + remaining).freeze();
    Ok(Some(Frame { bytes, body }))
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// Reads a variable byte integer at `at`: `(value, bytes used)`.
pub(crate) fn read_varint(bytes: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for i in 0..4 {
        let byte = *bytes.get(at + i)?;
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The bytes a variable byte integer of `value` takes.
fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn write_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// A PUBLISH, parsed just enough to route and relay it.
#[derive(Debug, Clone)]
pub(crate) struct PublishView {
    /// Fixed-header flags: dup, QoS, retain.
    pub(crate) flags: u8,
    pub(crate) topic: Bytes,
    /// 0 for QoS 0.
    pub(crate) pkid: u16,
    /// MQTT 5 properties, without their length prefix (empty for 3.1.1).
    pub(crate) properties: Bytes,
    pub(crate) payload: Bytes,
}

impl PublishView {
    /// Parses a PUBLISH frame of `version`.
    pub(crate) fn parse(frame: &Frame, version: Protocol) -> Result<Self, CodecError> {
        let bytes = &frame.bytes;
        let flags = bytes[0] & 0x0f;
        if (flags >> 1) & 0b11 == 3 {
            return Err(CodecError::Malformed("publish with QoS 3"));
        }
        let malformed = CodecError::Malformed("truncated publish");
        let topic_len = usize::from(read_u16(bytes, frame.body).ok_or(malformed)?);
        let mut at = frame.body + 2;
        let topic = bytes
            .get(at..at + topic_len)
            .map(|_| bytes.slice(at..at + topic_len))
            .ok_or(CodecError::Malformed("truncated topic"))?;
        at += topic_len;
        let mut pkid = 0;
        if (flags >> 1) & 0b11 > 0 {
            pkid = read_u16(bytes, at).ok_or(CodecError::Malformed("missing packet id"))?;
            if pkid == 0 {
                return Err(CodecError::Malformed("packet id 0"));
            }
            at += 2;
        }
        let mut properties = Bytes::new();
        if version == Protocol::V5 {
            let (len, used) =
                read_varint(bytes, at).ok_or(CodecError::Malformed("properties length"))?;
            at += used;
            if at + len > bytes.len() {
                return Err(CodecError::Malformed("truncated properties"));
            }
            properties = bytes.slice(at..at + len);
            at += len;
        }
        if std::str::from_utf8(&topic).is_err() {
            return Err(CodecError::Malformed("topic is not UTF-8"));
        }
        Ok(Self {
            flags,
            topic,
            pkid,
            properties,
            payload: bytes.slice(at..),
        })
    }

    /// QoS level 0, 1 or 2.
    pub(crate) fn qos(&self) -> u8 {
        (self.flags >> 1) & 0b11
    }

    /// The topic (checked UTF-8 at parse time).
    pub(crate) fn topic_str(&self) -> &str {
        std::str::from_utf8(&self.topic).unwrap_or_default()
    }

    /// The bytes this publish takes when written for `version`.
    pub(crate) fn encoded_len(&self, version: Protocol) -> usize {
        let pkid = if self.qos() > 0 { 2 } else { 0 };
        let mut remaining = 2 + self.topic.len() + pkid + self.payload.len();
        if version == Protocol::V5 {
            remaining += varint_len(self.properties.len()) + self.properties.len();
        }
        1 + varint_len(remaining) + remaining
    }

    /// Writes this publish for `version` with packet id `pkid` (ignored for QoS 0).
    pub(crate) fn write(&self, version: Protocol, pkid: u16, out: &mut BytesMut) {
        let properties: &[u8] = match version {
            Protocol::V4 => &[],
            Protocol::V5 => &self.properties,
        };
        write_publish(
            out,
            version,
            self.flags,
            &self.topic,
            pkid,
            properties,
            &self.payload,
        );
    }
}

/// Encodes a PUBLISH. `flags` holds dup/QoS/retain; `properties` are raw MQTT 5 properties.
pub(crate) fn write_publish(
    out: &mut BytesMut,
    version: Protocol,
    flags: u8,
    topic: &[u8],
    pkid: u16,
    properties: &[u8],
    payload: &[u8],
) {
    let has_pkid = (flags >> 1) & 0b11 > 0;
    let mut remaining = 2 + topic.len() + payload.len() + if has_pkid { 2 } else { 0 };
    let mut props_len_bytes = BytesMut::new();
    if version == Protocol::V5 {
        write_varint(&mut props_len_bytes, properties.len());
        remaining += props_len_bytes.len() + properties.len();
    }
    out.reserve(remaining + 5);
    out.put_u8((kind::PUBLISH << 4) | (flags & 0x0f));
    write_varint(out, remaining);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic);
    if has_pkid {
        out.put_u16(pkid);
    }
    if version == Protocol::V5 {
        out.put_slice(&props_len_bytes);
        out.put_slice(properties);
    }
    out.put_slice(payload);
}

/// MQTT 5 publish properties carrying Correlation Data (0x09).
pub(crate) fn correlation_property(data: &[u8]) -> Vec<u8> {
    let mut props = Vec::with_capacity(data.len() + 3);
    props.push(0x09);
    props.extend_from_slice(&(data.len().min(u16::MAX as usize) as u16).to_be_bytes());
    props.extend_from_slice(&data[..data.len().min(u16::MAX as usize)]);
    props
}

/// Writes a 4-byte publish ack (valid in 3.1.1 and 5: success, no properties).
pub(crate) fn write_ack(out: &mut BytesMut, ack_kind: u8, pkid: u16) {
    let flags = if ack_kind == kind::PUBREL { 0b0010 } else { 0 };
    out.put_u8((ack_kind << 4) | flags);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// Encodes a control packet for `version` with rumqttd's codec.
pub(crate) fn write_packet(
    out: &mut BytesMut,
    version: Protocol,
    packet: Packet,
) -> Result<(), CodecError> {
    match version {
        Protocol::V4 => protocol::v4::V4.write(packet, out)?,
        Protocol::V5 => protocol::v5::V5.write(packet, out)?,
    };
    Ok(())
}

/// The protocol level byte of a CONNECT frame.
pub(crate) fn connect_version(frame: &Frame) -> Result<Protocol, CodecError> {
    let name_len =
        usize::from(read_u16(&frame.bytes, frame.body).ok_or(CodecError::Malformed("connect"))?);
    match frame.bytes.get(frame.body + 2 + name_len) {
        Some(4) => Ok(Protocol::V4),
        Some(5) => Ok(Protocol::V5),
        _ => Err(CodecError::Malformed("unsupported protocol level")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_between_versions() {
        let mut out = BytesMut::new();
        write_publish(
            &mut out,
            Protocol::V5,
            0b0010,
            b"a/b",
            7,
            &[0x01, 0x01],
            b"hi",
        );
        let frame = next_frame(&mut out, 1024).unwrap().unwrap();
        assert_eq!(frame.kind(), kind::PUBLISH);
        let publish = PublishView::parse(&frame, Protocol::V5).unwrap();
        assert_eq!((publish.qos(), publish.pkid), (1, 7));
        assert_eq!(&publish.properties[..], &[0x01, 0x01]);
        let mut v4 = BytesMut::new();
        publish.write(Protocol::V4, 9, &mut v4);
        let frame = next_frame(&mut v4, 1024).unwrap().unwrap();
        let back = PublishView::parse(&frame, Protocol::V4).unwrap();
        assert_eq!(
            (back.topic_str(), back.pkid, &back.payload[..]),
            ("a/b", 9, &b"hi"[..])
        );
    }

    #[test]
    fn partial_and_oversized_frames() {
        let mut buf = BytesMut::from(&[0x30u8, 0x05, 0x00][..]);
        assert!(next_frame(&mut buf, 1024).unwrap().is_none());
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0x7f][..]);
        assert!(matches!(
            next_frame(&mut buf, 1024),
            Err(CodecError::TooLarge(_))
        ));
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(next_frame(&mut buf, 1024).is_err());
    }

    #[test]
    fn truncated_publish_is_an_error_not_a_panic() {
        let mut buf = BytesMut::from(&[0x32u8, 0x03, 0x00, 0x05, b'a'][..]);
        let frame = next_frame(&mut buf, 1024).unwrap().unwrap();
        assert!(PublishView::parse(&frame, Protocol::V4).is_err());
    }

    #[test]
    fn read_buffers_grow_for_bursts_and_shrink_back_when_quiet() {
        let mut buf = BytesMut::new();
        let room = make_room(&mut buf, 0, 0);
        assert!((READ_SMALL..2 * READ_SMALL).contains(&room), "{room}");
        // A read that filled the room: the next one gets a large buffer.
        let room = make_room(&mut buf, room, room);
        assert!(room >= READ_LARGE);
        // A busy stream (reads larger than small, not filling) keeps it.
        let kept = make_room(&mut buf, 4 * READ_SMALL, room);
        assert!(kept >= READ_LARGE);
        // A small read that leaves nothing pending: back to small.
        let room = make_room(&mut buf, 2, kept);
        assert!(buf.capacity() < 2 * READ_SMALL && room >= READ_SMALL);
        // Not while a partial frame waits in it.
        buf.extend_from_slice(&[0x30; 10]);
        let _ = make_room(&mut buf, room, room);
        let room = make_room(&mut buf, 2, READ_LARGE);
        assert!(room >= READ_LARGE - 10);
    }
}
