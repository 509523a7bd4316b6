//! A Mosquitto `acl_file` for non-IM topics, over real connections: publishes refused with
//! 0x87 (MQTT 5) or acknowledged and dropped (3.1.1), subscriptions outside the rules
//! granted and filtered message by message as Mosquitto does (or refused under
//! `auth.acl_subscribe = "refuse"`), `deny` holding inside a subscribed tree and for retained messages, `%c`/`%u`
//! patterns that hostile names cannot widen, wills checked at CONNECT, the file re-read on
//! change; IM topics keep their own ACL.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mqtt_im::config::AclSubscribe;

use crate::common::*;

const ACL: &str = "
# anonymous clients
topic read public/#

user alice
topic readwrite fleet/alice/#
topic write alerts/#

user bob
topic read fleet/#
topic deny fleet/alice/secret
topic read alerts/#

pattern readwrite devices/%c/#
";

const QUIET: Duration = Duration::from_millis(300);

/// The file under `auth.acl_subscribe = "refuse"` (the EMQX way).
async fn broker_with_acl(dir: &std::path::Path) -> TestBroker {
    broker_with_acl_as(dir, Some(AclSubscribe::Refuse)).await
}

async fn broker_with_acl_as(dir: &std::path::Path, mode: Option<AclSubscribe>) -> TestBroker {
    let path = dir.join("acl");
    std::fs::write(&path, ACL).unwrap();
    TestBroker::start_with(move |c| {
        c.auth.acl_file = Some(path);
        c.auth.acl_subscribe = mode;
        c.auth.reload_interval = mqtt_im::config::Period::millis(50);
        c.listeners.metrics = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
}

#[tokio::test]
async fn publishes_and_subscriptions_follow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_acl(dir.path()).await;
    let mut bob = Client::v5(broker.addr, "bob-1", "bob").await;
    assert_eq!(bob.subscribe("fleet/#", 1).await, vec![1]);
    assert_eq!(bob.subscribe("secrets/#", 1).await, vec![0x87]);
    assert_eq!(bob.subscribe("#", 1).await, vec![0x87]);
    assert_eq!(bob.subscribe("fleet/alice/secret", 1).await, vec![0x87]);

    let mut alice = Client::v5(broker.addr, "alice-1", "alice").await;
    assert_eq!(
        alice.publish_acked("fleet/alice/gps", b"1".to_vec()).await,
        0
    );
    assert_eq!(
        alice
            .publish_acked("fleet/alice/secret", b"s".to_vec())
            .await,
        0
    );
    let (code, reason) = alice.publish_answered("fleet/bob/gps", b"x".to_vec()).await;
    assert_eq!(code, 0x87);
    assert!(reason.unwrap().contains("ACL"));
    assert_eq!(alice.subscribe("fleet/#", 1).await, vec![0x87]);
    assert_eq!(alice.subscribe("fleet/alice/+", 1).await, vec![1]);

    // bob reads the fleet, but not alice's secret, though his subscription covers it.
    assert_eq!(bob.next_on("fleet/alice/gps").await, b"1".to_vec());
    assert!(
        bob.quiet_for(QUIET).await.is_none(),
        "the secret was delivered"
    );

    // 3.1.1: a refused publish is acknowledged and dropped.
    let mut alice4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    assert_eq!(
        alice4.publish_acked("fleet/bob/gps", b"x".to_vec()).await,
        0
    );
    assert_eq!(
        alice4
            .publish_acked("fleet/alice/speed", b"2".to_vec())
            .await,
        0
    );
    assert_eq!(bob.next_on("fleet/alice/speed").await, b"2".to_vec());
    assert_eq!(alice4.subscribe("public/#", 1).await, vec![0x80]);

    // IM keeps its own ACL: the file says nothing about im/ and chat still works.
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("m1", "bob", "hi", false))
            .await,
        0
    );

    let (_, metrics) = http_get(broker.metrics.unwrap(), "/metrics").await;
    for line in [
        "mqtt_im_acl_denied_total{action=\"publish\"} 2",
        "mqtt_im_acl_denied_total{action=\"subscribe\"} 5",
        "mqtt_im_acl_denied_total{action=\"deliver\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

/// By default an `acl_file` answers as Mosquitto does: a wide SUBSCRIBE is granted, and
/// only what the client may read arrives, live or retained.
#[tokio::test]
async fn by_default_a_wide_subscription_is_granted_and_filtered_as_mosquitto_does() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_acl_as(dir.path(), None).await;
    let mut alice = Client::v5(broker.addr, "alice-1", "alice").await;
    assert_eq!(
        alice
            .retain_acked("fleet/alice/status", b"up".to_vec())
            .await,
        0
    );
    let mut carol = Client::v5(broker.addr, "carol-1", "carol").await;
    // carol may read nothing of the fleet: granted all the same, and nothing arrives.
    assert_eq!(carol.subscribe("#", 1).await, vec![1]);
    let mut bob = Client::v5(broker.addr, "bob-1", "bob").await;
    assert_eq!(bob.subscribe("#", 1).await, vec![1]);
    assert_eq!(bob.next_on("fleet/alice/status").await, b"up".to_vec());
    for (topic, payload) in [("fleet/alice/secret", "s"), ("fleet/alice/gps", "1")] {
        assert_eq!(
            alice
                .publish_acked(topic, payload.as_bytes().to_vec())
                .await,
            0
        );
    }
    // bob reads the fleet but not alice's secret: only the gps comes.
    assert_eq!(bob.next_on("fleet/alice/gps").await, b"1".to_vec());
    assert!(
        bob.quiet_for(QUIET).await.is_none(),
        "an unreadable topic was delivered"
    );
    assert!(
        carol.quiet_for(QUIET).await.is_none(),
        "carol got a fleet message"
    );
    // 3.1.1 alike.
    let mut bob4 = Client::v4(broker.addr, "bob-4", "bob", 30).await;
    assert_eq!(bob4.subscribe("fleet/#", 1).await, vec![1]);
    assert_eq!(bob4.next_on("fleet/alice/status").await, b"up".to_vec());
}

