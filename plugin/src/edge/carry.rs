//! What a publish carries across rumqttd for the hook layer. rumqttd 0.20 delivers at the
//! subscription's QoS whatever the publisher sent, clears retain on live messages, and knows
//! nothing of who published; MQTT says otherwise (QoS = min(publish, subscription),
//! retain-as-published, no-local). So a publish entering rumqttd gets one user property of
//! the hook layer's own — the publisher's QoS and retain flag, a hash of its client id, an id
//! of the message — which the hook layer reads and removes before a client sees it. A
//! client's own property of that name is dropped on the way in: nobody can forge it.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, BytesMut};

use super::codec::{read_varint, write_varint};

/// The user property's name.
const KEY: &[u8] = b"mqtt-im:carried";

/// Property ids of MQTT 5 (section 2.2.2.2).
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

    fn value(&self) -> String {
        format!(
            "{}{}{:016x}{:016x}",
            self.qos,
            u8::from(self.retain),
            self.publisher,
            self.message
        )
    }

    fn parse(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        if text.len() != 34 || !text.is_ascii() {
            return None;
        }
        let qos = text[0..1].parse::<u8>().ok().filter(|qos| *qos <= 2)?;
        let retain = match &text[1..2] {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        Some(Self {
            qos,
            retain,
            publisher: u64::from_str_radix(&text[2..18], 16).ok()?,
            message: u64::from_str_radix(&text[18..34], 16).ok()?,
        })
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

/// Walks a raw property list; `None` for a malformed or unknown property (the rest is then
/// left alone by the callers: rumqttd and clients decode properties themselves).
fn properties(raw: &[u8]) -> Option<Vec<Property<'_>>> {
    let mut at = 0;
    let mut found = Vec::new();
    while at < raw.len() {
        let id = raw[at];
        let value = at + 1;
        let len = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            SUBSCRIPTION_IDENTIFIER => read_varint(raw, value)?.1,
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => {
                2 + usize::from(read_u16(raw, value)?)
            }
            USER_PROPERTY => {
                let key = 2 + usize::from(read_u16(raw, value)?);
                key + 2 + usize::from(read_u16(raw, value + key)?)
            }
            _ => return None,
        };
        let end = value + len;
        found.push(Property {
            id,
            bytes: raw.get(at..end)?,
        });
        at = end;
    }
    Some(found)
}

fn read_u16(raw: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*raw.get(at)?, *raw.get(at + 1)?]))
}

/// The key and value of a user property's bytes.
fn user_property(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let key_len = usize::from(read_u16(bytes, 1)?);
    let key = bytes.get(3..3 + key_len)?;
    let value_at = 3 + key_len;
    let value_len = usize::from(read_u16(bytes, value_at)?);
    Some((key, bytes.get(value_at + 2..value_at + 2 + value_len)?))
}

fn is_carried(property: &Property<'_>) -> bool {
    property.id == USER_PROPERTY && user_property(property.bytes).is_some_and(|(k, _)| k == KEY)
}

/// `raw` properties of a publish entering rumqttd, with `carried` attached (and any property
/// of that name the client sent dropped).
pub(crate) fn attach(raw: &[u8], carried: &Carried) -> Vec<u8> {
    let value = carried.value();
    let mut out = Vec::with_capacity(raw.len() + KEY.len() + value.len() + 5);
    match properties(raw) {
        Some(list) => list
            .iter()
            .filter(|p| !is_carried(p))
            .for_each(|p| out.extend_from_slice(p.bytes)),
        None => out.extend_from_slice(raw),
    }
    out.push(USER_PROPERTY);
    out.extend_from_slice(&(KEY.len() as u16).to_be_bytes());
    out.extend_from_slice(KEY);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value.as_bytes());
    out
}

/// A publish's properties as rumqttd sent them, split into what the hook layer carried (if
/// anything) and the rest, without the carried property and without rumqttd's subscription
/// identifiers (the hook layer names the subscriptions itself: [`push_subscription_ids`]).
pub(crate) fn take(raw: &[u8]) -> (Option<Carried>, Vec<u8>) {
    let Some(list) = properties(raw) else {
        return (None, raw.to_vec());
    };
    let mut carried = None;
    let mut rest = Vec::with_capacity(raw.len());
    for property in &list {
        if is_carried(property) {
            carried = user_property(property.bytes).and_then(|(_, v)| Carried::parse(v));
        } else if property.id != SUBSCRIPTION_IDENTIFIER {
            rest.extend_from_slice(property.bytes);
        }
    }
    (carried, rest)
}

/// Appends Subscription Identifier properties for `ids` to raw publish properties.
pub(crate) fn push_subscription_ids(properties: &mut Vec<u8>, ids: &[usize]) {
    let mut id_bytes = BytesMut::new();
    for id in ids {
        id_bytes.put_u8(SUBSCRIPTION_IDENTIFIER);
        write_varint(&mut id_bytes, *id);
    }
    properties.extend_from_slice(&id_bytes);
}

/// A will's user properties with `carried` attached (rumqttd publishes the will with them),
/// any of that name the client sent dropped.
pub(crate) fn attach_to_will(user_properties: &mut Vec<(String, String)>, carried: &Carried) {
    user_properties.retain(|(key, _)| key.as_bytes() != KEY);
    let key = String::from_utf8_lossy(KEY).into_owned();
    user_properties.push((key, carried.value()));
}

/// `raw` without the carried property, for a client (a publish that reached this node
/// through the cluster).
pub(crate) fn strip(raw: &[u8]) -> Vec<u8> {
    match properties(raw) {
        Some(list) => list
            .iter()
            .filter(|p| !is_carried(p))
            .flat_map(|p| p.bytes.iter().copied())
            .collect(),
        None => raw.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carried_round_trips_and_forgeries_are_dropped() {
        let carried = Carried::new(1, true, publisher("client-a"));
        // A client's forged property, a content type, then ours.
        let forged = attach(&[0x03, 0, 1, b't'], &Carried::new(2, false, 7));
        let raw = attach(&forged, &carried);
        let (found, mut rest) = take(&raw);
        push_subscription_ids(&mut rest, &[5, 300]);
        assert_eq!(found, Some(carried));
        assert_eq!(rest, vec![0x03, 0, 1, b't', 0x0b, 5, 0x0b, 0xac, 0x02]);
        assert_eq!(strip(&raw), vec![0x03, 0, 1, b't']);
    }

    #[test]
    fn rumqttd_subscription_ids_are_replaced_and_malformed_lists_pass() {
        let (found, rest) = take(&[0x0b, 9, 0x01, 1]);
        assert_eq!((found, rest), (None, vec![0x01, 1]));
        let (found, rest) = take(&[0xff, 1]);
        assert_eq!((found, rest), (None, vec![0xff, 1]));
        assert_eq!(publisher("a"), publisher("a"));
        assert_ne!(publisher("a"), publisher("b"));
    }
}
