//! What only a Redis Cluster does: its shards drop subscriber connections independently.

use super::{cluster_services, two_nodes, REDIS_CLUSTER};
use crate::common::*;

/// Ends every pub/sub connection on each shard of the test cluster (its seeds are all of
/// its masters).
async fn cut_subscribers(seeds: &str) {
    for url in seeds.split(',') {
        let client = redis::Client::open(url).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let cut: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut connection)
            .await
            .unwrap();
        eprintln!("{url}: {cut} subscriber connections cut");
    }
}

/// A node whose sharded subscriptions are cut subscribes again by itself, follows the
/// cluster again (a full reload of routes and retained messages) and catches up with what it
/// missed meanwhile: a route announced while it was cut is known, and publishes flow again.
#[tokio::test]
async fn cut_subscriptions_are_made_again_and_what_was_missed_is_reloaded() {
    let Some(services) = cluster_services() else {
        eprintln!("skipped: PostgreSQL or a Redis Cluster not configured");
        return;
    };
    let _alone = REDIS_CLUSTER.write().await;
    let (n1, n2) = two_nodes(&services).await;
    let mut first = Client::v5(n2.addr, "gauge-a", "bob").await;
    first.subscribe("plant/a/#", 1).await;
    wait_for(|| metric(&n1, "mqtt_im_cluster_routes_remote") == 1.0).await;
    let loads = (rounds(&n1, "retained_loads"), rounds(&n2, "retained_loads"));

    cut_subscribers(&services.redis).await;
    // Announced while node 1 may not be listening: its reload after resubscribing has it.
    let mut second = Client::v5(n2.addr, "gauge-b", "bob").await;
    second.subscribe("plant/b/#", 1).await;
    wait_for(|| rounds(&n1, "retained_loads") > loads.0).await;
    wait_for(|| rounds(&n2, "retained_loads") > loads.1).await;
    wait_for(|| metric(&n1, "mqtt_im_cluster_routes_remote") == 2.0).await;

    let mut device = Client::v4(n1.addr, "device-9", "alice", 30).await;
    assert_eq!(device.publish_acked("plant/a/t", b"a".to_vec()).await, 0);
    assert_eq!(device.publish_acked("plant/b/t", b"b".to_vec()).await, 0);
    assert_eq!(first.next_on("plant/a/t").await, b"a".to_vec());
    assert_eq!(second.next_on("plant/b/t").await, b"b".to_vec());
}
