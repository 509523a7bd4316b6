//! Offline push from the app's side: the SDK registers this device's pusher, and tells the
//! app at the next connect when the server dropped it (here: the gateway rejected the
//! pushkey), so it can register again.

use std::sync::Arc;
use std::time::Duration;

use mqtt_im_client::{pb, Event, MemoryStore};

use crate::common::*;
use crate::sdk::*;

#[tokio::test]
async fn a_rejected_pusher_is_reported_at_the_next_connect_and_set_again() {
    let mut gateway = Gateway::start();
    let url = gateway.url();
    let broker = TestBroker::start_with(move |config| {
        config.push.allowed_urls = vec![url];
        config.push.delay = mqtt_im::config::Period::millis(0);
    })
    .await;
    let store = Arc::new(MemoryStore::default());
    let mut alice = app_on(broker.addr, "alice", "alice-phone", store.clone()).await;
    alice.wait_online().await;
    let pusher = pb::PusherSet {
        app_id: "com.example.chat".into(),
        pushkey: "alice-token".into(),
        url: gateway.url(),
        ..pb::PusherSet::default()
    };
    let stored = alice.client.set_pusher(pusher.clone()).await.unwrap();
    assert_eq!(
        (stored.client_id.as_str(), stored.format.as_str()),
        ("alice-phone", "event_id_only")
    );
    assert_eq!(alice.client.pushers().await.unwrap().len(), 1);
    alice.client.close().await.unwrap();
    drop(alice);

    gateway.reject(&["alice-token"]).await;
    let bob = online(broker.addr, "bob", "bob-phone").await;
    bob.client
        .send_text(&with("alice"), "are you there?")
        .await
        .unwrap();
    let pushed = gateway.next().await;
    assert_eq!(pushed["counts"]["unread"], 1);

    let mut alice = app_on(broker.addr, "alice", "alice-phone", store).await;
    let gone = alice
        .wait_for("pushers gone", |e| match e {
            Event::PushersGone(gone) => Some(gone.clone()),
            _ => None,
        })
        .await;
    let gone: Vec<(&str, &str)> = gone
        .iter()
        .map(|g| (g.pushkey.as_str(), g.reason.as_str()))
        .collect();
    assert_eq!(gone, [("alice-token", "rejected")]);
    assert!(alice.client.pushers().await.unwrap().is_empty());
    alice.client.set_pusher(pusher).await.unwrap();
    assert_eq!(alice.client.pushers().await.unwrap().len(), 1);
    alice
        .client
        .remove_pusher("com.example.chat", "alice-token")
        .await
        .unwrap();
    assert!(alice.client.pushers().await.unwrap().is_empty());
    gateway.none_within(Duration::from_millis(300)).await;
}
