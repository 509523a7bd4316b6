//! Any client id MQTT allows connects and uses plain topics; the IM uid is derived from the
//! identity separately, and an identity that is no IM uid keeps its client out of IM topics
//! (never into someone else's).
#![allow(clippy::unwrap_used)]

use crate::common::*;
use mqtt_im::config::UidSource;

/// Client ids real devices and test suites use, and hostile ones.
fn odd_ids() -> Vec<String> {
    vec![
        "clean retained".into(),
        "urn:dev:7b2f".into(),
        "fleet/truck-9".into(),
        "+".into(),
        "#".into(),
        "$SYS".into(),
        "a%2Fb".into(),
        "bob/#".into(),
        "ünïcødé 💬".into(),
        "x".repeat(9_000),
    ]
}

/// Each id connects (3.1.1 and 5), and subscribes and publishes on a plain topic.
#[tokio::test]
async fn any_client_id_connects_and_uses_plain_topics() {
    let broker = TestBroker::start().await;
    for (i, id) in odd_ids().iter().enumerate() {
        let topic = format!("plain/{i}");
        let mut v4 = Client::v4(broker.addr, id, "alice", 30).await;
        assert_eq!(v4.subscribe(&topic, 1).await, vec![1], "id #{i}");
        v4.publish(&topic, 1, b"v4".to_vec()).await;
        assert_eq!(v4.next_on(&topic).await, b"v4".to_vec(), "id #{i}");
        v4.disconnect().await;
        let mut v5 = Client::v5(broker.addr, id, "alice").await;
        assert_eq!(v5.subscribe(&topic, 1).await, vec![1], "id #{i}");
        assert_eq!(v5.publish_acked(&topic, b"v5".to_vec()).await, 0, "id #{i}");
        assert_eq!(v5.next_on(&topic).await, b"v5".to_vec(), "id #{i}");
        v5.disconnect().await;
    }
}

/// A persistent session under an id rumqttd itself would refuse (`/`, `+`, `#`) keeps its
/// queued messages, and ids that differ only in those characters never share a session.
#[tokio::test]
async fn persistent_sessions_under_odd_ids_stay_apart() {
    let broker = TestBroker::start().await;
    for id in ["my phone/1+#", "my phone%2F1%2B%23"] {
        let mut device = Client::v4_session(broker.addr, id, "bob", 30, false).await;
        assert_eq!(
            device.subscribe(&format!("queue/{}", id.len()), 1).await,
            vec![1]
        );
        device.disconnect().await;
    }
    let mut sender = Client::v5(broker.addr, "sender", "alice").await;
    let short = "my phone/1+#".len();
    assert_eq!(
        sender
            .publish_acked(&format!("queue/{short}"), b"kept".to_vec())
            .await,
        0
    );
    let mut device = Client::v4_session(broker.addr, "my phone/1+#", "bob", 30, false).await;
    assert_eq!(
        device.next_on(&format!("queue/{short}")).await,
        b"kept".to_vec()
    );
    let mut other = Client::v4_session(broker.addr, "my phone%2F1%2B%23", "bob", 30, false).await;
    assert!(
        other
            .quiet_for(std::time::Duration::from_millis(300))
            .await
            .is_none(),
        "a different id got the other's session"
    );
}

/// An empty client id: assigned (and told to MQTT 5 clients) with a clean session, refused
/// (identifier rejected) with a persistent one; the longest id MQTT can carry connects.
#[tokio::test]
async fn empty_and_longest_client_ids() {
    let broker = TestBroker::start().await;
    let login = Some(("alice", "pw"));
    let v5 = raw_connect(broker.addr, true, "", true, login).await;
    assert_eq!(v5.code, 0);
    assert!(
        v5.assigned.is_some_and(|id| !id.is_empty()),
        "no assigned id"
    );
    assert_eq!(
        raw_connect(broker.addr, false, "", true, login).await.code,
        0
    );
    assert_eq!(
        raw_connect(broker.addr, false, "", false, login).await.code,
        2
    );
    assert_eq!(
        raw_connect(broker.addr, true, "", false, login).await.code,
        0x85
    );
    let longest = "é".repeat(32_767) + "x";
    assert_eq!(longest.len(), 65_535);
    assert_eq!(
        raw_connect(broker.addr, false, &longest, true, login)
            .await
            .code,
        0
    );
    assert_eq!(
        raw_connect(broker.addr, true, &longest, true, login)
            .await
            .code,
        0
    );
}

/// With `uid_from = "client_id"`, a client id that is no IM uid connects and uses plain
/// topics; IM is refused with a reason, and hostile ids never reach someone else's inbox.
#[tokio::test]
async fn identities_that_are_no_im_uid_stay_out_of_im() {
    let broker = TestBroker::start_with(|c| c.auth.uid_from = UidSource::ClientId).await;
    let mut bob = Client::v5(broker.addr, "bob", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let _ = bob.digest("bob").await;
    for id in ["bob/#", "bob/+", "+", "#", "im/u/bob", "bob ", "a:b"] {
        let mut client = Client::v5(broker.addr, id, "alice").await;
        let own = format!("im/u/{id}");
        for filter in ["im/u/bob/#", "im/u/+/#", "im/#", &own] {
            assert_eq!(
                client.subscribe(filter, 1).await,
                vec![0x87],
                "{id} on {filter}"
            );
        }
        let (code, reason) = client
            .publish_answered("im/u/bob", chat(id, "bob", "hi", false))
            .await;
        assert_eq!(code, 0x87, "{id}");
        assert!(reason.unwrap().contains("not an IM user id"), "{id}");
        assert_eq!(client.subscribe("plain/t", 1).await, vec![1], "{id}");
        assert_eq!(
            client.publish_acked("plain/t", b"ok".to_vec()).await,
            0,
            "{id}"
        );
        assert_eq!(client.next_on("plain/t").await, b"ok".to_vec(), "{id}");
        client.disconnect().await;
    }
    assert!(bob
        .quiet_for(std::time::Duration::from_millis(200))
        .await
        .is_none());
    // A 3.1.1 client without an IM uid gets SUBACK failure for IM filters.
    let mut v4 = Client::v4(broker.addr, "fleet/truck-9", "alice", 30).await;
    assert_eq!(v4.subscribe("im/u/alice/#", 1).await, vec![0x80]);
}

/// With `uid_from = "username"`, a username that is no IM uid connects without IM; a long
/// odd client id beside a valid username still gets IM.
#[tokio::test]
async fn the_uid_comes_from_the_username_whatever_the_client_id() {
    let broker = TestBroker::start_with(|c| {
        c.auth.users.insert("dev ice/1".into(), "pw".into());
    })
    .await;
    let mut odd = Client::v5(broker.addr, "d1", "dev ice/1").await;
    assert_eq!(odd.subscribe("im/u/dev ice/1/#", 1).await, vec![0x87]);
    assert_eq!(odd.subscribe("plain/#", 1).await, vec![1]);
    let id = format!("carol's phone/{}", "z".repeat(4000));
    let mut carol = Client::v5(broker.addr, &id, "carol").await;
    assert_eq!(carol.subscribe("im/u/carol/#", 1).await, vec![1]);
    let _ = carol.digest("carol").await;
    let mut alice = Client::v5(broker.addr, "alice: laptop", "alice").await;
    assert_eq!(
        alice
            .publish_acked("im/u/carol", chat("m1", "carol", "hi", false))
            .await,
        0
    );
    let message = carol.next_on("im/u/carol").await;
    assert!(!message.is_empty());
}
