//! Found by fuzzing the packet path: a client that vanishes right after its CONNACK and comes
//! back at once with the same client id must get a CONNACK.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 30];
    for field in [client_id.as_bytes(), b"alice", b"pw"] {
        body.extend_from_slice(&u16::try_from(field.len()).unwrap().to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test]
async fn vanish_and_reconnect_at_once() {
    let broker = TestBroker::start().await;
    for round in 0..100 {
        let mut first = TcpStream::connect(broker.addr).await.unwrap();
        first.write_all(&connect_packet("same")).await.unwrap();
        let mut connack = [0u8; 4];
        first.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0]);
        drop(first);
        let mut second = TcpStream::connect(broker.addr).await.unwrap();
        second.write_all(&connect_packet("same")).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut connack))
            .await
            .unwrap();
        assert!(answer.is_ok(), "round {round}: closed without CONNACK");
        assert_eq!(connack, [0x20, 2, 0, 0], "round {round}");
    }
}
