//! Offline push end to end, on both backends, through a push gateway in a process of its own
//! (Matrix Push Gateway API over HTTP): one notification per offline user and conversation
//! per coalescing window with the computed badge, none while a device is online or after a
//! read within the delay (a counts-only update instead), retries through a gateway outage
//! with the same event id, rejected pushkeys removed, content only where allowed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use mqtt_im::config::Period;
use mqtt_im::wire::pb;

const DELAY: Duration = Duration::from_millis(300);
const COALESCE: Duration = Duration::from_millis(1500);

/// A broker pushing through `gateway` after [`DELAY`], coalescing over [`COALESCE`].
async fn broker_with(backend: TestBackend, gateway: &Gateway, content: bool) -> TestBroker {
    let url = gateway.url();
    TestBroker::start_with_on(backend, move |config| {
        config.push.allowed_urls = vec![url];
        config.push.allow_content = content;
        config.push.delay = Period(DELAY);
        config.push.coalesce = Period(COALESCE);
        config.push.timeout = Period::millis(2000);
    })
    .await
}

/// Bob's phone registers a pusher (with `format`), then goes away: bob has no device online.
async fn bob_registers_and_leaves(broker: &TestBroker, gateway: &Gateway, format: &str) {
    register_and_leave(broker.addr, "bob", "bob-phone", gateway, format).await;
}

async fn send(alice: &mut Client, text: &str) {
    let id = format!("m-{text}");
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat(&id, "bob", text, false))
            .await,
        0
    );
}

fn unread(notification: &serde_json::Value) -> u64 {
    notification["counts"]["unread"].as_u64().unwrap()
}

