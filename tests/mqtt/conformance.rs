//! What standard clients and the Eclipse Paho interoperability suites exercise, written here
//! against mqtt-im (not a copy of any suite): client ids with spaces, `$` topics and `#`,
//! retained messages and their clearing, overlapping subscriptions, redelivery on reconnect,
//! unsubscribe, zero-length payloads; MQTT 5 properties (request/response, user properties,
//! payload format, content type, message expiry). Wills and keep-alive are in
//! `passthrough.rs`, ACL refusals in `topic_acl.rs`, client ids in `client_ids.rs`, maximum
//! packet size in `offline.rs` and `pull.rs`. The README's compatibility table lists what differs (no-local,
//! retain-as-published, retain handling, the QoS of a QoS 0 publish on a QoS 1 subscription,
//! `$` filters, topic aliases).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

const QUIET: Duration = Duration::from_millis(400);

/// An MQTT 5 client whose received PUBLISH packets arrive whole (properties included), and
/// whose acknowledgements are awaited rather than slept over.
struct Peer {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Arrival>,
    /// Publishes that came while an acknowledgement was awaited, in order.
    held: std::collections::VecDeque<Publish>,
}

/// What the broker sent a [`Peer`].
enum Arrival {
    Publish(Box<Publish>),
    /// SUBACK, UNSUBACK or PUBACK.
    Ack,
}

impl Peer {
    async fn connect(broker: &TestBroker, client_id: &str, clean: bool) -> Self {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.addr.port());
        options.set_credentials("alice", "pw");
        options.set_clean_start(clean);
        if !clean {
            options.set_session_expiry_interval(Some(600));
        }
        Self::with(options).await
    }

    async fn with(options: MqttOptions) -> Self {
        let (client, mut events) = AsyncClient::new(options, 100);
        let (tx, arrivals) = mpsc::unbounded_channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                let arrival = match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                        continue;
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        Arrival::Publish(Box::new(publish))
                    }
                    Ok(Event::Incoming(
                        Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PubAck(_),
                    )) => Arrival::Ack,
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => continue,
                };
                let _ = tx.send(arrival);
            }
        });
        tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
        Self {
            client,
            events: arrivals,
            held: Default::default(),
        }
    }

    /// Waits for the broker's next acknowledgement; publishes before it stay for `next`.
    async fn acked(&mut self) {
        loop {
            match self.arrival(WAIT).await.expect("no acknowledgement came") {
                Arrival::Ack => return,
                Arrival::Publish(publish) => self.held.push_back(*publish),
            }
        }
    }

    /// The next arrival within `wait`; a connection that ended fails the test.
    async fn arrival(&mut self, wait: Duration) -> Option<Arrival> {
        match tokio::time::timeout(wait, self.events.recv()).await {
            Ok(Some(arrival)) => Some(arrival),
            Ok(None) => panic!("connection ended"),
            Err(_) => None,
        }
    }

    /// Subscribes and waits for the SUBACK.
    async fn subscribe(&mut self, filter: Filter) {
        self.client.subscribe_many([filter]).await.unwrap();
        self.acked().await;
    }

    /// Unsubscribes and waits for the UNSUBACK.
    async fn unsubscribe(&mut self, filter: &str) {
        self.client.unsubscribe(filter).await.unwrap();
        self.acked().await;
    }

    /// Publishes; at QoS 1 waits for the PUBACK (the broker has the message from then on).
    async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .unwrap();
        if qos == QoS::AtLeastOnce {
            self.acked().await;
        }
    }

    /// Disconnects and waits until the broker has closed the link behind it, so that what
    /// comes next meets the session the broker keeps.
    async fn leave(self, broker: &TestBroker) {
        self.client.disconnect().await.unwrap();
        wait_links(broker, 0.0).await;
    }

    async fn next(&mut self) -> Publish {
        self.maybe_next_within(WAIT)
            .await
            .expect("no publish arrived")
    }

    /// The next publish if one arrives within [`QUIET`].
    async fn maybe_next(&mut self) -> Option<Publish> {
        self.maybe_next_within(QUIET).await
    }

    async fn maybe_next_within(&mut self, wait: Duration) -> Option<Publish> {
        if let Some(publish) = self.held.pop_front() {
            return Some(publish);
        }
        loop {
            match self.arrival(wait).await? {
                Arrival::Publish(publish) => return Some(*publish),
                Arrival::Ack => {}
            }
        }
    }

    /// Nothing arrives within [`QUIET`] on a connection that is still alive (a SUBSCRIBE
    /// mqtt-im refuses is answered after the wait).
    async fn quiet(&mut self) -> bool {
        let quiet = self.maybe_next().await.is_none();
        self.subscribe(filter(QUIET_PROBE, QoS::AtLeastOnce)).await;
        quiet && self.held.is_empty()
    }
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

