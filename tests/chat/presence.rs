//! Presence per device: online while a connection holds an inbox subscription, ended
//! promptly by disconnect, socket loss, keep-alive expiry and session take-over.

use std::time::Duration;

use crate::common::*;
use mqtt_im::wire::pb;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A raw 3.1.1 CONNECT (clean session, username + password) followed by a SUBSCRIBE.
fn connect_and_subscribe(client_id: &str, user: &str, keep_alive: u16, filter: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0xC2]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    string(&mut body, client_id);
    string(&mut body, user);
    string(&mut body, "pw");
    let mut packets = vec![0x10, body.len() as u8];
    packets.extend_from_slice(&body);
    let mut sub = vec![0, 1];
    string(&mut sub, filter);
    sub.push(1);
    packets.extend_from_slice(&[0x82, sub.len() as u8]);
    packets.extend_from_slice(&sub);
    packets
}

backend_tests! {
/// Several devices of one user each come and go on their own.
async fn devices_are_online_independently(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut phone = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    phone.subscribe("im/u/bob/#", 1).await;
    let mut laptop = Client::v5(broker.addr, "bob-laptop", "bob").await;
    laptop.subscribe("im/u/bob", 1).await;
    wait_presence(&broker, "bob", &["bob-laptop", "bob-phone"]).await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("m", "bob", "both", false))
            .await,
        0
    );
    assert!(!phone.next_on("im/u/bob").await.is_empty());
    assert!(!laptop.next_on("im/u/bob").await.is_empty());
    phone.disconnect().await;
    wait_presence(&broker, "bob", &["bob-laptop"]).await;
    // Socket loss: the client task dies without DISCONNECT.
    drop(laptop);
    wait_presence(&broker, "bob", &[]).await;
}
}

backend_tests! {
/// A device that goes silent past 1.5 × its keep-alive is dropped and counts as offline.
async fn keep_alive_expiry_ends_presence(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut socket = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let packets = connect_and_subscribe("bob-silent", "bob", 1, "im/u/bob/#");
    socket.write_all(&packets).await.unwrap();
    wait_presence(&broker, "bob", &["bob-silent"]).await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the silent connection was not closed");
    wait_presence(&broker, "bob", &[]).await;
}
}

backend_tests! {
/// A second connection with the same client id takes the session over; the device stays
/// online through the new connection and live messages go there.
async fn session_takeover_moves_the_device(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut old = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    old.subscribe("im/u/bob/#", 1).await;
    let mut new = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    new.subscribe("im/u/bob/#", 1).await;
    let _ = new.digest("bob").await;
    // The old connection is closed by the take-over.
    let closed = tokio::time::timeout(WAIT, async { while old.seen.recv().await.is_some() {} });
    assert!(closed.await.is_ok(), "old connection still open");
    wait_presence(&broker, "bob", &["bob-phone"]).await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("t", "bob", "moved", false))
            .await,
        0
    );
    let envelope = pb::Envelope::decode(new.next_on("im/u/bob").await.as_slice()).unwrap();
    assert!(envelope.body.is_some());
}
}

backend_tests! {
/// A persistent session keeps its IM subscriptions: on reconnect without subscribing, the
/// device is online again and gets its digest.
async fn persistent_session_resumes_im_subscriptions(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut tablet = Client::v4_session(broker.addr, "bob-tablet", "bob", 30, false).await;
    tablet.subscribe("im/u/bob/#", 1).await;
    let _ = tablet.digest("bob").await;
    tablet.disconnect().await;
    wait_presence(&broker, "bob", &[]).await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("p1", "bob", "while away", false))
            .await,
        0
    );
    let mut tablet = Client::v4_session(broker.addr, "bob-tablet", "bob", 30, false).await;
    assert_eq!(tablet.digest("bob").await.sessions["u/alice"].count, 1);
    wait_presence(&broker, "bob", &["bob-tablet"]).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("p2", "bob", "live", false))
            .await,
        0
    );
    assert!(!tablet.next_on("im/u/bob").await.is_empty());
    // Another user reusing the client id does not inherit bob's IM subscriptions.
    tablet.disconnect().await;
    wait_presence(&broker, "bob", &[]).await;
    let mut carol = Client::v4_session(broker.addr, "bob-tablet", "carol", 30, false).await;
    // Whatever the session resumed has taken effect once a later packet is answered.
    carol.round_trip().await;
    assert!(broker.im.online_devices("carol").is_empty());
    assert!(broker.im.online_devices("bob").is_empty());
}
}

/// An MQTT 5 client whose session another connection takes over is told why (0x8E).
#[tokio::test]
async fn taken_over_v5_client_gets_a_disconnect() {
    let broker = TestBroker::start().await;
    let mut old = Client::v5(broker.addr, "bob-phone", "bob").await;
    old.subscribe("im/u/bob/#", 1).await;
    let _new = Client::v5(broker.addr, "bob-phone", "bob").await;
    assert_eq!(old.disconnect_reason().await, 0x8E, "Session taken over");
}
