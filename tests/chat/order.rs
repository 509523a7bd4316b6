//! Per-sender order under pipelining: a client that keeps 100 QoS 1 publishes in flight
//! (rumqttc's default, like paho's) gets seqs in the order its PUBLISH packets arrived, in
//! 1:1 chats and groups, with the shipped policy on; live deliveries arrive in seq order;
//! Pull and History give the exact reverse.
#![allow(clippy::unwrap_used)]

use crate::common::*;
use mqtt_im::wire::pb;
use prost::Message;

const ROUNDS: usize = 3;
const PER_ROUND: usize = 1000;

/// The chat message of a delivered envelope.
fn chat_message(bytes: &[u8]) -> pb::ChatMessage {
    match pb::Envelope::decode(bytes).map(|e| e.body) {
        Ok(Some(pb::envelope::Body::Chat(message))) => message,
        other => panic!("not a chat envelope: {other:?}"),
    }
}

/// Publishes `msg_ids` to `topic` without waiting in between (the client keeps up to 100 in
/// flight), then waits for every PUBACK and checks each was a success.
async fn send_pipelined(client: &mut Client, topic: &str, msg_ids: &[String], group: bool) {
    for id in msg_ids {
        let payload = if group {
            group_chat(id, topic.rsplit('/').next().unwrap())
        } else {
            chat(id, topic.rsplit('/').next().unwrap(), id, false)
        };
        client.publish(topic, 1, payload).await;
    }
    let mut acked = 0;
    while acked < msg_ids.len() {
        if let Seen::PubAck { reason, .. } = client.next().await {
            assert_eq!(reason, 0, "publish refused");
            acked += 1;
        }
    }
}

/// Reads `n` live chat messages on `topic`, in arrival order.
async fn live(client: &mut Client, topic: &str, n: usize) -> Vec<pb::ChatMessage> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        got.push(chat_message(&client.next_on(topic).await));
    }
    got
}

/// Pulls a conversation page by page (each Pull acknowledging the page before it) until
/// `end`; returns the messages in the order received (newest first).
async fn pull_all(client: &mut Client, uid: &str, conversation: &str) -> Vec<pb::ChatMessage> {
    let mut all = Vec::new();
    let mut ack = None;
    loop {
        let page = page(&client.ask(uid, pull("p", conversation, 200, ack)).await);
        all.extend(page.messages.iter().cloned());
        if page.end {
            return all;
        }
        ack = page.cursor;
    }
}

/// Reads a conversation's whole history, newest first.
async fn history_all(client: &mut Client, uid: &str, conversation: &str) -> Vec<pb::ChatMessage> {
    let mut all: Vec<pb::ChatMessage> = Vec::new();
    loop {
        let before_seq = all.last().map_or(0, |m| m.seq);
        let history = pb::request::Kind::History(pb::History {
            conversation: conversation.into(),
            before_seq,
            page_size: 200,
        });
        let page = page(&client.ask(uid, request("h", history)).await);
        all.extend(page.messages.iter().cloned());
        if page.end {
            return all;
        }
    }
}

fn ids(messages: &[pb::ChatMessage]) -> Vec<String> {
    messages.iter().map(|m| m.msg_id.clone()).collect()
}

