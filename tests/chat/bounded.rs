//! Storage that stays bounded, over real connections on both backends: retention (Pull says
//! how many messages are gone), backlog caps (`missed` in the digest), device expiry and
//! `DeviceForget`, and the operator's `store gc`, `device` and `user erase` commands.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use mqtt_im::config::Period;
use mqtt_im::wire::pb;

fn period(text: &str) -> Period {
    text.parse().unwrap()
}

/// How many messages the store holds of `uid`'s 1:1 chat with alice.
async fn history_len(broker: &TestBroker, peer: &str) -> usize {
    let chat = direct("alice", peer);
    broker
        .store
        .history(&chat, None, 100)
        .await
        .unwrap()
        .messages
        .len()
}

/// A broker whose nodes read evictions every 50 ms, with alice online on MQTT 5 (subscribed
/// to her inbox, digest received): what an erasure must close.
async fn broker_with_alice_online(backend: TestBackend) -> (TestBroker, Client) {
    let broker = TestBroker::start_with_on(backend, |config| {
        config.im.removal_poll = mqtt_im::config::Period::millis(50);
    })
    .await;
    let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    alice.subscribe("im/u/alice/#", 1).await;
    let _ = alice.digest("alice").await;
    (broker, alice)
}

backend_tests! {
/// Messages past their retention are deleted in the background; the receiver's digest and
/// pages count only what is left, and its first Pull says how many are gone.
async fn retention_deletes_old_messages_and_pull_says_how_many(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, |config| {
        config.im.retention.direct = period("4s");
        config.im.gc_interval = period("100ms");
    })
    .await;
    let alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    for i in 0..3 {
        alice.publish("im/u/bob", 1, chat(&format!("old{i}"), "bob", "old", false)).await;
    }
    eventually(|| async { history_len(&broker, "bob").await == 3 }).await;
    eventually(|| async { history_len(&broker, "bob").await == 0 }).await;
    let deleted = r#"mqtt_im_gc_deleted_total{what="messages"}"#;
    wait_for(|| metric(&broker, deleted) == 3.0).await;
    for i in 0..2 {
        alice.publish("im/u/bob", 1, chat(&format!("new{i}"), "bob", "new", false)).await;
    }
    eventually(|| async { history_len(&broker, "bob").await == 2 }).await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let digest = bob.digest("bob").await;
    let session = &digest.sessions["u/alice"];
    assert_eq!((session.unacked, session.count, session.max_seq), (2, 2, 5));
    let first = page(&bob.ask("bob", pull("p1", "u/alice", 10, None)).await);
    assert_eq!((seqs(&first), first.end, first.gone), (vec![5, 4], true, 3));
    let again = page(&bob.ask("bob", pull("p2", "u/alice", 10, None)).await);
    assert_eq!((seqs(&again), again.gone), (vec![5, 4], 0));
    let history = bob
        .ask("bob", request("h1", pb::request::Kind::History(pb::History {
            conversation: "u/alice".into(),
            before_seq: 0,
            page_size: 10,
        })))
        .await;
    assert_eq!(seqs(&page(&history)), vec![5, 4]);
}

/// A device flooded past `im.max_backlog` keeps the newest: its digest reports the rest as
/// `missed` until it clears that digest, and its pulls never offer them.
async fn backlog_cap_reports_missed_in_the_digest(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, |config| {
        config.im.max_backlog = 3;
    })
    .await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    for i in 0..5 {
        assert_eq!(alice.publish_acked("im/u/bob", chat(&format!("f{i}"), "bob", "flood", false)).await, 0);
    }
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let digest = bob.digest("bob").await;
    let session = &digest.sessions["u/alice"];
    assert_eq!((session.missed, session.unacked, session.count), (2, 3, 3));
    assert_eq!(metric(&broker, "mqtt_im_backlog_skipped_total"), 2.0);
    let first = page(&bob.ask("bob", pull("p1", "u/alice", 10, None)).await);
    assert_eq!((seqs(&first), first.end), (vec![5, 4, 3], true));
    let cleared = bob
        .ask("bob", request("c1", pb::request::Kind::ClearCounters(pb::ClearCounters {
            version: digest.version,
        })))
        .await;
    assert_eq!(cleared.status, pb::Status::Ok as i32);
    bob.disconnect().await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let digest = bob.digest("bob").await;
    let session = &digest.sessions["u/alice"];
    assert_eq!((session.missed, session.unacked), (0, 3));
    // History still has every message.
    assert_eq!(history_len(&broker, "bob").await, 5);
}

