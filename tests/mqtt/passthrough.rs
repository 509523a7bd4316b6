//! Non-IM topics behave as on bare rumqttd, shielded from its known defects.

use crate::common::*;

/// QoS 0/1/2 between mixed 3.1.1 and 5 clients, and retained messages.
#[tokio::test]
async fn mixed_versions_pub_sub_all_qos_and_retain() {
    let broker = TestBroker::start().await;
    let mut sub4 = Client::v4(broker.addr, "dev-4", "alice", 30).await;
    let mut sub5 = Client::v5(broker.addr, "dev-5", "bob").await;
    assert_eq!(sub4.subscribe("sensors/#", 2).await, vec![2]);
    assert_eq!(sub5.subscribe("sensors/#", 2).await, vec![2]);
    let publisher = Client::v5(broker.addr, "pub-5", "carol").await;
    for qos in 0..=2u8 {
        let topic = format!("sensors/q{qos}");
        publisher.publish(&topic, qos, vec![qos]).await;
        assert_eq!(sub4.next_on(&topic).await, vec![qos]);
        assert_eq!(sub5.next_on(&topic).await, vec![qos]);
    }
    let mut publisher4 = Client::v4(broker.addr, "pub-4", "carol", 30).await;
    assert_eq!(
        publisher4
            .retain_acked("state/door", b"open".to_vec())
            .await,
        0
    );
    let mut late = Client::v4(broker.addr, "late", "alice", 30).await;
    late.subscribe("state/#", 1).await;
    assert_eq!(late.next_on("state/door").await, b"open".to_vec());
}

/// rumqtt#943: keep-alive 0 is legal MQTT and is accepted.
#[tokio::test]
async fn keep_alive_zero_is_accepted() {
    let broker = TestBroker::start().await;
    let mut idle = Client::v4(broker.addr, "idle", "alice", 0).await;
    assert_eq!(idle.subscribe("t/#", 1).await, vec![1]);
    let publisher = Client::v4(broker.addr, "p", "bob", 30).await;
    publisher.publish("t/x", 1, b"x".to_vec()).await;
    assert_eq!(idle.next_on("t/x").await, b"x".to_vec());
}

/// The DESIGN §2 repro: an MQTT 5 publish with a user property reaching a 3.1.1 subscriber,
/// then that subscriber reconnecting, must neither crash it nor lock out 3.1.1 clients.
#[tokio::test]
async fn v5_properties_to_v311_subscriber_then_reconnect() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let broker = TestBroker::start().await;
    let mut sub = Client::v4(broker.addr, "repro-sub", "alice", 30).await;
    sub.subscribe("repro/#", 1).await;
    let publisher = Client::v5(broker.addr, "repro-pub", "bob").await;
    let properties = PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    publisher.publish_with("repro/props", "x", properties).await;
    assert_eq!(sub.next_on("repro/props").await, b"x".to_vec());
    sub.disconnect().await;
    let mut again = Client::v4(broker.addr, "repro-sub", "alice", 30).await;
    again.subscribe("repro/#", 1).await;
    let mut other = Client::v4(broker.addr, "another-311", "carol", 30).await;
    other.subscribe("repro/#", 1).await;
    publisher.publish("repro/after", 1, b"y".to_vec()).await;
    assert_eq!(again.next_on("repro/after").await, b"y".to_vec());
    assert_eq!(other.next_on("repro/after").await, b"y".to_vec());
}

/// Live IM deliveries and rumqttd's own QoS 1 publishes share one connection's packet ids:
/// with hundreds of each in flight, every one arrives and every ack reaches its owner
/// (rumqttd would stall at its inflight limit otherwise, and IM deliveries would be pulled
/// again).
#[tokio::test]
async fn im_and_broker_packet_ids_never_collide() {
    let broker = TestBroker::start().await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    // The digest follows the first SUBACK; waiting for the second one would skip it.
    let _ = bob.digest("bob").await;
    bob.subscribe("sensors/#", 1).await;
    let sensors = Client::v4(broker.addr, "sensor", "carol", 30).await;
    let alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    let n = 300;
    for i in 0..n {
        sensors
            .publish("sensors/t", 1, format!("{i}").into_bytes())
            .await;
        let id = format!("c{i}");
        alice
            .publish("im/u/bob", 1, chat(&id, "bob", &id, false))
            .await;
    }
    let (mut chats, mut readings) = (0, 0);
    while chats < n || readings < n {
        if let Seen::Publish { topic, .. } = bob.next().await {
            match topic.as_str() {
                "im/u/bob" => chats += 1,
                "sensors/t" => readings += 1,
                _ => {}
            }
        }
    }
    assert_eq!((chats, readings), (n, n));
    // Every PUBACK went out before this Pull on the same connection.
    let left = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
    assert!(
        left.messages.is_empty(),
        "live deliveries were all acknowledged"
    );
}

