//! PostgreSQL unreachable, then back: nothing is acknowledged that was not stored, the
//! broker keeps running, and retransmits land once.

use std::time::Duration;

use crate::common::*;
use mqtt_im::wire::pb;

/// While PostgreSQL is cut off, chat publishes get MQTT 5 PUBACK 0x80 (3.1.1: no PUBACK, an
/// error frame and a closed connection); once it is back the pool recovers and the same
/// messages are stored once.
#[tokio::test]
async fn postgres_outage_refuses_then_recovers() {
    let Some((proxy, settings)) = postgres_behind_proxy().await else {
        return;
    };
    let broker = TestBroker::start_on(TestBackend::Postgres(settings)).await;
    let mut v5 = Client::v5(broker.addr, "alice-5", "alice").await;
    assert_eq!(
        v5.publish_acked("im/u/bob", chat("before", "bob", "1", false))
            .await,
        0
    );

    proxy.down();
    let (code, reason) = v5
        .publish_answered("im/u/bob", chat("during", "bob", "2", false))
        .await;
    assert_eq!(code, 0x80, "{reason:?}");
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    v4.subscribe("im/u/alice/resp", 1).await;
    v4.publish("im/u/bob", 1, chat("during-4", "bob", "3", false))
        .await;
    let error = v4.response("alice").await.error.unwrap();
    assert_eq!(error.code, pb::ErrorCode::Unavailable as i32);
    // No PUBACK for the 3.1.1 publish that was not stored; the connection closes instead,
    // so that the client reconnects and retransmits.
    v4.closed().await;

    proxy.up();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let code = v5
            .publish_acked("im/u/bob", chat("during", "bob", "2", false))
            .await;
        if code == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "store did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        v5.publish_acked("im/u/bob", chat("during-4", "bob", "3", false))
            .await,
        0
    );
    assert_eq!(
        v5.publish_acked("im/u/bob", chat("during", "bob", "2", false))
            .await,
        0
    );
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
    let ids: Vec<&str> = page.messages.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids, vec!["during-4", "during", "before"]);
    assert_eq!(seqs(&page), vec![3, 2, 1]);
}

/// A stock MQTT 3.1.1 client (rumqttc, which like paho retransmits unacknowledged publishes
/// only when it reconnects; rumqttc only into a resumed session, hence a persistent one) through
/// a PostgreSQL cut: each publish
/// that cannot be stored gets its error frame and the connection closes, the client
/// reconnects and retransmits, and once PostgreSQL is back every message is acknowledged and
/// stored exactly once.
#[tokio::test]
async fn v311_client_recovers_by_itself_after_an_outage() {
    let Some((proxy, settings)) = postgres_behind_proxy().await else {
        return;
    };
    let broker = TestBroker::start_on(TestBackend::Postgres(settings)).await;

    let mut options = rumqttc::MqttOptions::new("alice-stock", "127.0.0.1", broker.addr.port());
    options.set_credentials("alice", "pw");
    options.set_clean_session(false);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 100);
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    let _ = acks_tx.send(());
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = closed_tx.send(());
                    // As a client application does: poll on, which reconnects.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let send = |i: usize| {
        let client = client.clone();
        async move {
            let id = format!("m{i:02}");
            let body = chat(&id, "bob", &id, false);
            client
                .publish("im/u/bob", rumqttc::QoS::AtLeastOnce, false, body)
                .await
                .unwrap();
        }
    };

    send(0).await;
    tokio::time::timeout(WAIT, acks.recv()).await.unwrap();
    proxy.down();
    for i in 1..=20 {
        send(i).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::timeout(WAIT, closed.recv())
        .await
        .expect("the connection was not closed after an unstored publish");
    proxy.up();
    for i in 21..=30 {
        send(i).await;
    }
    for acked in 1..=30 {
        tokio::time::timeout(Duration::from_secs(20), acks.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of 30 acknowledged after the restore", acked - 1));
    }
    pump.abort();

    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 100, None)).await);
    let mut ids: Vec<&str> = page.messages.iter().map(|m| m.msg_id.as_str()).collect();
    ids.sort_unstable();
    let expected: Vec<String> = (0..=30).map(|i| format!("m{i:02}")).collect();
    assert_eq!(ids, expected);
}

/// A store that stops answering never holds a CONNECT: the device is recorded by its first
/// IM operation, after the CONNACK, so clients connect and use plain topics while every
/// store call waits out its (here long) deadline.
#[tokio::test]
async fn a_stalled_store_never_holds_connects_or_plain_topics() {
    let Some((proxy, mut settings)) = postgres_behind_proxy().await else {
        return;
    };
    settings.call_timeout = mqtt_im::config::Period::millis(60_000);
    settings.connect_timeout = mqtt_im::config::Period::millis(60_000);
    let broker = TestBroker::start_on(TestBackend::Postgres(settings)).await;
    proxy.stall();
    for (uid, v5) in [("alice", true), ("bob", false)] {
        let id = format!("{uid}-phone");
        let mut client = if v5 {
            Client::v5(broker.addr, &id, uid).await
        } else {
            Client::v4(broker.addr, &id, uid, 30).await
        };
        assert_eq!(client.subscribe("plain/status", 1).await, vec![1]);
        client.publish("plain/status", 1, b"up".to_vec()).await;
        assert_eq!(client.next_on("plain/status").await, b"up");
    }
}

/// A 3.1.1 sender whose chat meets a silent PostgreSQL (no error, just no answer) gets the
/// same as on a cut one once the store's deadline passes: its error frame on `resp`, no
/// PUBACK, and the connection closed so that it retransmits after reconnecting.
#[tokio::test]
async fn v311_sender_gets_its_error_frame_when_the_store_stalls() {
    let Some((proxy, mut settings)) = postgres_behind_proxy().await else {
        return;
    };
    // Answers stop on the open connections: the store's own deadline ends the call.
    settings.call_timeout = mqtt_im::config::Period::millis(1_000);
    settings.connect_timeout = mqtt_im::config::Period::millis(10_000);
    let broker = TestBroker::start_on(TestBackend::Postgres(settings)).await;
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    v4.subscribe("im/u/alice/resp", 1).await;
    assert_eq!(
        v4.publish_acked("im/u/bob", chat("before", "bob", "1", false))
            .await,
        0
    );
    proxy.stall();
    v4.publish("im/u/bob", 1, chat("stalled", "bob", "2", false))
        .await;
    let error = v4.response("alice").await.error.unwrap();
    assert_eq!(error.code, pb::ErrorCode::Unavailable as i32);
    v4.closed().await;
}
