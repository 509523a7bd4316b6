//! Sessions across nodes: a client id that connects through another node takes its
//! connection and its persistent session over from the node that had them.

use std::time::Duration;

use super::{node, services, two_nodes};
use crate::common::*;

/// Session moves of `outcome` on `broker`.
fn moves(broker: &TestBroker, outcome: &str) -> f64 {
    metric(
        broker,
        &format!("mqtt_im_session_moves_total{{outcome=\"{outcome}\"}}"),
    )
}

/// A persistent 3.1.1 session of `client_id` on `addr`.
async fn persistent(addr: std::net::SocketAddr, client_id: &str) -> Client {
    Client::v4_session(addr, client_id, "bob", 30, false).await
}

on_each_redis! {
    /// The fourth row: a persistent session subscribed on node 1 reconnects through
    /// node 2 while 20 QoS 1 messages wait: session present, 20/20 in order, and from then on
    /// it is served on node 2 (publishes on either node reach it there, node 1 no longer
    /// holds its route).
    async fn a_persistent_session_resumes_on_another_node(services: Services) {
        let (n1, n2) = two_nodes(&services).await;
        let mut worker = persistent(n1.addr, "worker-7").await;
        assert_eq!(worker.subscribe("jobs/#", 1).await, vec![1]);
        worker.disconnect().await;
        let mut producer = Client::v4(n1.addr, "producer", "alice", 30).await;
        for n in 0..20u8 {
            assert_eq!(producer.publish_acked("jobs/build", vec![n]).await, 0);
        }

        let mut worker = persistent(n2.addr, "worker-7").await;
        assert!(worker.session_present);
        for n in 0..20u8 {
            assert_eq!(worker.next_on("jobs/build").await, vec![n]);
        }
        assert_eq!((moves(&n2, "resumed"), moves(&n1, "given")), (1.0, 1.0));
        // Node 1 forgets the session's route once it handed the session over.
        wait_for(|| metric(&n1, "mqtt_im_cluster_routes_local") == 0.0).await;
        wait_for(|| metric(&n1, "mqtt_im_cluster_routes_remote") == 1.0).await;
        assert_eq!(producer.publish_acked("jobs/test", b"n1".to_vec()).await, 0);
        let mut local = Client::v4(n2.addr, "producer-2", "carol", 30).await;
        assert_eq!(local.publish_acked("jobs/test", b"n2".to_vec()).await, 0);
        assert_eq!(worker.next_on("jobs/test").await, b"n1".to_vec());
        assert_eq!(worker.next_on("jobs/test").await, b"n2".to_vec());
        assert!(worker.quiet_for(Duration::from_millis(300)).await.is_none());
    }
}

on_each_redis! {
    /// A client id connected to node 1 connects through node 2: node 1 ends its connection
    /// (MQTT 5: DISCONNECT 0x8E, session taken over), as within one node; with clean session
    /// off the subscriptions come along, and messages published during the move arrive.
    async fn a_live_connection_is_taken_over_across_nodes(services: Services) {
        let (n1, n2) = two_nodes(&services).await;
        let options = |port: u16| {
            let mut options = rumqttc::v5::MqttOptions::new("gauge-3", "127.0.0.1", port);
            options.set_credentials("carol", "pw");
            options.set_clean_start(false);
            options
        };
        let mut old = Client::v5_with(options(n1.addr.port())).await;
        assert_eq!(old.subscribe("gauges/#", 1).await, vec![1]);
        let producer = Client::v4(n1.addr, "producer", "alice", 30).await;
        for n in 0..10u8 {
            producer.publish("gauges/p", 1, vec![n]).await;
        }
        for n in 0..10u8 {
            assert_eq!(old.next_on("gauges/p").await, vec![n]);
        }

        let mut new = Client::v5_with(options(n2.addr.port())).await;
        assert!(new.session_present);
        assert_eq!(old.disconnect_reason().await, 0x8E);
        for n in 10..30u8 {
            producer.publish("gauges/p", 1, vec![n]).await;
        }
        // Every message after the move arrives (one published while it moved may come twice).
        let mut got = Vec::new();
        while got.last() != Some(&vec![29u8]) {
            got.push(new.next_on("gauges/p").await);
        }
        got.dedup();
        assert_eq!(got, (10..30u8).map(|n| vec![n]).collect::<Vec<_>>());
    }
}