/// A will on a normal topic is published by rumqttd when the client vanishes; a will on
/// an IM topic is refused at CONNECT.
#[tokio::test]
async fn wills_pass_through_but_not_into_im() {
    let broker = TestBroker::start().await;
    let mut watcher = Client::v4(broker.addr, "watcher", "alice", 30).await;
    watcher.subscribe("status/#", 1).await;
    let options = options_with_will(broker.addr, "dying", "bob", "status/bob");
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
    let dying = tokio::spawn(async move {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) = events.poll().await {
                break;
            }
        }
        events
    });
    drop(dying.await.unwrap());
    assert_eq!(watcher.next_on("status/bob").await, b"gone".to_vec());

    let options = options_with_will(broker.addr, "sneaky", "bob", "im/u/alice");
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
    assert!(
        events.poll().await.is_err(),
        "will on an IM topic must be refused"
    );
}

/// rumqttd 0.20 frees a connection id twice when a client sends DISCONNECT and then closes
/// its socket; a client that got the id in between was dropped. Connecting right after a
/// clean disconnect, many times over, must keep working.
#[tokio::test]
async fn connect_right_after_clean_disconnect_survives() {
    let broker = TestBroker::start().await;
    for i in 0..100 {
        let leaving = Client::v4(broker.addr, &format!("leaving-{i}"), "alice", 30).await;
        leaving.v4.as_ref().unwrap().disconnect().await.unwrap();
        // Vary the gap so the new CONNECT lands anywhere in the old link's teardown.
        tokio::time::sleep(std::time::Duration::from_micros(200 * (i % 10))).await;
        let mut arriving = Client::v4(broker.addr, &format!("arriving-{i}"), "bob", 30).await;
        assert_eq!(arriving.subscribe("t/#", 1).await, vec![1]);
        arriving.publish("t/x", 1, b"x".to_vec()).await;
        assert_eq!(arriving.next_on("t/x").await, b"x".to_vec());
    }
}

/// A persistent (clean session = false) subscriber gets the QoS 1 messages published while
/// it was away, as rumqttd queues them.
#[tokio::test]
async fn persistent_session_receives_what_was_missed() {
    let broker = TestBroker::start().await;
    let mut device = Client::v4_session(broker.addr, "sensor-hub", "alice", 30, false).await;
    assert_eq!(device.subscribe("queue/#", 1).await, vec![1]);
    device.disconnect().await;
    let mut publisher = Client::v4(broker.addr, "pub", "bob", 30).await;
    assert_eq!(
        publisher
            .publish_acked("queue/a", b"while away".to_vec())
            .await,
        0
    );
    let mut device = Client::v4_session(broker.addr, "sensor-hub", "alice", 30, false).await;
    assert_eq!(device.next_on("queue/a").await, b"while away".to_vec());
}

/// MQTT 5 user properties reach MQTT 5 subscribers unchanged through the hook layer.
#[tokio::test]
async fn v5_properties_pass_through_to_v5_subscribers() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let broker = TestBroker::start().await;
    let mut sub = Client::v5(broker.addr, "sub-5", "alice").await;
    sub.subscribe("props/#", 1).await;
    let publisher = Client::v5(broker.addr, "pub-5", "bob").await;
    let properties = PublishProperties {
        correlation_data: Some(bytes::Bytes::from_static(b"abc")),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    publisher.publish_with("props/x", "p", properties).await;
    let (payload, correlation) = sub.next_with_correlation("props/x").await;
    assert_eq!(payload, b"p".to_vec());
    assert_eq!(correlation.as_deref(), Some(&b"abc"[..]));
}

/// On one node (no cluster) rumqttd keeps shared subscriptions: each message reaches one
/// member of the group, and a plain subscriber gets them all.
#[tokio::test]
async fn shared_subscription_on_one_node() {
    let broker = TestBroker::start().await;
    let mut first = Client::v4(broker.addr, "worker-1", "alice", 30).await;
    assert_eq!(first.subscribe("$share/w/jobs/#", 1).await, vec![1]);
    let mut second = Client::v5(broker.addr, "worker-2", "bob").await;
    assert_eq!(second.subscribe("$share/w/jobs/#", 1).await, vec![1]);
    let mut producer = Client::v4(broker.addr, "producer", "carol", 30).await;
    for n in 0..10u8 {
        producer.publish_acked("jobs/a", vec![n]).await;
    }
    let mut got = Vec::new();
    for member in [&mut first, &mut second] {
        while let Some(seen) = member
            .quiet_for(std::time::Duration::from_millis(300))
            .await
        {
            if let Seen::Publish { payload, .. } = seen {
                got.push(payload);
            }
        }
    }
    got.sort();
    assert_eq!(got, (0..10u8).map(|n| vec![n]).collect::<Vec<_>>());
}
