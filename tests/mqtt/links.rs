//! A client gets a link to the embedded rumqttd only when it needs one: IM-only clients
//! never have one; the first plain subscribe or publish opens it, with nothing lost.
#![allow(clippy::unwrap_used)]

use crate::common::*;

/// A broker with its metrics endpoint.
async fn start() -> TestBroker {
    TestBroker::start_with(|c| c.listeners.metrics = Some("127.0.0.1:0".parse().unwrap())).await
}

/// Links to rumqttd open now, per `mqtt_im_upstream_links`.
async fn links(broker: &TestBroker) -> f64 {
    let (_, text) = http_get(broker.metrics.unwrap(), "/metrics").await;
    sample(&samples(&text), "mqtt_im_upstream_links")
}

/// Waits until the endpoint's `mqtt_im_upstream_links` reads `expected` (a closing link goes
/// a little after its client).
async fn wait_links(broker: &TestBroker, expected: f64) {
    eventually(|| async { links(broker).await == expected }).await;
}

/// Phones that only chat (3.1.1 and 5, persistent sessions too) hold no rumqttd link
/// through subscribe, digest, live chat, pulls and reconnects.
#[tokio::test]
async fn im_only_clients_never_link_to_rumqttd() {
    let broker = start().await;
    let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    let mut bob = Client::v4_session(broker.addr, "bob-phone", "bob", 30, false).await;
    for (client, uid) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        assert_eq!(client.subscribe(&format!("im/u/{uid}/#"), 1).await, vec![1]);
        let _ = client.digest(uid).await;
    }
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("m1", "bob", "hi", false))
            .await,
        0
    );
    let live = bob.next_on("im/u/bob").await;
    assert_eq!(chat_seq(&live), 1);
    // Acknowledged live, so nothing is left to pull.
    let response = bob.ask("bob", pull("p", "u/alice", 10, None)).await;
    assert_eq!(seqs(&page(&response)), Vec::<u64>::new());
    bob.disconnect().await;
    let mut bob = Client::v4_session(broker.addr, "bob-phone", "bob", 30, false).await;
    // The persistent session kept its IM subscriptions: the digest comes unasked.
    let _ = bob.digest("bob").await;
    assert_eq!(links(&broker).await, 0.0);
}

/// A client that starts IM-only and later subscribes to a plain topic gets the link then,
/// with the topic's retained message, and its plain publishes reach others.
#[tokio::test]
async fn the_first_plain_subscribe_links_and_gets_retained_messages() {
    let broker = start().await;
    let publisher = Client::v5(broker.addr, "door-sensor", "carol").await;
    publisher
        .publish_retain("home/door", 1, true, b"open".to_vec())
        .await;
    wait_links(&broker, 1.0).await;
    for mut phone in [
        Client::v4(broker.addr, "phone-4", "alice", 30).await,
        Client::v5(broker.addr, "phone-5", "bob").await,
    ] {
        let uid = if phone.v4.is_some() { "alice" } else { "bob" };
        phone.subscribe(&format!("im/u/{uid}/#"), 1).await;
        let _ = phone.digest(uid).await;
        assert_eq!(links(&broker).await, 1.0, "IM-only so far");
        assert_eq!(phone.subscribe("home/#", 1).await, vec![1]);
        assert_eq!(phone.next_on("home/door").await, b"open".to_vec());
        assert_eq!(links(&broker).await, 2.0);
        let mut watcher = Client::v5(broker.addr, "watcher", "carol").await;
        watcher.subscribe("home/light", 1).await;
        phone.publish("home/light", 1, b"off".to_vec()).await;
        assert_eq!(watcher.next_on("home/light").await, b"off".to_vec());
        watcher.disconnect().await;
        phone.disconnect().await;
        wait_links(&broker, 1.0).await;
    }
}

/// Publishes pipelined right behind the publish that opens the link arrive, in order; and
/// an UNSUBSCRIBE from a client rumqttd never had is answered without linking.
#[tokio::test]
async fn pipelined_plain_publishes_wait_for_the_link_in_order() {
    let broker = start().await;
    let mut watcher = Client::v5(broker.addr, "watcher", "carol").await;
    watcher.subscribe("feed", 1).await;
    let mut phone = Client::v4(broker.addr, "phone", "alice", 30).await;
    phone.subscribe("im/u/alice/#", 1).await;
    let _ = phone.digest("alice").await;
    assert_eq!(links(&broker).await, 1.0);
    for i in 0..50u8 {
        phone.publish("feed", 1, vec![i]).await;
    }
    for i in 0..50u8 {
        assert_eq!(watcher.next_on("feed").await, vec![i]);
    }
    assert_eq!(links(&broker).await, 2.0);

    let mut other = Client::v5(broker.addr, "other", "bob").await;
    assert_eq!(other.unsubscribe("nothing/here").await, vec![0x11]);
    assert_eq!(links(&broker).await, 2.0);
}

/// A will needs rumqttd from the start; a persistent session rumqttd keeps is resumed by
/// linking at CONNECT, even if the client then only chats.
#[tokio::test]
async fn wills_and_kept_sessions_link_at_connect() {
    let broker = start().await;
    let options = options_with_will(broker.addr, "with-will", "bob", "status/bob");
    let with_will = Client::v4_with(options).await;
    assert_eq!(links(&broker).await, 1.0);
    with_will.disconnect().await;
    wait_links(&broker, 0.0).await;

    let mut hub = Client::v4_session(broker.addr, "hub", "alice", 30, false).await;
    assert_eq!(hub.subscribe("queue/#", 1).await, vec![1]);
    hub.disconnect().await;
    wait_links(&broker, 0.0).await;
    let mut publisher = Client::v4(broker.addr, "pub", "bob", 30).await;
    assert_eq!(
        publisher.publish_acked("queue/a", b"queued".to_vec()).await,
        0
    );
    publisher.disconnect().await;
    let mut hub = Client::v4_session(broker.addr, "hub", "alice", 30, false).await;
    assert_eq!(hub.next_on("queue/a").await, b"queued".to_vec());
    assert_eq!(links(&broker).await, 1.0);
}