/// A user forgets its lost laptop: the laptop's connection is closed (MQTT 5: administrative
/// action), its state is gone, and an unknown device is a clear error.
async fn device_forget_request_closes_and_resets_the_device(backend: TestBackend) {
    let broker = TestBroker::start_on(backend).await;
    let mut laptop = Client::v5(broker.addr, "bob-laptop", "bob").await;
    laptop.subscribe("im/u/bob/#", 1).await;
    let _ = laptop.digest("bob").await;
    let mut phone = Client::v5(broker.addr, "bob-phone", "bob").await;
    phone.subscribe("im/u/bob/#", 1).await;
    let _ = phone.digest("bob").await;
    let forget = |id: &str| {
        request("f1", pb::request::Kind::DeviceForget(pb::DeviceForget { client_id: id.into() }))
    };
    let answer = phone.ask("bob", forget("bob-laptop")).await;
    assert_eq!(answer.status, pb::Status::Ok as i32, "{answer:?}");
    assert_eq!(laptop.disconnect_reason().await, 0x98);
    let ids: Vec<String> = broker.store.devices(&uid("bob")).await.unwrap().into_iter().map(|d| d.client_id).collect();
    assert_eq!(ids, vec!["bob-phone".to_owned()]);
    let unknown = phone.ask("bob", forget("bob-laptop")).await;
    assert_eq!(unknown.error.unwrap().code, pb::ErrorCode::NotFound as i32);
    let empty = phone.ask("bob", forget("")).await;
    assert_eq!(empty.error.unwrap().code, pb::ErrorCode::BadRequest as i32);
}