fn seq_list(messages: &[pb::ChatMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

fn round_ids(prefix: &str, round: usize) -> Vec<String> {
    (0..PER_ROUND)
        .map(|i| format!("{prefix}-{round}-{i:04}"))
        .collect()
}

/// A device that has connected once (so its backlog starts now) and gone away.
async fn register(broker: &TestBroker, uid: &str, client_id: &str) {
    let mut device = Client::v4(broker.addr, client_id, uid, 30).await;
    device.subscribe(&format!("im/u/{uid}/#"), 1).await;
    let _ = device.digest(uid).await;
    device.disconnect().await;
}

/// The whole send order, round after round, checked against what the store gave back.
fn assert_reverse_of(sent: &[String], newest_first: &[pb::ChatMessage]) {
    let mut oldest_first = newest_first.to_vec();
    oldest_first.reverse();
    assert_eq!(
        ids(&oldest_first),
        sent,
        "stored order differs from send order"
    );
    let expected: Vec<u64> = (1..=sent.len() as u64).collect();
    assert_eq!(
        seq_list(&oldest_first),
        expected,
        "seqs not gap-free and increasing"
    );
}

backend_tests! {
/// 1:1: three rounds of 1,000 pipelined publishes to an online peer.
async fn pipelined_direct_messages_keep_send_order(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, shipped_policy).await;
    register(&broker, "bob", "bob-tablet").await;
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    let _ = bob.digest("bob").await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    let mut sent = Vec::new();
    for round in 0..ROUNDS {
        let msg_ids = round_ids("a", round);
        send_pipelined(&mut alice, "im/u/bob", &msg_ids, false).await;
        let arrived = live(&mut bob, "im/u/bob", PER_ROUND).await;
        assert_eq!(ids(&arrived), msg_ids, "round {round}: live arrivals out of send order");
        let first = (round * PER_ROUND) as u64 + 1;
        let expected: Vec<u64> = (first..first + PER_ROUND as u64).collect();
        assert_eq!(seq_list(&arrived), expected, "round {round}: seqs out of send order");
        sent.extend(msg_ids);
    }
    let mut tablet = Client::v4(broker.addr, "bob-tablet", "bob", 30).await;
    assert_reverse_of(&sent, &pull_all(&mut tablet, "bob", "u/alice").await);
    assert_reverse_of(&sent, &history_all(&mut tablet, "bob", "u/alice").await);
}

/// Groups: three rounds of 1,000 pipelined publishes, a member online.
async fn pipelined_group_messages_keep_send_order(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, shipped_policy).await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    let create = pb::request::Kind::GroupCreate(pb::GroupCreate {
        gid: "team".into(),
        members: vec!["bob".into(), "carol".into()],
    });
    assert_eq!(alice.ask("alice", request("c", create)).await.status, pb::Status::Ok as i32);
    register(&broker, "carol", "carol-tablet").await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    assert_eq!(bob.subscribe("im/g/team", 1).await, vec![1]);
    let mut sent = Vec::new();
    for round in 0..ROUNDS {
        let msg_ids = round_ids("g", round);
        send_pipelined(&mut alice, "im/g/team", &msg_ids, true).await;
        let arrived = live(&mut bob, "im/g/team", PER_ROUND).await;
        assert_eq!(ids(&arrived), msg_ids, "round {round}: live arrivals out of send order");
        sent.extend(msg_ids);
    }
    let mut tablet = Client::v4(broker.addr, "carol-tablet", "carol", 30).await;
    assert_reverse_of(&sent, &pull_all(&mut tablet, "carol", "g/team").await);
    assert_reverse_of(&sent, &history_all(&mut tablet, "carol", "g/team").await);
}

/// A sender with two devices sending at once: each device's own messages keep their order
/// (the two streams interleave); a receiver online gets everything in seq order.
async fn two_devices_of_one_sender_each_keep_their_order(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, shipped_policy).await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let _ = bob.digest("bob").await;
    let mut phone = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    let mut laptop = Client::v5(broker.addr, "alice-laptop", "alice").await;
    let phone_ids = round_ids("phone", 0);
    let laptop_ids = round_ids("laptop", 0);
    tokio::join!(
        send_pipelined(&mut phone, "im/u/bob", &phone_ids, false),
        send_pipelined(&mut laptop, "im/u/bob", &laptop_ids, false),
    );
    let arrived = live(&mut bob, "im/u/bob", 2 * PER_ROUND).await;
    let expected: Vec<u64> = (1..=2 * PER_ROUND as u64).collect();
    assert_eq!(seq_list(&arrived), expected, "live arrivals out of seq order");
    for (device, sent) in [("phone", &phone_ids), ("laptop", &laptop_ids)] {
        let own: Vec<String> = ids(&arrived)
            .into_iter()
            .filter(|id| id.starts_with(device))
            .collect();
        assert_eq!(&own, sent, "{device}'s messages out of its send order");
    }
}
}