/// Retained messages: written only where allowed, delivered only where readable.
#[tokio::test]
async fn retained_messages_follow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_acl(dir.path()).await;
    let mut alice = Client::v5(broker.addr, "alice-1", "alice").await;
    let answers = [
        alice
            .retain_acked("fleet/alice/status", b"up".to_vec())
            .await,
        alice
            .retain_acked("fleet/alice/secret", b"s".to_vec())
            .await,
        alice
            .retain_acked("fleet/carol/status", b"forged".to_vec())
            .await,
    ];
    assert_eq!(answers, [0, 0, 0x87]);
    let mut bob = Client::v5(broker.addr, "bob-1", "bob").await;
    assert_eq!(bob.subscribe("fleet/#", 1).await, vec![1]);
    assert_eq!(bob.next_on("fleet/alice/status").await, b"up".to_vec());
    assert!(bob.quiet_for(QUIET).await.is_none());
}

/// `%c` patterns give each device its own tree; ids with wildcards or `/` get nothing.
#[tokio::test]
async fn patterns_cannot_be_widened_by_hostile_ids() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_acl(dir.path()).await;
    let mut device = Client::v5(broker.addr, "dev-7", "carol").await;
    assert_eq!(device.subscribe("devices/dev-7/#", 1).await, vec![1]);
    assert_eq!(
        device
            .publish_acked("devices/dev-7/up", b"ok".to_vec())
            .await,
        0
    );
    assert_eq!(device.next_on("devices/dev-7/up").await, b"ok".to_vec());
    assert_eq!(
        device
            .publish_acked("devices/dev-8/up", b"x".to_vec())
            .await,
        0x87
    );
    for id in ["+", "#", "dev-7/#", "a/b"] {
        let mut hostile = Client::v5(broker.addr, id, "carol").await;
        assert_eq!(
            hostile.subscribe("devices/+/up", 1).await,
            vec![0x87],
            "{id}"
        );
        assert_eq!(hostile.subscribe("devices/#", 1).await, vec![0x87], "{id}");
        assert_eq!(
            hostile
                .publish_acked("devices/dev-7/up", b"x".to_vec())
                .await,
            0x87
        );
    }
}

/// A will on a topic the client may not write is refused at CONNECT (as Mosquitto does);
/// the file is re-read when it changes.
#[tokio::test]
async fn wills_are_checked_and_the_file_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_acl(dir.path()).await;
    let will = |topic: &str| options_with_will(broker.addr, "willing", "alice", topic);
    let connack = |options: rumqttc::MqttOptions| async move {
        let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
        match events.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => ack.code as u8,
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code as u8,
            other => panic!("no CONNACK: {other:?}"),
        }
    };
    assert_eq!(connack(will("fleet/alice/status")).await, 0);
    assert_eq!(connack(will("fleet/bob/status")).await, 5);

    let mut alice = Client::v5(broker.addr, "alice-1", "alice").await;
    assert_eq!(alice.publish_acked("news/today", b"x".to_vec()).await, 0x87);
    std::fs::write(
        dir.path().join("acl"),
        format!("{ACL}\nuser alice\ntopic write news/#\n"),
    )
    .unwrap();
    let publish_news = || async {
        let mut alice = Client::v5(broker.addr, "alice-2", "alice").await;
        alice.publish_acked("news/today", b"x".to_vec()).await == 0
    };
    eventually(publish_news).await;
}
