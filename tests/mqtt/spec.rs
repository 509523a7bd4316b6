//! MQTT 5 as the spec says, whatever rumqttd 0.20 does underneath. Each scenario runs over
//! real connections through mqtt-im and, where the hook layer corrects rumqttd, on bare
//! rumqttd too, whose different outcome is asserted as well: the test shows what is
//! corrected, and says so if a later rumqttd stops needing it.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;

use crate::common::*;

const QUIET: Duration = Duration::from_millis(400);

/// Where a scenario runs.
#[derive(Clone, Copy)]
enum On {
    MqttIm(SocketAddr),
    Bare(SocketAddr),
}

impl On {
    fn addr(self) -> SocketAddr {
        match self {
            On::MqttIm(addr) | On::Bare(addr) => addr,
        }
    }

    async fn client(self, id: &str, user: &str) -> Client {
        Client::v5_with(self.options(id, user)).await
    }

    fn options(self, id: &str, user: &str) -> rumqttc::v5::MqttOptions {
        let addr = self.addr();
        let mut options = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_credentials(user, "pw");
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    /// Nothing more arrives for `client`: on mqtt-im proven by a round trip after the
    /// wait; a dead connection fails either way.
    async fn nothing_more(self, client: &mut Client) -> Option<Seen> {
        match self {
            On::MqttIm(_) => client.quiet_for(QUIET).await,
            On::Bare(_) => client.within(QUIET).await,
        }
    }

    /// Publishes until `client` sees nothing more: their QoS, retain flag, topic and
    /// subscription identifiers, in order.
    async fn received(self, client: &mut Client) -> Vec<Received> {
        let mut got = Vec::new();
        while let Some(seen) = self.nothing_more(client).await {
            if let Seen::Publish {
                topic,
                qos,
                retain,
                properties,
                payload,
                ..
            } = seen
            {
                let mut ids = properties
                    .map(|p| p.subscription_identifiers)
                    .unwrap_or_default();
                ids.sort_unstable();
                got.push(Received {
                    topic,
                    qos,
                    retain,
                    ids,
                    size: payload.len(),
                });
            }
        }
        got
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Received {
    topic: String,
    qos: u8,
    retain: bool,
    ids: Vec<usize>,
    size: usize,
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

async fn both() -> (TestBroker, On, On) {
    let broker = TestBroker::start().await;
    let bare = bare_rumqttd_v5().await;
    let im = On::MqttIm(broker.addr);
    (broker, im, On::Bare(bare))
}

/// QoS 0 and 1 publishes on a QoS 2 subscription: the QoS of each delivery.
async fn delivered_qos(on: On) -> Vec<u8> {
    let mut bob = on.client("spec-qos-bob", "bob").await;
    bob.subscribe_with(filter("spec/qos", QoS::ExactlyOnce), None)
        .await;
    let alice = on.client("spec-qos-alice", "alice").await;
    for qos in [0, 1, 2] {
        alice.publish("spec/qos", qos, vec![qos]).await;
        bob.next_on("spec/qos").await;
    }
    let _ = on.nothing_more(&mut bob).await;
    let mut again = Vec::new();
    for qos in [0, 1, 2] {
        alice.publish("spec/qos", qos, vec![qos]).await;
        match bob.next_publish().await {
            Seen::Publish { qos, .. } => again.push(qos),
            other => panic!("{other:?}"),
        }
    }
    again
}

#[tokio::test]
async fn qos_is_the_lower_of_publish_and_subscription() {
    let (_broker, im, bare) = both().await;
    assert_eq!(delivered_qos(im).await, vec![0, 1, 2]);
    assert_eq!(
        delivered_qos(bare).await,
        vec![2, 2, 2],
        "rumqttd raises it"
    );
}

/// A publisher subscribed with no-local (another subscriber gets the message): whether
/// the publisher got its own message back.
async fn no_local(on: On) -> bool {
    let mut alice = on.client("spec-nl-alice", "alice").await;
    let mut local = filter("spec/nl", QoS::AtLeastOnce);
    local.nolocal = true;
    alice.subscribe_with(local, None).await;
    let mut bob = on.client("spec-nl-bob", "bob").await;
    bob.subscribe_with(filter("spec/nl", QoS::AtLeastOnce), None)
        .await;
    alice.publish("spec/nl", 1, b"hi".to_vec()).await;
    bob.next_on("spec/nl").await;
    let own = on.received(&mut alice).await;
    own.iter().any(|r| r.topic == "spec/nl")
}

#[tokio::test]
async fn no_local_keeps_a_publisher_s_own_messages_from_it() {
    let (_broker, im, bare) = both().await;
    assert!(!no_local(im).await);
    assert!(no_local(bare).await, "rumqttd ignores no-local");
}

/// Retained publishes to a subscription with retain-as-published and one without: the
/// retain flags of the live deliveries.
async fn retain_as_published(on: On) -> (bool, bool) {
    let mut bob = on.client("spec-rap-bob", "bob").await;
    let mut kept = filter("spec/rap/kept", QoS::AtLeastOnce);
    kept.preserve_retain = true;
    bob.subscribe_with(kept, None).await;
    bob.subscribe_with(filter("spec/rap/plain", QoS::AtLeastOnce), None)
        .await;
    let alice = on.client("spec-rap-alice", "alice").await;
    let mut flags = Vec::new();
    for topic in ["spec/rap/kept", "spec/rap/plain"] {
        alice.publish_retain(topic, 1, true, b"r".to_vec()).await;
        match bob.next_publish().await {
            Seen::Publish { retain, .. } => flags.push(retain),
            other => panic!("{other:?}"),
        }
        // Leave no retained message behind.
        alice.publish_retain(topic, 1, true, Vec::new()).await;
        bob.next_publish().await;
    }
    (flags[0], flags[1])
}

#[tokio::test]
async fn retain_as_published_keeps_the_flag() {
    let (_broker, im, bare) = both().await;
    assert_eq!(retain_as_published(im).await, (true, false));
    assert_eq!(
        retain_as_published(bare).await,
        (false, false),
        "rumqttd clears it"
    );
}

/// Retained messages a SUBSCRIBE brings: Retain Handling 2 (a new subscription), then 1 on
/// a new subscription, 1 again on the same one, and 0 on a new one.
async fn retain_handling(on: On) -> Vec<usize> {
    let alice = on.client("spec-rh-alice", "alice").await;
    alice
        .publish_retain("spec/rh/a", 1, true, b"kept".to_vec())
        .await;
    let mut bob = on.client("spec-rh-bob", "bob").await;
    // The retained message is in place once a plain subscriber gets it.
    bob.subscribe_with(filter("spec/rh/a", QoS::AtLeastOnce), None)
        .await;
    bob.next_on("spec/rh/a").await;
    let mut carol = on.client("spec-rh-carol", "carol").await;
    let mut counts = Vec::new();
    for rule in [
        RetainForwardRule::Never,
        RetainForwardRule::OnNewSubscribe,
        RetainForwardRule::OnNewSubscribe,
        RetainForwardRule::OnEverySubscribe,
    ] {
        let path = match rule {
            RetainForwardRule::Never => "spec/rh/#",
            RetainForwardRule::OnNewSubscribe => "spec/rh/+",
            RetainForwardRule::OnEverySubscribe => "spec/+/a",
        };
        let mut wanted = filter(path, QoS::AtLeastOnce);
        wanted.retain_forward_rule = rule;
        carol.subscribe_with(wanted, None).await;
        counts.push(on.received(&mut carol).await.len());
    }
    alice.publish_retain("spec/rh/a", 1, true, Vec::new()).await;
    counts
}

#[tokio::test]
async fn retain_handling_decides_which_subscribes_get_retained_messages() {
    let (_broker, im, bare) = both().await;
    assert_eq!(retain_handling(im).await, vec![0, 1, 0, 1]);
    assert_eq!(
        retain_handling(bare).await,
        vec![1, 1, 0, 1],
        "rumqttd ignores Retain Handling 2"
    );
}

/// Overlapping subscriptions with identifiers 2 and 3 (QoS 0 and 1): the copies a QoS 1
/// publish makes.
async fn overlapping(on: On) -> Vec<Received> {
    let mut bob = on.client("spec-ov-bob", "bob").await;
    bob.subscribe_with(filter("spec/ov/a", QoS::AtMostOnce), Some(2))
        .await;
    bob.subscribe_with(filter("spec/ov/#", QoS::AtLeastOnce), Some(3))
        .await;
    let alice = on.client("spec-ov-alice", "alice").await;
    alice.publish("spec/ov/a", 1, b"x".to_vec()).await;
    let mut copies = on.received(&mut bob).await;
    copies.sort_by(|a, b| a.ids.cmp(&b.ids));
    copies
}

#[tokio::test]
async fn overlapping_subscriptions_give_one_copy_with_every_identifier() {
    let (_broker, im, bare) = both().await;
    let one = Received {
        topic: "spec/ov/a".into(),
        qos: 1,
        retain: false,
        ids: vec![2, 3],
        size: 1,
    };
    assert_eq!(overlapping(im).await, vec![one]);
    let copies: Vec<Vec<usize>> = overlapping(bare).await.into_iter().map(|r| r.ids).collect();
    assert_eq!(
        copies,
        vec![vec![2], vec![3]],
        "rumqttd sends one per filter"
    );
}

/// Topics a client taking topic aliases sees for publishes on two topics under one filter.
async fn aliased_topics(on: On) -> Vec<String> {
    let mut options = on.options("spec-ta-bob", "bob");
    options.set_topic_alias_max(Some(10));
    let mut bob = Client::v5_with(options).await;
    bob.subscribe_with(filter("spec/ta/+", QoS::AtLeastOnce), None)
        .await;
    let alice = on.client("spec-ta-alice", "alice").await;
    // rumqttc hands on aliased publishes as they come: the alias is resolved here.
    let mut aliases = std::collections::HashMap::new();
    let mut topics = Vec::new();
    for topic in ["spec/ta/x", "spec/ta/y", "spec/ta/x"] {
        alice.publish(topic, 1, b"t".to_vec()).await;
        let Seen::Publish {
            topic, properties, ..
        } = bob.next_publish().await
        else {
            panic!("no publish");
        };
        let alias = properties.and_then(|p| p.topic_alias);
        let topic = match (topic.is_empty(), alias) {
            (true, Some(alias)) => aliases.get(&alias).cloned().unwrap_or_default(),
            (false, Some(alias)) => {
                aliases.insert(alias, topic.clone());
                topic
            }
            (_, None) => topic,
        };
        topics.push(topic);
    }
    topics
}

#[tokio::test]
async fn server_topic_aliases_name_each_topic() {
    let (_broker, im, bare) = both().await;
    let sent = ["spec/ta/x", "spec/ta/y", "spec/ta/x"]
        .map(String::from)
        .to_vec();
    assert_eq!(aliased_topics(im).await, sent);
    assert_ne!(
        aliased_topics(bare).await,
        sent,
        "rumqttd gives one alias per filter"
    );
}

/// A persistent session (expiry 2 s, started clean): session present after a reconnect
/// within the interval, and how many of two messages published meanwhile arrive.
async fn session_within_expiry(on: On) -> (bool, usize) {
    let mut options = on.options("spec-se-bob", "bob");
    options.set_clean_start(true);
    options.set_session_expiry_interval(Some(2));
    let mut bob = Client::v5_with(options.clone()).await;
    bob.subscribe_with(filter("spec/se", QoS::AtLeastOnce), None)
        .await;
    bob.disconnect().await;
    let mut alice = on.client("spec-se-alice", "alice").await;
    for n in 0..2u8 {
        alice.publish("spec/se", 1, vec![n]).await;
    }
    let _ = on.nothing_more(&mut alice).await;
    options.set_clean_start(false);
    let mut bob = Client::v5_with(options).await;
    let present = bob.session_present;
    (present, on.received(&mut bob).await.len())
}

#[tokio::test]
async fn mqtt5_sessions_last_for_their_expiry_interval() {
    let (broker, im, bare) = both().await;
    assert_eq!(session_within_expiry(im).await, (true, 2));
    assert_eq!(
        session_within_expiry(bare).await,
        (false, 0),
        "rumqttd drops a clean-start session at once"
    );
    // Past the interval the session is gone, and nothing is queued for it any more.
    let mut options = im.options("spec-se-bob", "bob");
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(1));
    Client::v5_with(options.clone()).await.disconnect().await;
    // The sweep ends it while the client stays away.
    let expired = || async { metric(&broker, "mqtt_im_sessions_expired_total") >= 1.0 };
    eventually(expired).await;
    let mut bob = Client::v5_with(options.clone()).await;
    assert!(!bob.session_present, "an expired session was resumed");
    let mut alice = im.client("spec-se-alice", "alice").await;
    alice.publish("spec/se", 1, b"late".to_vec()).await;
    let _ = alice.quiet_for(QUIET).await;
    assert!(
        bob.quiet_for(QUIET).await.is_none(),
        "the old subscription lived on"
    );
    // A session with expiry 0 ends with its connection, but not when a newer connection
    // takes it over: that one is the session's latest.
    let mut resumed = im.options("spec-se-carol", "carol");
    resumed.set_clean_start(false);
    let mut old = Client::v5_with(resumed.clone()).await;
    old.subscribe_with(filter("spec/se/c", QoS::AtLeastOnce), None)
        .await;
    let mut new = Client::v5_with(resumed.clone()).await;
    assert!(new.session_present, "a take-over lost the session");
    assert_eq!(old.disconnect_reason().await, 0x8E);
    alice.publish("spec/se/c", 1, b"kept".to_vec()).await;
    assert_eq!(new.next_on("spec/se/c").await, b"kept".to_vec());
    new.disconnect().await;
    let after = Client::v5_with(resumed).await;
    assert!(!after.session_present, "expiry 0 outlived its connection");
    drop(broker);
}

#[tokio::test]
async fn message_expiry_drops_the_expired_and_sends_the_remaining_interval() {
    let broker = TestBroker::start().await;
    let on = On::MqttIm(broker.addr);
    let mut options = on.options("spec-me-bob", "bob");
    options.set_session_expiry_interval(Some(60));
    let mut bob = Client::v5_with(options.clone()).await;
    bob.subscribe_with(filter("spec/me", QoS::AtLeastOnce), None)
        .await;
    bob.disconnect().await;
    let alice = on.client("spec-me-alice", "alice").await;
    for (expiry, payload) in [(1, "short"), (30, "long")] {
        let properties = PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        alice.publish_with("spec/me", payload, properties).await;
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    options.set_clean_start(false);
    let mut bob = Client::v5_with(options).await;
    assert!(bob.session_present);
    match bob.next_publish().await {
        Seen::Publish {
            payload,
            properties,
            ..
        } => {
            assert_eq!(payload, b"long");
            let left = properties.unwrap().message_expiry_interval.unwrap();
            assert!(left < 30, "remaining interval {left}");
        }
        other => panic!("{other:?}"),
    }
    assert!(bob.quiet_for(QUIET).await.is_none(), "the expired one came");
}

#[tokio::test]
async fn request_response_and_user_properties_pass_end_to_end() {
    let broker = TestBroker::start().await;
    let on = On::MqttIm(broker.addr);
    let mut responder = on.client("spec-rr-bob", "bob").await;
    responder
        .subscribe_with(filter("spec/rr/req", QoS::AtLeastOnce), None)
        .await;
    let mut requester = on.client("spec-rr-alice", "alice").await;
    requester
        .subscribe_with(filter("spec/rr/resp", QoS::AtLeastOnce), None)
        .await;
    let sent = vec![("k".to_string(), "v".to_string())];
    let properties = PublishProperties {
        response_topic: Some("spec/rr/resp".into()),
        correlation_data: Some(b"c-1".to_vec().into()),
        user_properties: sent,
        content_type: Some("text/plain".into()),
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    requester
        .publish_with("spec/rr/req", "ping", properties)
        .await;
    let Seen::Publish {
        properties, qos, ..
    } = responder.next_publish().await
    else {
        panic!("no request");
    };
    let properties = properties.unwrap();
    assert_eq!(qos, 1);
    assert_eq!(properties.user_properties, vec![("k".into(), "v".into())]);
    assert_eq!(properties.correlation_data.as_deref(), Some(&b"c-1"[..]));
    assert_eq!(properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(properties.payload_format_indicator, Some(1));
    let reply = PublishProperties {
        correlation_data: properties.correlation_data.clone(),
        ..Default::default()
    };
    let topic = properties.response_topic.unwrap();
    responder.publish_with(&topic, "pong", reply).await;
    let (payload, correlation) = requester.next_with_correlation("spec/rr/resp").await;
    assert_eq!(
        (payload, correlation),
        (b"pong".to_vec(), Some(b"c-1".to_vec()))
    );
}

#[tokio::test]
async fn publishes_over_the_maximum_packet_size_are_not_sent_and_counted() {
    let broker = TestBroker::start_with(|c| {
        c.listeners.metrics = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut bob = Client::v5_max_packet(broker.addr, "spec-mp-bob", "bob", Some(300)).await;
    bob.subscribe("spec/mp", 1).await;
    let mut alice = Client::v5(broker.addr, "spec-mp-alice", "alice").await;
    for size in [100, 1000, 50] {
        assert_eq!(alice.publish_acked("spec/mp", vec![b'x'; size]).await, 0);
    }
    let got: Vec<usize> = On::MqttIm(broker.addr)
        .received(&mut bob)
        .await
        .into_iter()
        .map(|r| r.size)
        .collect();
    assert_eq!(got, vec![100, 50]);
    let series = "mqtt_im_publishes_undelivered_total{reason=\"too_large\"}";
    assert_eq!(metric(&broker, series), 1.0);
}

/// rumqttd never answers an UNSUBSCRIBE of a filter the link does not hold.
#[tokio::test]
async fn unsubscribing_what_was_never_subscribed_is_answered() {
    let (_broker, im, bare) = both().await;
    let mut bob = im.client("spec-un-bob", "bob").await;
    bob.subscribe("spec/un/held", 1).await;
    assert_eq!(bob.unsubscribe("spec/un/never").await, vec![0x11]);
    assert_eq!(bob.unsubscribe("spec/un/held").await, vec![0]);
    let mut bare_bob = bare.client("spec-un-bob", "bob").await;
    bare_bob.subscribe("spec/un/held", 1).await;
    bare_bob
        .v5
        .as_ref()
        .unwrap()
        .unsubscribe("spec/un/never")
        .await
        .unwrap();
    assert!(
        bare.nothing_more(&mut bare_bob).await.is_none(),
        "bare rumqttd answered after all"
    );
}

/// A publish exactly at the listener's packet limit still passes, although the hook layer
/// carries a header in it through rumqttd.
#[tokio::test]
async fn a_publish_at_the_packet_limit_passes_with_what_is_carried() {
    let broker = TestBroker::start_with(|c| c.broker.max_packet_size = 4096).await;
    let mut bob = Client::v5(broker.addr, "spec-lim-bob", "bob").await;
    bob.subscribe("spec/max", 1).await;
    let mut alice = Client::v5(broker.addr, "spec-lim-alice", "alice").await;
    // 1 + 2 (remaining length) + 2 + 8 (topic) + 2 (packet id) + 1 (properties) = 16 bytes.
    let payload = vec![b'x'; 4096 - 16];
    assert_eq!(alice.publish_acked("spec/max", payload.clone()).await, 0);
    assert_eq!(bob.next_on("spec/max").await, payload);
}

/// A client with more unanswered QoS 2 publishes than the CONNACK's Receive Maximum
/// (1,024) is disconnected with 0x93, as MQTT 5 says (raw bytes: client libraries respect
/// the maximum).
#[tokio::test]
async fn more_unanswered_publishes_than_receive_maximum_end_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = TestBroker::start().await;
    let connected = raw_connect(broker.addr, true, "spec-rm", true, Some(("alice", "pw"))).await;
    assert_eq!(connected.code, 0);
    let mut stream = connected.stream;
    let mut out = Vec::new();
    for pkid in 1..=1025u16 {
        // PUBLISH QoS 2, topic "spec/rm", the packet id, no properties, payload "x".
        out.extend_from_slice(&[0x34, 13, 0, 7]);
        out.extend_from_slice(b"spec/rm");
        out.extend_from_slice(&pkid.to_be_bytes());
        out.extend_from_slice(&[0, b'x']);
    }
    stream.write_all(&out).await.unwrap();
    // PUBRECs come (nobody sends PUBREL), then the DISCONNECT.
    let reason = tokio::time::timeout(WAIT, async {
        loop {
            let mut first = [0u8; 1];
            stream
                .read_exact(&mut first)
                .await
                .expect("closed without DISCONNECT");
            let (mut len, mut shift) = (0usize, 0);
            loop {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.unwrap();
                len |= usize::from(byte[0] & 0x7f) << shift;
                shift += 7;
                if byte[0] & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body).await.unwrap();
            if first[0] >> 4 == 14 {
                return body[0];
            }
        }
    })
    .await
    .expect("no DISCONNECT");
    assert_eq!(reason, 0x93);
}
