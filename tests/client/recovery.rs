//! What goes wrong on real networks and devices: the broker killed, the network dropped, an
//! answer or an acknowledgement lost, a reconnect that skips messages, a long absence.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mqtt_im_client::{ConversationId, Event, MemoryStore, SqliteStore};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};

use crate::common::*;
use crate::sdk::*;

#[tokio::test]
async fn a_send_through_a_broker_sigkill_and_an_app_restart_is_delivered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, addr) = spawn_with(dir.path(), &[]);
    let proxy = Proxy::start(addr).await;
    let local = tempfile::tempdir().unwrap();
    let path = local.path().join("alice.db");
    let mut alice = app_on(
        proxy.addr,
        "alice",
        "alice-phone",
        Arc::new(SqliteStore::open(&path).unwrap()),
    )
    .await;
    alice.wait_online().await;

    let first = alice
        .client
        .send_text(&with("bob"), "before the kill")
        .await
        .unwrap();
    node.kill().unwrap();
    node.wait().unwrap();
    alice.wait_offline().await;
    let second = alice
        .client
        .send_text(&with("bob"), "while it is down")
        .await
        .unwrap();
    // The app's process ends too; it starts again on the same local database.
    alice.client.close().await.unwrap();
    drop(alice);

    let (_node, addr) = spawn_with(dir.path(), &[]);
    proxy.retarget(addr);
    let alice = app_on(
        proxy.addr,
        "alice",
        "alice-phone",
        Arc::new(SqliteStore::open(&path).unwrap()),
    )
    .await;
    alice.wait_all_sent(&[&first.msg_id, &second.msg_id]).await;
    let mine = alice.client.messages(&with("bob"), None, 10).await.unwrap();
    let seqs: Vec<Option<u64>> = mine.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [Some(2), Some(1)], "sent in order, each once");

    let bob = online(addr, "bob", "bob-phone").await;
    bob.fetch_all(&with("alice")).await;
    assert_eq!(
        bob.texts(&with("alice")).await,
        ["before the kill", "while it is down"]
    );
}

#[tokio::test]
async fn a_lost_answer_and_a_dropped_network_still_deliver_each_message_once() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr).await;
    let mut alice = app_on(
        proxy.addr,
        "alice",
        "alice-phone",
        Arc::new(MemoryStore::default()),
    )
    .await;
    alice.wait_online().await;
    let mut bob = online(broker.addr, "bob", "bob-phone").await;

    // The message reaches the server; its PUBACK and SendResult never come back.
    proxy.mute();
    let answered_late = alice
        .client
        .send_text(&with("bob"), "answer lost")
        .await
        .unwrap();
    bob.wait_message("answer lost").await;
    proxy.down();
    alice.wait_offline().await;
    // Written while the network is gone.
    let offline = alice
        .client
        .send_text(&with("bob"), "network down")
        .await
        .unwrap();
    proxy.up();
    // The retransmit of the first is answered "duplicate": that is sent, with its first seq.
    alice
        .wait_all_sent(&[&answered_late.msg_id, &offline.msg_id])
        .await;
    let first = alice
        .client
        .messages(&with("bob"), Some(2), 1)
        .await
        .unwrap();
    assert_eq!(
        (first[0].msg_id.as_str(), first[0].seq),
        (answered_late.msg_id.as_str(), Some(1))
    );
    bob.wait_message("network down").await;
    assert_eq!(
        bob.texts(&with("alice")).await,
        ["answer lost", "network down"]
    );
}

#[tokio::test]
async fn a_live_message_whose_acknowledgement_was_lost_comes_back_in_the_pull_and_shows_once() {
    let broker = TestBroker::start_with(|config| {
        config.listeners.metrics = "127.0.0.1:0".parse().ok();
    })
    .await;
    let proxy = Proxy::start(broker.addr).await;
    let mut bob = app_on(
        proxy.addr,
        "bob",
        "bob-phone",
        Arc::new(MemoryStore::default()),
    )
    .await;
    bob.wait_online().await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;

    // Bob's uplink dies: the live message arrives and is stored, its PUBACK is lost.
    proxy.deafen();
    let sent = alice
        .publish_acked("im/u/bob", chat("m1", "bob", "ack lost", false))
        .await;
    assert_eq!(sent, 0);
    bob.wait_message("ack lost").await;
    proxy.down();
    bob.wait_offline().await;
    proxy.up();
    bob.wait_online().await;

    let fetched = bob.client.fetch_older(&with("alice"), 50).await.unwrap();
    assert_eq!(fetched.added, 0, "already held");
    assert!(
        metric(&broker, "mqtt_im_pull_page_messages_sum") >= 1.0,
        "the Pull did return it"
    );
    assert_eq!(bob.texts(&with("alice")).await, ["ack lost"]);
    while let Ok(event) = bob.events.try_recv() {
        assert!(
            !matches!(&event, Event::Message(m) if m.content.text() == Some("ack lost")),
            "shown twice: {event:?}"
        );
    }
}