/// A device unseen for `im.device_ttl` is forgotten; a connected one never is.
async fn unseen_devices_expire_connected_ones_stay(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, |config| {
        config.im.device_ttl = period("1s");
        config.im.gc_interval = period("100ms");
    })
    .await;
    let mut phone = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    phone.subscribe("im/u/bob/#", 1).await;
    let _ = phone.digest("bob").await;
    let mut tablet = Client::v4(broker.addr, "bob-tablet", "bob", 30).await;
    tablet.subscribe("im/u/bob/#", 1).await;
    let _ = tablet.digest("bob").await;
    tablet.disconnect().await;
    eventually(|| async {
        let devices = broker.store.devices(&uid("bob")).await.unwrap();
        devices.len() == 1 && devices[0].client_id == "bob-phone"
    })
    .await;
    // Past the phone's time to live (the configured interval), then a whole round.
    tokio::time::sleep(Duration::from_secs(1)).await;
    after_round(&broker, "gc").await;
    let devices = broker.store.devices(&uid("bob")).await.unwrap();
    assert_eq!(devices.len(), 1, "the connected phone is kept: {devices:?}");
    wait_for(|| metric(&broker, r#"mqtt_im_gc_deleted_total{what="devices"}"#) >= 1.0).await;
}

/// The operator's commands: `store gc` deletes what retention no longer keeps, `device
/// list` and `device forget` manage devices, and `user erase` closes the user's
/// connections first, then removes its devices, memberships and messages (twice: no error).
async fn operator_commands_bound_the_store(backend: TestBackend) {
    let (broker, mut alice) = broker_with_alice_online(backend).await;
    for i in 0..2 {
        assert_eq!(alice.publish_acked("im/u/bob", chat(&format!("a{i}"), "bob", "hi", false)).await, 0);
    }
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    assert_eq!(bob.publish_acked("im/u/alice", chat("b0", "alice", "hello", false)).await, 0);
    bob.disconnect().await;
    // Nothing is old enough for the default retention.
    assert_eq!(operator(&broker, &["store", "gc"]), "deleted 0 messages and 0 devices\n");
    let listed = operator(&broker, &["device", "list", "alice"]);
    assert!(listed.starts_with("\"alice-phone\" last_seen="), "{listed}");
    assert_eq!(operator(&broker, &["device", "forget", "bob", "bob-gone"]), "unknown device \"bob-gone\"\n");
    assert_eq!(operator(&broker, &["device", "forget", "bob"]), "forgot \"bob-phone\"\n");

    let erased = operator(&broker, &["user", "erase", "alice"]);
    assert_eq!(erased, "erased alice: 1 devices, 0 group memberships, 2 messages deleted, 0 redacted\n");
    assert_eq!(alice.disconnect_reason().await, 0x98);
    let chat = direct("alice", "bob");
    let left = broker.store.history(&chat, None, 10).await.unwrap();
    assert_eq!(left.messages.iter().map(|m| m.sender.as_str()).collect::<Vec<_>>(), vec!["bob"]);
    let again = operator(&broker, &["user", "erase", "alice"]);
    assert_eq!(again, "erased alice: 0 devices, 0 group memberships, 0 messages deleted, 0 redacted\n");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
        .args(["user", "erase", "no/such user"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid uid"));
}
}

backend_tests! {
/// Erasing a group's owner redacts what it said there for the other members (seq and sender
/// kept, content gone), hands the group on, and cuts the erased user's live subscription.
async fn user_erase_redacts_group_messages_for_the_others(backend: TestBackend) {
    let (broker, mut alice) = broker_with_alice_online(backend).await;
    let create = pb::request::Kind::GroupCreate(pb::GroupCreate {
        gid: "club".into(),
        members: vec!["bob".into()],
    });
    assert_eq!(alice.ask("alice", request("g1", create)).await.status, pb::Status::Ok as i32);
    assert_eq!(alice.publish_acked("im/g/club", group_chat("secret", "club")).await, 0);
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let _ = bob.digest("bob").await;
    assert_eq!(bob.publish_acked("im/g/club", group_chat("reply", "club")).await, 0);

    let erased = operator(&broker, &["user", "erase", "alice"]);
    assert_eq!(erased, "erased alice: 1 devices, 1 group memberships, 0 messages deleted, 1 redacted\n");
    assert_eq!(alice.disconnect_reason().await, 0x98);
    let history = pb::request::Kind::History(pb::History {
        conversation: "g/club".into(),
        before_seq: 0,
        page_size: 10,
    });
    let page = page(&bob.ask("bob", request("h1", history)).await);
    let seen: Vec<(u64, &str, &str)> = page
        .messages
        .iter()
        .map(|m| (m.seq, m.from.as_str(), text_of(m)))
        .collect();
    assert_eq!(seen, vec![(2, "bob", "reply"), (1, "alice", "")]);
    let members = pb::request::Kind::GroupMembers(pb::GroupMembers { gid: "club".into() });
    let answer = bob.ask("bob", request("m1", members)).await;
    let Some(pb::response::Result::Group(group)) = answer.result else {
        panic!("expected the group, got {answer:?}");
    };
    let owners: Vec<(&str, i32)> = group.members.iter().map(|m| (m.uid.as_str(), m.role)).collect();
    assert_eq!(owners, vec![("bob", pb::Role::Owner as i32)]);
}
}

/// `store gc` with a short retention deletes old messages without a running node.
#[tokio::test]
async fn store_gc_command_applies_retention() {
    let broker = TestBroker::start().await;
    let alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    for i in 0..4 {
        alice
            .publish("im/u/bob", 1, chat(&format!("g{i}"), "bob", "x", false))
            .await;
    }
    eventually(|| async { history_len(&broker, "bob").await == 4 }).await;
    let (dir, _) = broker.stop().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
        .args(["store", "gc"])
        .env("MQTT_IM__STORE__PATH", dir.path().join("im.db"))
        .env("MQTT_IM__IM__RETENTION__DIRECT", "10ms")
        .env("MQTT_IM__IM__GC_BATCH", "3")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "deleted 4 messages and 0 devices\n"
    );
}