fn topic(publish: &Publish) -> String {
    String::from_utf8(publish.topic.to_vec()).unwrap()
}

/// A client id with a space (Paho's clean-up client), publishing to a topic with spaces, and
/// a zero-length payload.
#[tokio::test]
async fn ids_with_spaces_and_zero_length_payloads() {
    let broker = TestBroker::start().await;
    let mut peer = Peer::connect(&broker, "clean retained", true).await;
    peer.subscribe(filter("paho/topic with spaces", QoS::AtLeastOnce))
        .await;
    peer.publish("paho/topic with spaces", QoS::AtLeastOnce, false, b"")
        .await;
    let got = peer.next().await;
    assert_eq!(topic(&got), "paho/topic with spaces");
    assert!(got.payload.is_empty());
}

/// `#` and `+` at the first level never match `$` topics. rumqttd 0.20 serves no `$`
/// filters (it would end the connection): they are refused in the SUBACK (0x8F / 0x80) and the
/// connection stays.
#[tokio::test]
async fn dollar_topics_are_not_matched_by_wildcards() {
    let broker = TestBroker::start().await;
    let mut all = Peer::connect(&broker, "all", true).await;
    all.subscribe(filter("#", QoS::AtLeastOnce)).await;
    let mut plus = Peer::connect(&broker, "plus", true).await;
    plus.subscribe(filter("+/x", QoS::AtLeastOnce)).await;
    let mut sender = Peer::connect(&broker, "sender", true).await;
    sender
        .publish("$app/x", QoS::AtLeastOnce, false, b"d")
        .await;
    assert!(all.quiet().await && plus.quiet().await);
    let mut dollar = Client::v5(broker.addr, "dollar", "alice").await;
    assert_eq!(dollar.subscribe("$app/#", 1).await, vec![0x8f]);
    let mut v4 = Client::v4(broker.addr, "dollar-4", "alice", 30).await;
    assert_eq!(v4.subscribe("$SYS/#", 1).await, vec![0x80]);
    assert_eq!(
        dollar.subscribe("plain/#", 1).await,
        vec![1],
        "still connected"
    );
    sender
        .publish("plain/after", QoS::AtLeastOnce, false, b"a")
        .await;
    assert_eq!(dollar.next_on("plain/after").await, b"a".to_vec());
}

/// Retained messages reach later subscribers, are replaced, and are cleared by an empty
/// retained publish.
#[tokio::test]
async fn retained_messages_and_their_clearing() {
    let broker = TestBroker::start().await;
    let mut sender = Peer::connect(&broker, "sender", true).await;
    sender
        .publish("paho/retained/a", QoS::AtLeastOnce, true, b"one")
        .await;
    sender
        .publish("paho/retained/a", QoS::AtLeastOnce, true, b"two")
        .await;
    sender
        .publish("paho/retained/b", QoS::AtLeastOnce, true, b"b")
        .await;
    let mut late = Peer::connect(&broker, "late", true).await;
    late.subscribe(filter("paho/retained/a", QoS::AtLeastOnce))
        .await;
    let got = late.next().await;
    assert_eq!((got.payload.as_ref(), got.retain), (&b"two"[..], true));
    sender
        .publish("paho/retained/a", QoS::AtLeastOnce, true, b"")
        .await;
    sender
        .publish("paho/retained/b", QoS::AtLeastOnce, true, b"")
        .await;
    let mut later = Peer::connect(&broker, "later", true).await;
    later
        .subscribe(filter("paho/retained/#", QoS::AtLeastOnce))
        .await;
    assert!(
        later.quiet().await,
        "cleared retained messages were delivered"
    );
}