/// A clean connect through another node drops the session the old node kept: back on the
/// old node, nothing is resumed.
#[tokio::test]
async fn a_clean_connect_elsewhere_drops_the_session() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let (n1, n2) = two_nodes(&services).await;
    let mut worker = persistent(n1.addr, "worker-9").await;
    worker.subscribe("jobs/#", 1).await;
    worker.disconnect().await;
    let clean = Client::v4(n2.addr, "worker-9", "bob", 30).await;
    assert!(!clean.session_present);
    wait_for(|| moves(&n1, "dropped") == 1.0).await;
    clean.disconnect().await;
    let mut producer = Client::v4(n1.addr, "producer", "alice", 30).await;
    producer.publish_acked("jobs/x", b"x".to_vec()).await;
    let mut back = persistent(n1.addr, "worker-9").await;
    assert!(!back.session_present);
    assert!(back.quiet_for(Duration::from_millis(300)).await.is_none());
}

/// A session moves node 1 → node 2 → node 3 and back to node 1, with messages waiting
/// each time; none is lost or left behind.
#[tokio::test]
async fn a_session_moves_around_three_nodes() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let (n1, n2) = two_nodes(&services).await;
    let n3 = TestBroker::start_with_on(services.backend.clone(), node(&services, "n3")).await;
    super::following(&n3).await;
    let mut producer = Client::v4(n3.addr, "producer", "alice", 30).await;
    let mut worker = persistent(n1.addr, "roamer").await;
    worker.subscribe("work/+", 1).await;
    // The producer's node learns of the route (asynchronously, as every node does).
    wait_for(|| metric(&n3, "mqtt_im_cluster_routes_remote") == 1.0).await;
    let mut next = 0u8;
    for addr in [n2.addr, n3.addr, n1.addr] {
        worker.disconnect().await;
        for _ in 0..5 {
            producer.publish_acked("work/item", vec![next]).await;
            next += 1;
        }
        worker = persistent(addr, "roamer").await;
        assert!(worker.session_present);
        for n in next - 5..next {
            assert_eq!(worker.next_on("work/item").await, vec![n]);
        }
    }
    assert!(worker.quiet_for(Duration::from_millis(300)).await.is_none());
}

/// A persistent session on a node that is killed is gone with it: the client connecting
/// through another node starts a new session at once, without waiting for the dead node's
/// answer, and is served there.
#[tokio::test]
async fn a_session_on_a_killed_node_is_lost_and_the_client_starts_anew_elsewhere() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let n2 = TestBroker::start_with_on(services.backend.clone(), node(&services, "n2")).await;
    let (mut doomed, addr, _dir) = super::spawn_node(&services, "doomed");
    let mut worker = persistent(addr, "worker-11").await;
    assert_eq!(worker.subscribe("jobs/#", 1).await, vec![1]);
    doomed.kill().unwrap();
    doomed.wait().unwrap();

    let mut worker = persistent(n2.addr, "worker-11").await;
    assert!(!worker.session_present);
    assert_eq!((moves(&n2, "lost"), moves(&n2, "unanswered")), (1.0, 0.0));
    assert_eq!(worker.subscribe("jobs/#", 1).await, vec![1]);
    let mut producer = Client::v4(n2.addr, "producer", "alice", 30).await;
    assert_eq!(producer.publish_acked("jobs/a", b"a".to_vec()).await, 0);
    assert_eq!(worker.next_on("jobs/a").await, b"a".to_vec());
}