backend_tests! {
/// Three messages in a burst are one notification with the badge 3, content-free; the next
/// message waits for the coalescing window and gets an id of its own.
async fn an_offline_user_gets_one_push_per_window_with_the_badge(backend: TestBackend) {
    let mut gateway = Gateway::start();
    let broker = broker_with(backend, &gateway, false).await;
    bob_registers_and_leaves(&broker, &gateway, "").await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    for text in ["one", "two", "three"] {
        send(&mut alice, text).await;
    }
    let first = gateway.next().await;
    assert_eq!(unread(&first), 3, "{first}");
    assert_eq!(first["room_id"], "u/alice");
    assert_eq!(first["prio"], "high");
    assert!(first.get("sender").is_none() && first.get("content").is_none(), "content-free: {first}");
    let device = &first["devices"][0];
    assert_eq!((device["app_id"].as_str(), device["pushkey"].as_str()), (Some("com.example.chat"), Some("bob-token")));
    assert_eq!(device["data"], serde_json::json!({"tag": "x", "format": "event_id_only"}));
    let id = first["event_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with('$'));
    gateway.none_within(DELAY * 2).await;

    send(&mut alice, "four").await;
    let second = gateway.next().await;
    assert_eq!(unread(&second), 4);
    assert_ne!(second["event_id"].as_str(), Some(id.as_str()));
    gateway.none_within(DELAY * 2).await;
}

/// While a device of bob's is online nothing is pushed; a read within the delay cancels the
/// message's notification and sends the new badge instead.
async fn no_push_while_online_and_a_read_sends_only_the_badge(backend: TestBackend) {
    let mut gateway = Gateway::start();
    let broker = broker_with(backend, &gateway, false).await;
    bob_registers_and_leaves(&broker, &gateway, "").await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    let mut laptop = Client::v5(broker.addr, "bob-laptop", "bob").await;
    laptop.subscribe("im/u/bob/#", 1).await;
    let _ = laptop.digest("bob").await;
    send(&mut alice, "seen live").await;
    let _ = laptop.next_on("im/u/bob").await;
    gateway.none_within(DELAY * 3).await;
    laptop.disconnect().await;

    // Bob reads on his laptop, online again, within the delay: the message needs no
    // notification, but the phone (away) gets the new badge.
    send(&mut alice, "read at once").await;
    let mut reader = Client::v5(broker.addr, "bob-laptop", "bob").await;
    reader.subscribe("im/u/bob/#", 1).await;
    let _ = reader.digest("bob").await;
    let read = request("r", pb::request::Kind::MarkRead(pb::MarkRead {
        conversation: "u/alice".into(),
        seq: 2,
    }));
    assert_eq!(reader.ask("bob", read).await.status, pb::Status::Ok as i32);
    let badge = gateway.next().await;
    assert!(badge.get("event_id").is_none(), "counts only: {badge}");
    assert_eq!((unread(&badge), badge["prio"].as_str()), (0, Some("low")));
    gateway.none_within(DELAY * 3).await;
}

/// A gateway that fails gets the notification again later with the same event id, once;
/// a pushkey it rejects is removed from bob's pushers.
async fn a_gateway_outage_is_retried_with_the_same_id_and_rejected_keys_are_removed(backend: TestBackend) {
    let mut gateway = Gateway::start();
    let broker = broker_with(backend, &gateway, false).await;
    bob_registers_and_leaves(&broker, &gateway, "").await;
    gateway.fail_next(2).await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    send(&mut alice, "through an outage").await;
    let mut attempts = Vec::new();
    for _ in 0..3 {
        attempts.push(gateway.next_seen().await);
    }
    let handled: Vec<Handled> = attempts.iter().map(|(h, _)| *h).collect();
    assert_eq!(handled, [Handled::Refused, Handled::Refused, Handled::Taken]);
    let ids: Vec<&serde_json::Value> = attempts.iter().map(|(_, n)| &n["event_id"]).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one id across the retries: {ids:?}");
    assert_eq!(unread(&attempts[2].1), 1);
    let retried = metric(&broker, "mqtt_im_pushes_total{outcome=\"retried\"}");
    assert_eq!(retried, 2.0);
    gateway.none_within(COALESCE).await;

    gateway.reject(&["bob-token"]).await;
    send(&mut alice, "to a dead token").await;
    let _ = gateway.next().await;
    // The phone learns it at its next connect, and must register again.
    let mut phone = Client::v5(broker.addr, "bob-phone", "bob").await;
    phone.subscribe("im/u/bob/#", 1).await;
    let digest = phone.digest("bob").await;
    let gone: Vec<(&str, &str)> = digest
        .pushers_gone
        .iter()
        .map(|g| (g.pushkey.as_str(), g.reason.as_str()))
        .collect();
    assert_eq!(gone, [("bob-token", "rejected")]);
    let list = phone.ask("bob", request("l", pb::request::Kind::PusherList(pb::PusherList {}))).await;
    let Some(pb::response::Result::Pushers(list)) = list.result else {
        panic!("{list:?}");
    };
    assert!(list.pushers.is_empty(), "{list:?}");
}
}

backend_tests! {
/// Gateways down for good: owed notifications beyond `push.max_pending` are dropped, oldest
/// first, and counted; what is left is in the store's sizes (`/status`).
async fn a_queue_that_cannot_drain_keeps_the_newest_and_counts_the_rest(backend: TestBackend) {
    let gateway = Gateway::start();
    let url = gateway.url();
    let broker = TestBroker::start_with_on(backend, move |config| {
        config.push.allowed_urls = vec![url];
        config.push.delay = Period::millis(0);
        config.push.max_pending = 1;
    })
    .await;
    bob_registers_and_leaves(&broker, &gateway, "").await;
    gateway.fail_next(1_000_000).await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    send(&mut alice, "older").await;
    let mut carol = Client::v4(broker.addr, "carol-phone", "carol", 30).await;
    assert_eq!(carol.publish_acked("im/u/bob", chat("c1", "bob", "newer", false)).await, 0);
    wait_for(|| metric(&broker, "mqtt_im_pushes_total{outcome=\"dropped\"}") == 1.0).await;
    let sizes = broker.store.sizes().await.unwrap();
    assert_eq!((sizes.pushers, sizes.pushes_pending), (1, 1));
}
}

/// With `push.allow_content`, a `full` pusher gets the sender and the text.
#[tokio::test]
async fn a_full_pusher_gets_sender_and_text_where_allowed() {
    let mut gateway = Gateway::start();
    let broker = broker_with(TestBackend::Embedded, &gateway, true).await;
    bob_registers_and_leaves(&broker, &gateway, "full").await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    send(&mut alice, "hello bob").await;
    let shown = gateway.next().await;
    assert_eq!(shown["sender"], "alice");
    assert_eq!(shown["type"], "m.room.message");
    assert_eq!(
        shown["content"],
        serde_json::json!({"msgtype": "m.text", "body": "hello bob"})
    );
    assert_eq!(shown["devices"][0]["data"]["format"], "full");
}

/// `on_push` in Lua skips a muted conversation and rewrites the text of a mention; the
/// other notifications go as they are.
#[tokio::test]
async fn the_policy_skips_muted_conversations_and_rewrites_mentions() {
    let mut gateway = Gateway::start();
    let dir = tempfile::tempdir().unwrap();
    let lua = script(
        dir.path(),
        "push.lua",
        r#"
hooks = {
  on_push = function(push)
    if push.conversation == "u/carol" then return false, "muted" end
    if push.text and push.text:find("@bob", 1, true) then
      return { text = "mentioned you: " .. push.text }
    end
  end,
}
"#,
    );
    let url = gateway.url();
    let broker = TestBroker::start_with(move |config| {
        config.push.allowed_urls = vec![url];
        config.push.allow_content = true;
        config.push.delay = Period(DELAY);
        config.push.coalesce = Period(COALESCE);
        config.policy.scripts = vec![lua];
    })
    .await;
    bob_registers_and_leaves(&broker, &gateway, "full").await;
    let mut carol = Client::v4(broker.addr, "carol-phone", "carol", 30).await;
    assert_eq!(
        carol
            .publish_acked("im/u/bob", chat("c1", "bob", "from a muted chat", false))
            .await,
        0
    );
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    send(&mut alice, "hi @bob").await;
    let shown = gateway.next().await;
    assert_eq!(shown["room_id"], "u/alice");
    assert_eq!(shown["content"]["body"], "mentioned you: hi @bob");
    assert_eq!(unread(&shown), 2, "the badge still counts the muted chat");
    gateway.none_within(DELAY * 3).await;
    let skipped = metric(&broker, "mqtt_im_pushes_total{outcome=\"skipped\"}");
    assert_eq!(skipped, 1.0);
}