/// Overlapping subscriptions deliver a message once or once per subscription (both allowed
/// by MQTT 5), never zero times, and at the highest QoS granted.
#[tokio::test]
async fn overlapping_subscriptions() {
    let broker = TestBroker::start().await;
    let mut peer = Peer::connect(&broker, "overlap", true).await;
    peer.subscribe(filter("paho/overlap/#", QoS::AtMostOnce))
        .await;
    peer.subscribe(filter("paho/overlap/+", QoS::AtLeastOnce))
        .await;
    peer.publish("paho/overlap/x", QoS::AtLeastOnce, false, b"o")
        .await;
    let first = peer.next().await;
    assert_eq!(first.payload.as_ref(), b"o");
    let mut copies = vec![first.qos];
    while let Some(copy) = peer.maybe_next().await {
        copies.push(copy.qos);
    }
    assert!(copies.len() <= 2, "{copies:?}");
}

/// A persistent session keeps QoS 1 messages published while the client was away, and
/// they arrive when it comes back.
#[tokio::test]
async fn redelivery_on_reconnect() {
    let broker = TestBroker::start().await;
    let mut peer = Peer::connect(&broker, "persistent", false).await;
    peer.subscribe(filter("paho/queue", QoS::AtLeastOnce)).await;
    peer.leave(&broker).await;
    let mut sender = Peer::connect(&broker, "sender", true).await;
    for i in 0..3u8 {
        sender
            .publish("paho/queue", QoS::AtLeastOnce, false, &[i])
            .await;
    }
    let mut back = Peer::connect(&broker, "persistent", false).await;
    for i in 0..3u8 {
        assert_eq!(back.next().await.payload.as_ref(), &[i]);
    }
}

/// Unsubscribing stops delivery.
#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let broker = TestBroker::start().await;
    let mut peer = Peer::connect(&broker, "unsub", true).await;
    peer.subscribe(filter("paho/unsub", QoS::AtLeastOnce)).await;
    peer.publish("paho/unsub", QoS::AtLeastOnce, false, b"1")
        .await;
    assert_eq!(peer.next().await.payload.as_ref(), b"1");
    peer.unsubscribe("paho/unsub").await;
    peer.publish("paho/unsub", QoS::AtLeastOnce, false, b"2")
        .await;
    assert!(peer.quiet().await);
}

/// Request/response, user properties, payload format indicator, content type and message
/// expiry pass from publisher to subscriber.
#[tokio::test]
async fn mqtt5_publish_properties_pass_through() {
    let broker = TestBroker::start().await;
    let mut peer = Peer::connect(&broker, "props", true).await;
    peer.subscribe(filter("paho/props", QoS::AtLeastOnce)).await;
    let properties = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        response_topic: Some("paho/reply".into()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    peer.client
        .publish_with_properties("paho/props", QoS::AtLeastOnce, false, "hi", properties)
        .await
        .unwrap();
    let got = peer.next().await.properties.unwrap();
    assert_eq!(got.payload_format_indicator, Some(1));
    assert!(got.message_expiry_interval.is_some_and(|left| left <= 3600));
    assert_eq!(got.response_topic.as_deref(), Some("paho/reply"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(
        got.user_properties,
        vec![("k".into(), "v".into()), ("k".into(), "w".into())]
    );
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
}

/// A message whose expiry passed while the subscriber was away is not delivered.
#[tokio::test]
async fn expired_messages_are_not_delivered() {
    let broker = TestBroker::start().await;
    let mut away = Peer::connect(&broker, "away", false).await;
    away.subscribe(filter("paho/expiry", QoS::AtLeastOnce))
        .await;
    away.leave(&broker).await;
    let mut sender = Peer::connect(&broker, "sender", true).await;
    let properties = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    sender
        .client
        .publish_with_properties("paho/expiry", QoS::AtLeastOnce, false, "gone", properties)
        .await
        .unwrap();
    sender
        .publish("paho/expiry", QoS::AtLeastOnce, false, b"kept")
        .await;
    // Time, not synchronisation: the first message's expiry interval (1 s) passes.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut back = Peer::connect(&broker, "away", false).await;
    assert_eq!(back.next().await.payload.as_ref(), b"kept");
    assert!(back.quiet().await);
}
