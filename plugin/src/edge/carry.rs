//! What a publish carries across rumqttd for the hook layer. rumqttd 0.20 delivers at the
//! subscription's QoS whatever the publisher sent, clears retain on live messages, and knows
//! nothing of who published; MQTT says otherwise (QoS = min(publish, subscription),
//! retain-as-published, no-local). So a publish entering rumqttd carries a header of the
//! hook layer's own — the publisher's QoS and retain flag, a hash of its client id, an id of
//! the message — in front of its Correlation Data (rumqttd passes that property on as it
//! is, without decoding it into strings as it does user properties), and the hook layer
//! takes it off again before a client sees the publish. Every publish entering rumqttd
//! through the hook layer gets the header, so whatever a client itself puts in its
//! Correlation Data stays behind it: nobody can forge it.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::codec::{read_varint, write_varint};

/// Marks the header (the embedding application's own links to rumqttd send publishes
/// without one).
const MAGIC: [u8; 3] = [0xff, b'm', b'i'];
/// The header: magic, flags, publisher, message.
const HEADER: usize = MAGIC.len() + 1 + 8 + 8;
/// The most a publish grows by on its way into rumqttd: the header, a Correlation Data
/// property of its own, and longer length fields. rumqttd's links take this much more than
/// any client may send, so that a publish at a listener's limit still goes through.
pub(crate) const GROWTH: usize = HEADER + 3 + 4;
/// Flags: the publisher's retain flag, and whether it sent Correlation Data of its own.
const RETAIN: u8 = 0b100;
const HAD_CORRELATION: u8 = 0b1000;

/// Property ids of MQTT 5 (section 2.2.2.2).
const CORRELATION_DATA: u8 = 0x09;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0b;
const USER_PROPERTY: u8 = 0x26;

/// What the hook layer knows of a publish as it entered rumqttd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Carried {
    /// The QoS the publisher sent.
    pub(crate) qos: u8,
    /// The publisher's retain flag.
    pub(crate) retain: bool,
    /// [`publisher`] of the publisher's client id.
    pub(crate) publisher: u64,
    /// Unique per publish: the copies rumqttd sends for overlapping subscriptions share it.
    pub(crate) message: u64,
}

impl Carried {
    /// A new publish of client `publisher` (see [`publisher`]) at `qos`.
    pub(crate) fn new(qos: u8, retain: bool, publisher: u64) -> Self {
        Self {
            qos,
            retain,
            publisher,
            message: next_message_id(),
        }
    }

    /// The header in front of `correlation` (the publisher's own, if it sent any).
    fn header(&self, correlation: Option<&[u8]>) -> Vec<u8> {
        let mut data = Vec::new();
        self.write_header(&mut data, correlation);
        data
    }

    /// Writes the header and `correlation` after it to `out`.
    fn write_header(&self, out: &mut Vec<u8>, correlation: Option<&[u8]>) {
        let own = correlation.unwrap_or_default();
        let mut flags = self.qos & 0b11;
        if self.retain {
            flags |= RETAIN;
        }
        if correlation.is_some() {
            flags |= HAD_CORRELATION;
        }
        out.reserve(HEADER + own.len());
        out.extend_from_slice(&MAGIC);
        out.push(flags);
        out.extend_from_slice(&self.publisher.to_be_bytes());
        out.extend_from_slice(&self.message.to_be_bytes());
        out.extend_from_slice(own);
    }

    /// The carried facts in front of Correlation Data `data`, and the publisher's own
    /// Correlation Data after them (if it sent any).
    fn read(data: &[u8]) -> Option<(Self, Option<&[u8]>)> {
        if data.len() < HEADER || data[..MAGIC.len()] != MAGIC {
            return None;
        }
        let flags = data[MAGIC.len()];
        let number = |at: usize| {
            let bytes: [u8; 8] = data.get(at..at + 8)?.try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        };
        let carried = Self {
            qos: (flags & 0b11).min(2),
            retain: flags & RETAIN != 0,
            publisher: number(MAGIC.len() + 1)?,
            message: number(MAGIC.len() + 9)?,
        };
        let own = (flags & HAD_CORRELATION != 0).then(|| &data[HEADER..]);
        Some((carried, own))
    }
}

