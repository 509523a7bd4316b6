//! Sending, receiving, unread state, receipts, groups and two devices of one user, each
//! through the SDK over real connections.

use std::collections::HashSet;
use std::sync::Arc;

use mqtt_im_client::{pb, ClientError, Delivery, Event, MemoryStore};

use crate::common::*;
use crate::sdk::*;

fn quick_receipts(config: &mut mqtt_im::Config) {
    config.im.receipt_interval = mqtt_im::config::Period::millis(100);
}

#[tokio::test]
async fn a_send_is_echoed_at_once_then_sent_and_the_peer_sees_it_live_unread_then_read() {
    let broker = TestBroker::start_with(quick_receipts).await;
    let mut alice = online(broker.addr, "alice", "alice-phone").await;
    let mut bob = online(broker.addr, "bob", "bob-phone").await;

    let echo = alice
        .client
        .send_text(&with("bob"), "hello bob")
        .await
        .unwrap();
    assert_eq!(echo.seq, None);
    assert!(matches!(echo.delivery, Delivery::Sending { .. }));
    // The local echo is in the timeline at once.
    assert_eq!(alice.texts(&with("bob")).await, ["hello bob"]);
    let sent = alice.wait_sent(&echo.msg_id).await;
    assert_eq!(sent.seq, Some(1));

    let received = bob.wait_message("hello bob").await;
    let badge = bob
        .wait_for("unread", |e| match e {
            Event::Unread {
                conversation,
                unread,
            } if conversation == &with("alice") => Some(*unread),
            _ => None,
        })
        .await;
    assert_eq!(badge, 1, "the badge moves with the live message");
    assert_eq!((received.from.as_str(), received.seq), ("alice", Some(1)));
    assert_eq!(received.delivery, Delivery::Received);
    assert_eq!(bob.unread_of(&with("alice")).await, 1);
    assert_eq!(bob.client.unread().await.unwrap().total, 1);
    // Sending does not make the sender's own message unread.
    assert_eq!(alice.unread_of(&with("bob")).await, 0);

    assert_eq!(bob.client.mark_read(&with("alice"), 1).await.unwrap(), 1);
    assert_eq!(bob.unread_of(&with("alice")).await, 0);
    // The sender learns it was read: a batched receipt update, then the cursor in its store.
    let read = alice
        .wait_for("read receipt", |e| match e {
            Event::Read { uid, read_seq, .. } if uid == "bob" => Some(*read_seq),
            _ => None,
        })
        .await;
    assert_eq!(read, 1);
    let conversation = alice
        .client
        .conversation(&with("bob"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conversation.peer_read_seq, 1);
    let receipts = alice.client.receipts(&with("bob"), vec![1]).await.unwrap();
    assert_eq!(receipts[0].readers, ["bob"]);
}

#[tokio::test]
async fn an_offline_receiver_gets_badges_from_the_digest_and_pages_the_backlog_once() {
    let broker = TestBroker::start().await;
    let mut alice = online(broker.addr, "alice", "alice-phone").await;
    for n in 1..=7 {
        let sent = alice
            .client
            .send_text(&with("bob"), format!("m{n}"))
            .await
            .unwrap();
        alice.wait_sent(&sent.msg_id).await;
    }
    let bob = online(broker.addr, "bob", "bob-phone").await;
    // The digest alone set the badge; its previews are the newest messages.
    assert_eq!(bob.unread_of(&with("alice")).await, 7);
    let previews = bob.texts(&with("alice")).await;
    assert!(!previews.is_empty() && previews.len() < 7, "{previews:?}");
    assert_eq!(previews.last().unwrap(), "m7");

    bob.fetch_all(&with("alice")).await;
    let texts = bob.texts(&with("alice")).await;
    let expected: Vec<String> = (1..=7).map(|n| format!("m{n}")).collect();
    assert_eq!(texts, expected, "each message once, in seq order");
    // Every page was acknowledged: a new device of bob's starts after them.
    let mut laptop = Client::v4(broker.addr, "bob-laptop", "bob", 30).await;
    laptop.subscribe("im/u/bob/#", 1).await;
    let digest = laptop.digest("bob").await;
    assert!(!digest.sessions.contains_key("u/alice"), "{digest:?}");
}

#[tokio::test]
async fn two_devices_of_one_user_hold_the_same_messages_and_read_state() {
    let broker = TestBroker::start().await;
    let mut alice = online(broker.addr, "alice", "alice-phone").await;
    let mut phone = online(broker.addr, "bob", "bob-phone").await;
    let laptop_store = Arc::new(MemoryStore::default());
    let mut laptop = app_on(broker.addr, "bob", "bob-laptop", laptop_store.clone()).await;
    laptop.wait_online().await;

    let first = alice.client.send_text(&with("bob"), "a1").await.unwrap();
    alice.wait_sent(&first.msg_id).await;
    phone.wait_message("a1").await;
    laptop.wait_message("a1").await;
    // The phone answers and reads; the laptop was not told live of either.
    let reply = phone.client.send_text(&with("alice"), "p1").await.unwrap();
    phone.wait_sent(&reply.msg_id).await;
    alice.wait_message("p1").await;
    phone.client.mark_read(&with("alice"), 1).await.unwrap();
    assert_eq!(phone.unread_of(&with("alice")).await, 0);

    // The laptop fetches the reply (bob's own, sent from the phone) and so has acknowledged
    // everything; the phone's read still reaches it at its next connect.
    laptop.fetch_all(&with("alice")).await;
    assert_eq!(laptop.texts(&with("alice")).await, ["a1", "p1"]);
    assert_eq!(laptop.unread_of(&with("alice")).await, 1, "not told live");
    laptop.client.close().await.unwrap();
    let mut laptop = app_on(broker.addr, "bob", "bob-laptop", laptop_store).await;
    laptop.wait_online().await;
    assert_eq!(laptop.unread_of(&with("alice")).await, 0);
    assert_eq!(phone.texts(&with("alice")).await, ["a1", "p1"]);
    let own = laptop
        .client
        .messages(&with("alice"), None, 1)
        .await
        .unwrap();
    assert_eq!(
        (own[0].from.as_str(), &own[0].delivery),
        ("bob", &Delivery::Sent)
    );
}

#[tokio::test]
async fn group_messages_reach_every_member_once_with_receipts() {
    let broker = TestBroker::start_with(quick_receipts).await;
    let mut alice = online(broker.addr, "alice", "alice-phone").await;
    let mut bob = online(broker.addr, "bob", "bob-phone").await;
    alice
        .client
        .create_group("team", vec!["bob".into(), "carol".into()])
        .await
        .unwrap();
    // Bob was added by someone else: his client joins the conversation when told.
    bob.client.group_changed("team", true).await.unwrap();
    let team = mqtt_im_client::ConversationId::group("team");
    // Packets of a connection are handled in order: once a request sent after the group's
    // SUBSCRIBE is answered, the subscription is in place.
    bob.client
        .request(mqtt_im_client::pb::request::Kind::MyGroups(
            Default::default(),
        ))
        .await
        .unwrap();
    let sent = alice.client.send_text(&team, "hello team").await.unwrap();
    let sent = alice.wait_sent(&sent.msg_id).await;
    bob.wait_message("hello team").await;

    // Carol was offline: her first connect shows the group with its unread messages.
    let carol = online(broker.addr, "carol", "carol-phone").await;
    assert_eq!(carol.unread_of(&team).await, 1);
    carol.fetch_all(&team).await;
    assert_eq!(carol.texts(&team).await, ["hello team"]);
    let seq = sent.seq.unwrap();
    carol.client.mark_read(&team, seq).await.unwrap();
    bob.client.mark_read(&team, seq).await.unwrap();
    let readers: HashSet<String> = alice
        .client
        .receipts(&team, vec![seq])
        .await
        .unwrap()
        .remove(0)
        .readers
        .into_iter()
        .collect();
    assert_eq!(
        readers,
        HashSet::from(["bob".to_owned(), "carol".to_owned()])
    );
}

#[tokio::test]
async fn a_refused_message_fails_for_good_and_the_next_one_still_goes() {
    let broker = TestBroker::start_with(|config| {
        config.im.max_message_bytes = 200;
    })
    .await;
    let mut alice = online(broker.addr, "alice", "alice-phone").await;
    let big = alice
        .client
        .send_text(&with("bob"), "x".repeat(400))
        .await
        .unwrap();
    let failed = alice
        .wait_for("failed", |e| match e {
            Event::Updated(m) if m.msg_id == big.msg_id => match &m.delivery {
                Delivery::Failed { code, .. } => Some(*code),
                _ => None,
            },
            _ => None,
        })
        .await;
    assert_eq!(failed, 0x97, "too large: quota exceeded");
    let small = alice.client.send_text(&with("bob"), "small").await.unwrap();
    assert_eq!(alice.wait_sent(&small.msg_id).await.seq, Some(1));
}

#[tokio::test]
async fn over_the_publish_rate_a_request_is_refused_and_messages_are_retried_until_sent() {
    let broker = TestBroker::start_with(|config| {
        config.limits.publish_rate = 5;
        config.limits.publish_burst = 3;
    })
    .await;
    // Connecting spends two of the three (MyGroups, ClearCounters), the first message the third.
    // A refused publish is charged too, so retries must be slower than the rate (the test's
    // backoff tops out at 400 ms, 2.5 a second).
    let mut alice = online(broker.addr, "alice", "alice-phone").await;
    // Bob, under the same limit, takes them live (receiving is not publishing).
    let mut bob = online(broker.addr, "bob", "bob-phone").await;
    let mut sent = Vec::new();
    for n in 1..=4 {
        let message = alice
            .client
            .send_text(&with("bob"), format!("m{n}"))
            .await
            .unwrap();
        sent.push(message.msg_id);
    }
    let refused = alice
        .client
        .request(pb::request::Kind::MyGroups(pb::MyGroups {}))
        .await;
    assert!(
        matches!(&refused, Err(ClientError::Refused { code: 0x97, reason }) if reason.contains("rate")),
        "{refused:?}"
    );
    alice
        .wait_for("a message retried over the rate", |e| match e {
            Event::Updated(m) => match &m.delivery {
                Delivery::Sending {
                    error: Some(error), ..
                } => error.contains("rate").then_some(()),
                _ => None,
            },
            _ => None,
        })
        .await;
    let ids: Vec<&str> = sent.iter().map(String::as_str).collect();
    alice.wait_all_sent(&ids).await;
    let mine = alice.client.messages(&with("bob"), None, 10).await.unwrap();
    let seqs: Vec<Option<u64>> = mine.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [4, 3, 2, 1].map(Some), "in order, each once");
    bob.wait_message("m4").await;
    assert_eq!(bob.texts(&with("alice")).await, ["m1", "m2", "m3", "m4"]);
}