#[tokio::test]
async fn a_hole_left_by_a_reconnect_is_filled_from_history_without_the_app_asking() {
    let broker = TestBroker::start_with(|config| config.im.digest_last_n = 1).await;
    let proxy = Proxy::start(broker.addr).await;
    let mut bob = app_on(
        proxy.addr,
        "bob",
        "bob-phone",
        Arc::new(MemoryStore::default()),
    )
    .await;
    bob.wait_online().await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    for n in 1..=3 {
        assert_eq!(alice.publish_acked("im/u/bob", numbered(n)).await, 0);
    }
    bob.wait_message("m3").await;
    proxy.down();
    bob.wait_offline().await;
    for n in 4..=10 {
        assert_eq!(alice.publish_acked("im/u/bob", numbered(n)).await, 0);
    }
    proxy.up();
    bob.wait_online().await;
    // The digest brought m10: m4..m9 are a hole between held messages, filled by History.
    let expected: Vec<String> = (1..=10).map(|n| format!("m{n}")).collect();
    eventually(|| async { bob.texts(&with("alice")).await == expected }).await;
    assert_eq!(alice.publish_acked("im/u/bob", numbered(11)).await, 0);
    bob.wait_message("m11").await;
    assert_eq!(bob.texts(&with("alice")).await.len(), 11);
}

/// Chat message `m{n}` to bob.
fn numbered(n: u32) -> Vec<u8> {
    chat(&format!("m{n}"), "bob", &format!("m{n}"), false)
}

/// `count` chat messages from `user` to bob, pipelined, each acknowledged.
async fn flood(addr: SocketAddr, user: String, count: usize) {
    let mut options = MqttOptions::new(format!("{user}-phone"), addr.ip().to_string(), addr.port());
    options.set_credentials(user.clone(), "pw");
    let (client, mut events) = AsyncClient::new(options, count + 10);
    for n in 0..count {
        let payload = chat(&format!("{user}-{n}"), "bob", "backlog", false);
        client
            .publish("im/u/bob", QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < count {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            other => panic!("{user}: {other:?} after {acked} acknowledgements"),
        }
    }
}

#[tokio::test]
async fn a_device_away_for_10000_messages_in_100_conversations_catches_up_to_exact_badges() {
    const PEERS: usize = 100;
    const EACH: usize = 100;
    let broker = TestBroker::start_with(|config| {
        for n in 0..PEERS {
            config.auth.users.insert(format!("s{n}"), "pw".into());
        }
    })
    .await;
    let store = Arc::new(MemoryStore::default());
    let bob = app_on(broker.addr, "bob", "bob-phone", store.clone()).await;
    let mut bob = bob;
    bob.wait_online().await;
    bob.client.close().await.unwrap();

    let senders: Vec<_> = (0..PEERS)
        .map(|n| tokio::spawn(flood(broker.addr, format!("s{n}"), EACH)))
        .collect();
    for sender in senders {
        tokio::time::timeout(Duration::from_secs(120), sender)
            .await
            .unwrap()
            .unwrap();
    }

    let mut bob = app_on(broker.addr, "bob", "bob-phone", store).await;
    bob.wait_online().await;
    let unread = bob.client.unread().await.unwrap();
    assert_eq!(unread.total, (PEERS * EACH) as u64);
    assert_eq!(unread.conversations.len(), PEERS);
    assert!(unread.conversations.iter().all(|(_, n)| *n == EACH as u64));
    // Only the digest came: a few previews per conversation, not the backlog.
    let held = bob
        .client
        .messages(&ConversationId::direct("s0"), None, 1000)
        .await
        .unwrap();
    assert!(!held.is_empty() && held.len() < EACH, "{} held", held.len());
}
