//! Retained messages across nodes: set or cleared on any node, they are what a new
//! subscriber on any node gets, also on a node started afterwards or one that lost Redis
//! meanwhile.

use std::time::Duration;

use super::{following, node, services, two_nodes};
use crate::common::*;

/// How long a subscriber listens for a retained message that must not come: rumqttd sends
/// a filter's retained messages together, right after the SUBACK.
const QUIET: Duration = Duration::from_millis(300);

/// Retained publishes of other nodes `broker`'s rumqttd has taken.
fn injected(broker: &TestBroker) -> f64 {
    metric(broker, "mqtt_im_forwards_injected_total")
}

/// The next publish's topic, payload and retain flag.
async fn next_retained(client: &mut Client) -> (String, Vec<u8>, bool) {
    match client.next_publish().await {
        Seen::Publish {
            topic,
            payload,
            retain,
            ..
        } => (topic, payload, retain),
        _ => unreachable!("next_publish returns publishes"),
    }
}

on_each_redis! {
    /// The second row, and its clearing: `plant/config` retained through node 1 is what
    /// a new subscriber on node 2 gets; cleared through node 2, a new subscriber on node 1 gets
    /// nothing; a node started later loads what is retained from the store.
    async fn a_retained_message_is_the_same_on_every_node(services: Services) {
        let (n1, n2) = two_nodes(&services).await;
        let mut setter = Client::v4(n1.addr, "configurator", "alice", 30).await;
        assert_eq!(setter.retain_acked("plant/config", b"v1".to_vec()).await, 0);
        assert_eq!(setter.retain_acked("plant/mode", b"auto".to_vec()).await, 0);
        wait_for(|| injected(&n2) == 2.0).await;

        let mut dashboard = Client::v5(n2.addr, "dashboard", "bob").await;
        dashboard.subscribe("plant/#", 1).await;
        let mut got = vec![
            next_retained(&mut dashboard).await,
            next_retained(&mut dashboard).await,
        ];
        got.sort();
        assert_eq!(
            got,
            vec![
                ("plant/config".to_owned(), b"v1".to_vec(), true),
                ("plant/mode".to_owned(), b"auto".to_vec(), true),
            ]
        );

        // Cleared through node 2 (an empty retained payload), replaced through node 1.
        let mut clearer = Client::v5(n2.addr, "clearer", "carol").await;
        assert_eq!(clearer.retain_acked("plant/mode", Vec::new()).await, 0);
        assert_eq!(setter.retain_acked("plant/config", b"v2".to_vec()).await, 0);
        wait_for(|| injected(&n1) == 1.0 && injected(&n2) == 3.0).await;
        let mut late = Client::v4(n1.addr, "late-dashboard", "carol", 30).await;
        late.subscribe("plant/#", 1).await;
        assert_eq!(
            next_retained(&mut late).await,
            ("plant/config".to_owned(), b"v2".to_vec(), true)
        );
        assert!(
            late.quiet_for(QUIET).await.is_none(),
            "plant/mode was cleared"
        );

        // A node that starts now has them from the store before it serves anyone.
        let n3 = TestBroker::start_with_on(services.backend.clone(), node(&services, "n3")).await;
        let mut newcomer = Client::v4(n3.addr, "newcomer", "alice", 30).await;
        newcomer.subscribe("plant/+", 1).await;
        assert_eq!(
            next_retained(&mut newcomer).await,
            ("plant/config".to_owned(), b"v2".to_vec(), true)
        );
        assert!(newcomer.quiet_for(QUIET).await.is_none());
    }
}

/// A node cut from Redis misses the broadcasts; when it follows the cluster's channels again
/// it loads the retained messages from the store, applying a clearing it missed too.
#[tokio::test]
async fn a_node_that_lost_redis_catches_up_with_retained_messages() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let Some(proxy) = redis_behind_proxy().await else {
        return;
    };
    let n1 = TestBroker::start_with_on(services.backend.clone(), node(&services, "n1")).await;
    let cut_off = format!("redis://{}/", proxy.addr);
    let n2 = TestBroker::start_with_on(services.backend.clone(), |config| {
        node(&services, "n2")(config);
        config.cluster.redis_url = cut_off;
        config.cluster.redis_timeout = mqtt_im::config::Period::millis(300);
    })
    .await;
    following(&n1).await;
    following(&n2).await;
    let mut setter = Client::v4(n1.addr, "configurator", "alice", 30).await;
    assert_eq!(setter.retain_acked("door/state", b"open".to_vec()).await, 0);
    wait_for(|| injected(&n2) == 1.0).await;
    let mut early = Client::v4(n2.addr, "early", "carol", 30).await;
    early.subscribe("door/#", 1).await;
    assert_eq!(
        next_retained(&mut early).await,
        ("door/state".to_owned(), b"open".to_vec(), true)
    );

    proxy.down();
    assert_eq!(setter.retain_acked("door/state", Vec::new()).await, 0);
    assert_eq!(setter.retain_acked("door/lock", b"on".to_vec()).await, 0);
    // Stored, though node 2 heard nothing of it.
    eventually(|| async { n1.store.retained().await.unwrap().len() == 1 }).await;
    let loads = rounds(&n2, "retained_loads");
    proxy.up();
    wait_for(|| rounds(&n2, "retained_loads") > loads).await;

    let mut watcher = Client::v5(n2.addr, "watcher", "bob").await;
    watcher.subscribe("door/#", 1).await;
    assert_eq!(
        next_retained(&mut watcher).await,
        ("door/lock".to_owned(), b"on".to_vec(), true)
    );
    assert!(
        watcher.quiet_for(QUIET).await.is_none(),
        "door/state was cleared"
    );
    // A subscriber already there gets what changed, late, as on one broker it would have
    // on time; nothing it had is sent again.
    let mut caught_up = vec![
        next_retained(&mut early).await,
        next_retained(&mut early).await,
    ];
    caught_up.sort();
    assert_eq!(
        caught_up,
        vec![
            ("door/lock".to_owned(), b"on".to_vec(), false),
            ("door/state".to_owned(), Vec::new(), false),
        ]
    );
    assert!(early.quiet_for(QUIET).await.is_none());
}