/// A stable 64-bit name of a client id (FNV-1a): the same on every node and every build, so
/// a publish forwarded through the cluster is still recognised as the client's own.
pub(crate) fn publisher(client_id: &str) -> u64 {
    client_id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Ids of messages: a random start per process, then counted up (unique across nodes in
/// practice: the copies compared are seconds apart, the space is 2^64).
fn next_message_id() -> u64 {
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    NEXT.get_or_init(|| AtomicU64::new(rand::random()))
        .fetch_add(1, Ordering::Relaxed)
}

/// One property of a raw MQTT 5 property list: its id and its bytes (id included).
struct Property<'a> {
    id: u8,
    bytes: &'a [u8],
}

impl<'a> Property<'a> {
    /// A binary or string value (after its 16-bit length).
    fn binary(&self) -> &'a [u8] {
        self.bytes.get(3..).unwrap_or_default()
    }
}

/// The properties of a raw list, in order; a malformed or unknown property ends the walk
/// (`complete` then says so: callers leave such a list alone, as rumqttd and clients
/// decode properties themselves).
struct Properties<'a> {
    raw: &'a [u8],
    at: usize,
    complete: bool,
}

fn properties(raw: &[u8]) -> Properties<'_> {
    Properties {
        raw,
        at: 0,
        complete: true,
    }
}

impl<'a> Iterator for Properties<'a> {
    type Item = Property<'a>;

    fn next(&mut self) -> Option<Property<'a>> {
        let (raw, at) = (self.raw, self.at);
        let id = *raw.get(at)?;
        let value = at + 1;
        let len = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => Some(1),
            0x13 | 0x21 | 0x22 | 0x23 => Some(2),
            0x02 | 0x11 | 0x18 | 0x27 => Some(4),
            SUBSCRIPTION_IDENTIFIER => read_varint(raw, value).map(|(_, used)| used),
            0x03 | 0x08 | CORRELATION_DATA | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => {
                read_u16(raw, value).map(|len| 2 + usize::from(len))
            }
            USER_PROPERTY => read_u16(raw, value).and_then(|key| {
                let key = 2 + usize::from(key);
                read_u16(raw, value + key).map(|v| key + 2 + usize::from(v))
            }),
            _ => None,
        };
        let bytes = len.and_then(|len| raw.get(at..value + len));
        let Some(bytes) = bytes else {
            self.complete = false;
            self.at = raw.len();
            return None;
        };
        self.at = value + len.unwrap_or_default();
        Some(Property { id, bytes })
    }
}

fn read_u16(raw: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*raw.get(at)?, *raw.get(at + 1)?]))
}

/// Writes a Correlation Data property of `data` (at most 65,535 bytes).
fn push_correlation(out: &mut Vec<u8>, data: &[u8]) {
    out.push(CORRELATION_DATA);
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// `raw` properties of a publish entering rumqttd, with `carried` in front of its
/// Correlation Data. A publisher's Correlation Data too long to take the header keeps its
/// publish as it is (it then reaches subscribers as rumqttd delivers it).
pub(crate) fn attach(raw: &[u8], carried: &Carried) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + HEADER + 3);
    let mut own = None;
    let mut list = properties(raw);
    for property in list.by_ref() {
        match property.id {
            CORRELATION_DATA => own = Some(property.binary()),
            _ => out.extend_from_slice(property.bytes),
        }
    }
    if !list.complete || own.is_some_and(|own| own.len() > usize::from(u16::MAX) - HEADER) {
        return raw.to_vec();
    }
    out.push(CORRELATION_DATA);
    let len = HEADER + own.map_or(0, <[u8]>::len);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    carried.write_header(&mut out, own);
    out
}

