//! Offline delivery: stored before PUBACK, counted not pushed, pulled with the right sender.

use std::time::Duration;

use crate::common::*;
use mqtt_im::wire::pb;
use prost::Message;

backend_tests! {
/// A message to an offline user is PUBACKed, then shows up in its digest and pull — and the
/// spoofed `from` is replaced by the sender's identity.
async fn offline_message_is_counted_not_pushed(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("m1", "bob", "hi bob", false))
            .await,
        0
    );
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("m2", "", "again", false))
            .await,
        0
    );

    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    assert_eq!(bob.subscribe("im/u/bob/#", 1).await, vec![1]);
    let digest = bob.digest("bob").await;
    let session = &digest.sessions["u/alice"];
    assert_eq!((session.count, session.unacked, session.max_seq), (2, 2, 2));
    assert_eq!(text_of(&session.last_msgs[0]), "again");
    // Only the digest: no backlog is pushed.
    assert!(bob.quiet_for(Duration::from_millis(300)).await.is_none());

    let page = page(&bob.ask("bob", pull("p1", "u/alice", 10, None)).await);
    assert_eq!(seqs(&page), vec![2, 1]);
    assert!(page.messages.iter().all(|m| m.from == "alice"));
    assert!(page.end);
}
}

backend_tests! {
/// A retransmit with the same msg_id is stored once and gets the same seq back.
async fn duplicate_msg_id_is_absorbed(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    alice.subscribe("im/u/alice/#", 1).await;
    let _ = alice.digest("alice").await;
    let mut results = Vec::new();
    for _ in 0..2 {
        alice
            .publish("im/u/bob", 1, chat("same", "bob", "once", true))
            .await;
        let response = alice.response("alice").await;
        match response.result {
            Some(pb::response::Result::SendResult(result)) => results.push(result),
            other => panic!("expected a send result, got {other:?}"),
        }
    }
    assert_eq!(results[0].seq, results[1].seq);
    assert_eq!(results[0].status, pb::SendStatus::Stored as i32);
    assert_eq!(results[1].status, pb::SendStatus::Duplicate as i32);
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    assert_eq!(bob.digest("bob").await.sessions["u/alice"].max_seq, 1);
}
}

backend_tests! {
/// An online receiver gets the message live, with its seq and the real sender.
async fn online_receiver_gets_it_live(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    let _ = bob.digest("bob").await;
    assert_eq!(
        broker.im.online_devices("bob"),
        vec!["bob-phone".to_string()]
    );
    let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("live", "bob", "now", false))
            .await,
        0
    );
    let envelope = pb::Envelope::decode(bob.next_on("im/u/bob").await.as_slice()).unwrap();
    let Some(pb::envelope::Body::Chat(message)) = envelope.body else {
        panic!("no chat body");
    };
    assert_eq!((message.seq, message.from.as_str()), (1, "alice"));
    // Once acknowledged live (rumqttc writes the PUBACK before the Pull), it is not pulled
    // again by that device.
    let page = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
    assert!(page.messages.is_empty() && page.end);
    bob.disconnect().await;
    assert!(broker.im.online_devices("bob").is_empty());
}
}

backend_tests! {
/// A QoS 2 chat publish completes its PUBREC/PUBREL/PUBCOMP exchange with the hook layer
/// and is stored exactly once.
async fn qos2_chat_is_stored_once(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    alice
        .publish("im/u/bob", 2, chat("q2", "bob", "exactly once", false))
        .await;
    loop {
        if let Seen::PubComp { .. } = alice.next().await {
            break;
        }
    }
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
    assert_eq!(seqs(&page), vec![1]);
}
}

/// A device that stops acknowledging live messages is not flooded: after 1,024 unacknowledged
/// deliveries the rest wait in its backlog, where a pull finds every message.
#[tokio::test]
async fn unacknowledged_live_deliveries_are_bounded() {
    let broker = TestBroker::start().await;
    let mut options = rumqttc::MqttOptions::new("bob-stuck", "127.0.0.1", broker.addr.port());
    options.set_credentials("bob", "pw");
    options.set_manual_acks(true);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (stuck, mut events) = rumqttc::AsyncClient::new(options, 10);
    stuck
        .subscribe("im/u/bob", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    for i in 0..1100 {
        alice
            .publish("im/u/bob", 1, chat(&format!("s{i}"), "bob", "x", false))
            .await;
    }
    let mut acked = 0;
    while acked < 1100 {
        if let Seen::PubAck { .. } = alice.next().await {
            acked += 1;
        }
    }
    let mut delivered = 0;
    let quiet = tokio::time::sleep(std::time::Duration::from_millis(500));
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            event = events.poll() => match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => delivered += 1,
                Ok(_) => {}
                // Silence on a dead connection would prove nothing.
                Err(e) => panic!("the stuck client's connection ended: {e}"),
            },
            () = &mut quiet => break,
        }
    }
    assert_eq!(delivered, 1024);
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 200, None)).await);
    assert_eq!(page.messages.len(), 200);
    assert!(!page.end);
}
