//! Shared subscriptions across nodes: members of `$share/{group}/{filter}` on different
//! nodes form one group; each message goes to exactly one member, spread over them.

use std::time::Duration;

use super::{services, two_nodes};
use crate::common::*;

/// How long a member listens for more once the messages stopped coming.
const QUIET: Duration = Duration::from_millis(300);

/// Every publish `client` gets until it is quiet: (topic, payload, QoS).
async fn drain(client: &mut Client) -> Vec<(String, Vec<u8>, u8)> {
    let mut got = Vec::new();
    while let Some(seen) = client.quiet_for(QUIET).await {
        if let Seen::Publish {
            topic,
            payload,
            qos,
            ..
        } = seen
        {
            got.push((topic, payload, qos));
        }
    }
    got
}

fn payloads(got: &[(String, Vec<u8>, u8)]) -> Vec<Vec<u8>> {
    got.iter().map(|(_, payload, _)| payload.clone()).collect()
}

on_each_redis! {
    /// The third row: `$share/workers/jobs/#` with one member on each node, 40 jobs
    /// published on node 1: each job reaches exactly one member, both members get their share,
    /// and a plain subscriber of `jobs/#` still gets all 40.
    async fn a_group_spans_nodes_and_each_job_goes_to_one_member(services: Services) {
        let (n1, n2) = two_nodes(&services).await;
        let mut near = Client::v4(n1.addr, "worker-near", "alice", 30).await;
        assert_eq!(near.subscribe("$share/workers/jobs/#", 1).await, vec![1]);
        let mut far = Client::v5(n2.addr, "worker-far", "bob").await;
        assert_eq!(far.subscribe("$share/workers/jobs/#", 1).await, vec![1]);
        let mut auditor = Client::v5(n2.addr, "auditor", "carol").await;
        auditor.subscribe("jobs/#", 1).await;
        wait_for(|| metric(&n1, "mqtt_im_cluster_routes_remote") == 2.0).await;

        let mut producer = Client::v4(n1.addr, "producer", "carol", 30).await;
        for n in 0..40u8 {
            assert_eq!(
                producer.publish_acked(&format!("jobs/{n}"), vec![n]).await,
                0
            );
        }
        let (near_got, far_got) = (drain(&mut near).await, drain(&mut far).await);
        let mut all: Vec<Vec<u8>> = payloads(&near_got);
        all.extend(payloads(&far_got));
        all.sort();
        assert_eq!(all, (0..40u8).map(|n| vec![n]).collect::<Vec<_>>());
        // Taken in turn: half each.
        assert_eq!((near_got.len(), far_got.len()), (20, 20));
        // Each member's share comes in the publisher's order.
        for got in [&near_got, &far_got] {
            let order = payloads(got);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(order, sorted);
        }
        assert_eq!(payloads(&drain(&mut auditor).await).len(), 40);
    }
}

/// Two members on node 2 and one on node 1, jobs published on node 2 and on node 1, QoS 2
/// kept where granted; when members leave (UNSUBSCRIBE, disconnect) the rest get everything.
#[tokio::test]
async fn members_come_and_go_and_nothing_is_doubled() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let (n1, n2) = two_nodes(&services).await;
    let mut a = Client::v5(n2.addr, "member-a", "alice").await;
    assert_eq!(a.subscribe("$share/pool/tasks/+", 2).await, vec![2]);
    let mut b = Client::v4(n2.addr, "member-b", "bob", 30).await;
    assert_eq!(b.subscribe("$share/pool/tasks/+", 1).await, vec![1]);
    let mut c = Client::v5(n1.addr, "member-c", "carol").await;
    assert_eq!(c.subscribe("$share/pool/tasks/+", 2).await, vec![2]);
    wait_for(|| metric(&n1, "mqtt_im_cluster_routes_remote") == 1.0).await;
    wait_for(|| metric(&n2, "mqtt_im_cluster_routes_remote") == 1.0).await;

    let on_n2 = Client::v5(n2.addr, "producer-2", "alice").await;
    let on_n1 = Client::v5(n1.addr, "producer-1", "bob").await;
    for n in 0..30u8 {
        on_n2.publish("tasks/x", 2, vec![n]).await;
        on_n1.publish("tasks/y", 2, vec![100 + n]).await;
    }
    let (got_a, got_b, got_c) = (
        drain(&mut a).await,
        drain(&mut b).await,
        drain(&mut c).await,
    );
    let mut all: Vec<Vec<u8>> = [&got_a, &got_b, &got_c]
        .iter()
        .flat_map(|got| payloads(got))
        .collect();
    all.sort();
    let mut expected: Vec<Vec<u8>> = (0..30u8).map(|n| vec![n]).collect();
    expected.extend((0..30u8).map(|n| vec![100 + n]));
    assert_eq!(all, expected);
    assert!(!got_a.is_empty() && !got_b.is_empty() && !got_c.is_empty());
    assert!(got_a.iter().chain(&got_c).all(|(_, _, qos)| *qos == 2));
    assert!(got_b.iter().all(|(_, _, qos)| *qos == 1));

    // B unsubscribes, C disconnects: A gets everything from both nodes.
    // 3.1.1: an UNSUBACK without codes.
    assert!(b.unsubscribe("$share/pool/tasks/+").await.is_empty());
    c.disconnect().await;
    wait_for(|| metric(&n2, "mqtt_im_cluster_routes_remote") == 0.0).await;
    for n in 0..10u8 {
        on_n2.publish("tasks/x", 1, vec![n]).await;
        on_n1.publish("tasks/y", 1, vec![100 + n]).await;
    }
    let got_a = drain(&mut a).await;
    assert_eq!(got_a.len(), 20);
    assert!(drain(&mut b).await.is_empty());
}

/// Malformed shared subscriptions are refused, and a shared subscription of IM topics is
/// not allowed (chat goes to its devices, never to a group of workers).
#[tokio::test]
async fn malformed_or_im_shared_subscriptions_are_refused() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let (n1, _n2) = two_nodes(&services).await;
    let mut client = Client::v5(n1.addr, "odd", "alice").await;
    for (filter, code) in [
        ("$share/", 0x8f),
        ("$share/g", 0x8f),
        ("$share/+/a", 0x8f),
        ("$share/g/im/u/alice/#", 0x87),
    ] {
        assert_eq!(client.subscribe(filter, 1).await, vec![code], "{filter}");
    }
    assert_eq!(client.subscribe("$share/g/ok/#", 1).await, vec![1]);
}
