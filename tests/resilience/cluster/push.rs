//! Offline push on two nodes: both read the one push queue, and each notification is sent by
//! exactly one of them.

use std::collections::HashSet;
use std::time::Duration;

use super::{following, node, Services};
use crate::common::*;
use mqtt_im::config::Period;

const SENDERS: usize = 6;

/// Node `id` of `services`, pushing through `gateway` at once (no delay).
async fn pushing_node(services: &Services, id: &str, gateway: &Gateway) -> TestBroker {
    let (cluster, url) = (node(services, id), gateway.url());
    let broker = TestBroker::start_with_on(services.backend.clone(), move |config| {
        cluster(config);
        config.push.allowed_urls = vec![url];
        config.push.delay = Period::millis(0);
        config.push.coalesce = Period::millis(2000);
        for n in 0..SENDERS {
            config.auth.users.insert(format!("s{n}"), "pw".into());
        }
    })
    .await;
    following(&broker).await;
    broker
}

on_each_redis! {
    /// Bob (offline, one pusher) gets messages from six users through both nodes: six
    /// notifications, one per conversation, each once.
    async fn each_notification_is_sent_by_one_node(services: Services) {
        let mut gateway = Gateway::start();
        let n1 = pushing_node(&services, "n1", &gateway).await;
        let n2 = pushing_node(&services, "n2", &gateway).await;
        register_and_leave(n1.addr, "bob", "bob-phone", &gateway, "").await;

        for n in 0..SENDERS {
            let node = if n % 2 == 0 { &n1 } else { &n2 };
            let uid = format!("s{n}");
            let mut sender = Client::v4(node.addr, &format!("{uid}-phone"), &uid, 30).await;
            let message = chat(&format!("m{n}"), "bob", "hello", false);
            assert_eq!(sender.publish_acked("im/u/bob", message).await, 0);
        }
        let mut rooms = HashSet::new();
        let mut ids = HashSet::new();
        for _ in 0..SENDERS {
            let pushed = gateway.next().await;
            assert!(rooms.insert(pushed["room_id"].as_str().unwrap().to_owned()), "{pushed}");
            assert!(ids.insert(pushed["event_id"].as_str().unwrap().to_owned()), "{pushed}");
        }
        gateway.none_within(Duration::from_millis(1500)).await;
        let sent = |broker: &TestBroker| metric(broker, "mqtt_im_pushes_total{outcome=\"sent\"}");
        assert_eq!(sent(&n1) + sent(&n2), SENDERS as f64);
    }
}
