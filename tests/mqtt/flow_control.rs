//! Flow control towards MQTT 5 clients: the hook layer's own publishes (digests, replies)
//! respect the client's Receive Maximum, waiting in order for acknowledgements.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::common::*;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

/// A client that acknowledges publishes only when the test says so; its publishes arrive
/// on a channel.
async fn manual_client(
    broker: &TestBroker,
    uid: &str,
    receive_max: u16,
) -> (AsyncClient, mpsc::UnboundedReceiver<Publish>) {
    let addr = broker.addr;
    let mut options = MqttOptions::new(format!("{uid}-phone"), addr.ip().to_string(), addr.port());
    options.set_credentials(uid, "pw");
    options.set_receive_maximum(Some(receive_max));
    options.set_manual_acks(true);
    let (client, mut events) = AsyncClient::new(options, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(publish)) = event {
                if tx.send(publish).is_err() {
                    return;
                }
            }
        }
    });
    (client, rx)
}

async fn next_publish(publishes: &mut mpsc::UnboundedReceiver<Publish>) -> Publish {
    tokio::time::timeout(WAIT, publishes.recv())
        .await
        .expect("no publish came")
        .expect("connection ended")
}

/// With Receive Maximum 1, the digest holds the only place: replies wait, and each
/// acknowledgement lets exactly one more go, in the order the requests were sent.
#[tokio::test]
async fn replies_wait_for_the_clients_receive_maximum() {
    let broker = TestBroker::start().await;
    let (client, mut publishes) = manual_client(&broker, "alice", 1).await;
    client
        .subscribe("im/u/alice/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let digest = next_publish(&mut publishes).await;
    assert_eq!(&digest.topic[..], b"im/u/alice/digest");
    for id in ["first", "second"] {
        let pull = pull(id, "u/bob", 10, None);
        client
            .publish("im/u/alice/req", QoS::AtLeastOnce, false, pull)
            .await
            .unwrap();
    }
    let early = tokio::time::timeout(Duration::from_millis(500), publishes.recv()).await;
    assert!(early.is_err(), "a reply came past the Receive Maximum");
    let mut acked = digest;
    for expected in ["first", "second"] {
        client.ack(&acked).await.unwrap();
        let reply = next_publish(&mut publishes).await;
        assert_eq!(&reply.topic[..], b"im/u/alice/resp");
        let response =
            <mqtt_im::wire::pb::Response as prost::Message>::decode(&reply.payload[..]).unwrap();
        assert_eq!(response.request_id, expected);
        let more = tokio::time::timeout(Duration::from_millis(300), publishes.recv()).await;
        assert!(
            more.is_err(),
            "two publishes in flight with Receive Maximum 1"
        );
        acked = reply;
    }
    client.ack(&acked).await.unwrap();
}
