//! The helper behind every "nothing arrives" check: silence counts only on a live
//! connection, so a check on a connection the server closed fails instead of passing.

use std::time::Duration;

use crate::common::*;

/// Silence on a live connection is silence; a packet that comes is reported.
#[tokio::test]
async fn quiet_on_a_live_connection_and_not_when_something_arrives() {
    let broker = TestBroker::start().await;
    let mut bob = Client::v4(broker.addr, "bob-1", "bob", 30).await;
    assert_eq!(bob.subscribe("plain/#", 1).await, vec![1]);
    assert!(bob.quiet_for(Duration::from_millis(100)).await.is_none());
    let alice = Client::v4(broker.addr, "alice-1", "alice", 30).await;
    alice.publish("plain/x", 1, b"x".to_vec()).await;
    let arrived = bob.quiet_for(Duration::from_secs(5)).await;
    assert!(
        matches!(&arrived, Some(Seen::Publish { topic, .. }) if topic == "plain/x"),
        "{arrived:?}"
    );
}

/// A connection taken over by another one with the same client id is dead: waiting on it
/// for silence fails the test.
#[tokio::test]
#[should_panic(expected = "connection ended")]
async fn quiet_on_a_dead_connection_fails() {
    let broker = TestBroker::start().await;
    let mut old = Client::v4(broker.addr, "bob-1", "bob", 30).await;
    let _new = Client::v4(broker.addr, "bob-1", "bob", 30).await;
    old.quiet_for(Duration::from_millis(300)).await;
}

/// A connection that went silent without closing (a partition) is dead too: the round
/// trip after the wait never comes back, and the test fails.
#[tokio::test]
#[should_panic(expected = "timed out waiting for a packet")]
async fn quiet_on_a_silently_dead_connection_fails() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr).await;
    let mut bob = Client::v4(proxy.addr, "bob-1", "bob", 30).await;
    proxy.stall();
    bob.quiet_for(Duration::from_millis(300)).await;
}