/// A publish's properties as rumqttd sent them, split into what the hook layer carried (if
/// anything) and the rest — the publisher's own Correlation Data included, rumqttd's
/// subscription identifiers not (the hook layer names the subscriptions itself:
/// [`push_subscription_ids`]).
pub(crate) fn take(raw: &[u8]) -> (Option<Carried>, Vec<u8>) {
    let mut carried = None;
    let mut rest = Vec::with_capacity(raw.len());
    let mut list = properties(raw);
    for property in list.by_ref() {
        match property.id {
            SUBSCRIPTION_IDENTIFIER => {}
            CORRELATION_DATA if carried.is_none() => match Carried::read(property.binary()) {
                Some((found, own)) => {
                    carried = Some(found);
                    if let Some(own) = own {
                        push_correlation(&mut rest, own);
                    }
                }
                None => rest.extend_from_slice(property.bytes),
            },
            _ => rest.extend_from_slice(property.bytes),
        }
    }
    if !list.complete {
        return (None, raw.to_vec());
    }
    (carried, rest)
}

/// Appends Subscription Identifier properties for `ids` to raw publish properties.
pub(crate) fn push_subscription_ids(properties: &mut Vec<u8>, ids: &[usize]) {
    for id in ids {
        properties.push(SUBSCRIPTION_IDENTIFIER);
        let mut varint = bytes::BytesMut::with_capacity(4);
        write_varint(&mut varint, *id);
        properties.extend_from_slice(&varint);
    }
}

/// A will's Correlation Data with `carried` in front (rumqttd publishes the will with it).
pub(crate) fn attach_to_will(correlation: &mut Option<Bytes>, carried: &Carried) {
    let own = correlation.as_deref();
    if own.is_none_or(|own| own.len() <= usize::from(u16::MAX) - HEADER) {
        *correlation = Some(Bytes::from(carried.header(own)));
    }
}

/// `raw` without what the hook layer carried, for a client (a publish that reached this
/// node through the cluster).
pub(crate) fn strip(raw: &[u8]) -> Vec<u8> {
    let (_, mut rest) = take(raw);
    // take drops subscription identifiers, which a forwarded publish never has.
    rest.shrink_to_fit();
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carried_round_trips_and_the_publisher_s_correlation_data_stays() {
        let carried = Carried::new(1, true, publisher("client-a"));
        // A content type and the client's own Correlation Data: a forged header.
        let forged = Carried::new(2, false, 7).header(None);
        let mut raw = vec![0x03, 0, 1, b't'];
        push_correlation(&mut raw, &forged);
        let entered = attach(&raw, &carried);
        let (found, mut rest) = take(&entered);
        assert_eq!(found, Some(carried));
        // The forged header is the client's own data: it comes back as it was sent.
        assert_eq!(rest, raw);
        push_subscription_ids(&mut rest, &[5, 300]);
        assert_eq!(&rest[raw.len()..], &[0x0b, 5, 0x0b, 0xac, 0x02]);
        assert_eq!(strip(&entered), raw);
    }

    #[test]
    fn without_correlation_data_none_comes_out_and_odd_lists_pass() {
        let carried = Carried::new(0, false, 1);
        let (found, rest) = take(&attach(&[], &carried));
        assert_eq!((found, rest), (Some(carried), Vec::new()));
        let (found, rest) = take(&[0x0b, 9, 0x01, 1]);
        assert_eq!((found, rest), (None, vec![0x01, 1]));
        let (found, rest) = take(&[0xff, 1]);
        assert_eq!((found, rest), (None, vec![0xff, 1]));
        assert_eq!(attach(&[0xff, 1], &carried), vec![0xff, 1]);
        assert_eq!(publisher("a"), publisher("a"));
        assert_ne!(publisher("a"), publisher("b"));
    }

    #[test]
    fn a_will_carries_it_too() {
        let carried = Carried::new(1, false, 3);
        let mut correlation = Some(Bytes::from_static(b"c"));
        attach_to_will(&mut correlation, &carried);
        let data = correlation.unwrap();
        let (found, own) = Carried::read(&data).unwrap();
        assert_eq!((found, own), (carried, Some(&b"c"[..])));
    }
}
