//! A bare MQTT connection for what client libraries will not send (an empty client id with a
//! persistent session, a 64 KiB client id): one CONNECT written with rumqttd's codec, the
//! CONNACK read by hand.

use std::net::SocketAddr;

use bytes::BytesMut;
use rumqttd::protocol::{v4::V4, v5::V5, Connect, Login, Packet, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// What the server answered a CONNECT with.
#[derive(Debug)]
pub struct RawConnAck {
    /// The return code (3.1.1) or reason code (MQTT 5): 0 accepted.
    pub code: u8,
    /// MQTT 5 Assigned Client Identifier.
    pub assigned: Option<String>,
    /// The connection, still open if the server accepted.
    pub stream: TcpStream,
}

/// Sends one CONNECT (`v5` or 3.1.1) and reads the CONNACK.
pub async fn raw_connect(
    addr: SocketAddr,
    v5: bool,
    client_id: &str,
    clean_session: bool,
    login: Option<(&str, &str)>,
) -> RawConnAck {
    try_connect(addr, v5, client_id, clean_session, login)
        .await
        .expect("no CONNACK")
}

/// Sends one CONNECT (`v5` or 3.1.1) and reads the CONNACK; `None` if the server closed the
/// connection (or stayed silent) instead of answering.
pub async fn try_connect(
    addr: SocketAddr,
    v5: bool,
    client_id: &str,
    clean_session: bool,
    login: Option<(&str, &str)>,
) -> Option<RawConnAck> {
    let connect = Connect {
        keep_alive: 30,
        client_id: client_id.into(),
        clean_session,
    };
    let login = login.map(|(username, password)| Login {
        username: username.into(),
        password: password.into(),
    });
    let packet = Packet::Connect(connect, None, None, None, login);
    let mut out = BytesMut::new();
    if v5 {
        V5.write(packet, &mut out)
    } else {
        V4.write(packet, &mut out)
    }
    .expect("CONNECT encodes");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&out).await.unwrap();
    let mut header = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut header))
        .await
        .ok()?
        .ok()?;
    assert_eq!(header[0], 0x20, "not a CONNACK");
    // CONNACKs here are short: one length byte.
    let mut body = vec![0u8; usize::from(header[1])];
    stream.read_exact(&mut body).await.ok()?;
    let assigned = if v5 { assigned_id(&body[2..]) } else { None };
    Some(RawConnAck {
        code: body[1],
        assigned,
        stream,
    })
}

/// Writes one QoS 1 3.1.1 PUBLISH of `size` bytes on an accepted connection; whether a
/// PUBACK came back (`false`: the server closed the connection instead).
pub async fn raw_publish_acked(stream: &mut TcpStream, topic: &str, size: usize) -> bool {
    // Fixed header (QoS 1), remaining length, topic, packet id 1, payload.
    let mut remaining = 2 + topic.len() + 2 + size;
    let mut out = vec![0x32];
    loop {
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        out.push(if remaining > 0 { byte | 0x80 } else { byte });
        if remaining == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.resize(out.len() + size, 7);
    if stream.write_all(&out).await.is_err() {
        return false;
    }
    let mut header = [0u8; 1];
    let read = tokio::time::timeout(WAIT, stream.read_exact(&mut header)).await;
    matches!(read, Ok(Ok(_))) && header[0] == 0x40
}

/// The Assigned Client Identifier (0x12) among CONNACK properties (length byte first).
fn assigned_id(properties: &[u8]) -> Option<String> {
    let mut at = 1;
    while at < properties.len() {
        let id = properties[at];
        let fixed = match id {
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => Some(1),
            0x13 | 0x21 | 0x22 => Some(2),
            0x11 | 0x27 => Some(4),
            0x12 | 0x1A | 0x1C | 0x1F => None,
            // Anything else ends the search.
            _ => return None,
        };
        if let Some(size) = fixed {
            at += 1 + size;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([properties[at + 1], properties[at + 2]]));
        let value = &properties[at + 3..at + 3 + len];
        if id == 0x12 {
            return Some(String::from_utf8(value.to_vec()).unwrap());
        }
        at += 3 + len;
    }
    None
}
