//! ACL on IM topics and bad payloads: refused with a reason, nothing stored or delivered.

use crate::common::*;
use mqtt_im::wire::pb;

backend_tests! {
/// Subscribing outside one's own tree fails with 0x87 (MQTT 5) / 0x80 (3.1.1).
async fn foreign_subscriptions_are_refused(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut v5 = Client::v5(broker.addr, "alice-5", "alice").await;
    assert_eq!(v5.subscribe("im/u/bob/#", 1).await, vec![0x87]);
    assert_eq!(v5.subscribe("im/u/alice/req", 1).await, vec![0x87]);
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    assert_eq!(v4.subscribe("im/u/bob", 1).await, vec![0x80]);
    assert_eq!(v4.subscribe("im/#", 0).await, vec![0x80]);
    assert_eq!(v4.subscribe("im/u/alice/#", 2).await, vec![1]);
    assert!(broker.im.online_devices("bob").is_empty());
}
}

backend_tests! {
/// Publishing on someone else's req or on resp is refused: MQTT 5 reason code, 3.1.1
/// error frame on the publisher's resp.
async fn foreign_publishes_are_refused_with_a_reason(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut v5 = Client::v5(broker.addr, "alice-5", "alice").await;
    assert_eq!(
        v5.publish_acked("im/u/bob/req", pull("x", "u/alice", 1, None))
            .await,
        0x87
    );
    assert_eq!(v5.publish_acked("im/u/bob/resp", vec![1]).await, 0x87);
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    v4.subscribe("im/u/alice/#", 1).await;
    let _ = v4.digest("alice").await;
    v4.publish("im/u/bob/digest", 1, vec![1]).await;
    let error = v4.response("alice").await;
    assert_eq!(error.status, pb::Status::Error as i32);
    let error = error.error.unwrap();
    assert_eq!(error.code, pb::ErrorCode::NotAuthorized as i32);
    assert_eq!(error.topic, "im/u/bob/digest");
}
}

backend_tests! {
/// A malformed payload is answered with a clear error and nothing is stored.
async fn malformed_protobuf_is_answered_and_not_stored(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut v5 = Client::v5(broker.addr, "alice-5", "alice").await;
    assert_eq!(
        v5.publish_acked("im/u/bob", vec![0xff, 0xff, 0xff]).await,
        0x99
    );
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    v4.subscribe("im/u/alice/#", 1).await;
    let _ = v4.digest("alice").await;
    v4.publish("im/u/bob", 1, b"not protobuf at all".to_vec())
        .await;
    let error = v4.response("alice").await.error.unwrap();
    assert_eq!(error.code, pb::ErrorCode::BadRequest as i32);
    assert!(error.message.contains("Envelope"), "{}", error.message);
    let bad_request = v4.ask("alice", vec![0xff, 0x01]).await;
    assert_eq!(
        bad_request.error.unwrap().code,
        pb::ErrorCode::BadRequest as i32
    );
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    assert!(bob.digest("bob").await.sessions.is_empty());
}
}

backend_tests! {
/// Wrong credentials are refused at CONNECT.
async fn bad_password_is_refused(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut options = rumqttc::MqttOptions::new("x", "127.0.0.1", broker.addr.port());
    options.set_credentials("alice", "wrong");
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
    let refused = events.poll().await;
    assert!(refused.is_err(), "{refused:?}");
}
}

backend_tests! {
/// A request whose MQTT 5 Response Topic points outside the requester's tree is refused.
async fn response_topic_outside_own_tree_is_refused(backend: TestBackend) {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let broker = TestBroker::start_on(backend.clone()).await;
    let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
    let properties = PublishProperties {
        response_topic: Some("im/u/bob/resp".into()),
        ..Default::default()
    };
    let request = pull("x", "u/bob", 1, None);
    alice.publish_with("im/u/alice/req", request, properties).await;
    loop {
        if let Seen::PubAck { reason, .. } = alice.next().await {
            assert_eq!(reason, 0x87);
            break;
        }
    }
}
}
