//! Digest counters and paged pull-and-ack.

use crate::common::*;
use mqtt_im::wire::pb;

async fn send_n(broker: &TestBroker, n: usize, prefix: &str) {
    let mut alice = Client::v4(broker.addr, &format!("alice-{prefix}"), "alice", 30).await;
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        assert_eq!(
            alice
                .publish_acked("im/u/bob", chat(&id, "bob", &id, false))
                .await,
            0
        );
    }
    alice.disconnect().await;
}

fn cursor(page: &pb::Page) -> Option<pb::Cursor> {
    page.cursor
}

backend_tests! {
/// ClearCounters clears what the confirmed digest carried; later increments stay.
async fn clear_counters_keeps_later_increments(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    send_n(&broker, 3, "a").await;
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    let digest = bob.digest("bob").await;
    assert_eq!(digest.sessions["u/alice"].count, 3);
    bob.disconnect().await;
    send_n(&broker, 2, "b").await;
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    let second = bob.digest("bob").await;
    assert_eq!(second.sessions["u/alice"].count, 5);
    let clear = pb::request::Kind::ClearCounters(pb::ClearCounters {
        version: digest.version,
    });
    let response = bob.ask("bob", request("c1", clear)).await;
    assert_eq!(response.status, pb::Status::Ok as i32, "{response:?}");
    bob.disconnect().await;
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    let third = bob.digest("bob").await;
    let session = &third.sessions["u/alice"];
    assert_eq!((session.count, session.unacked, session.max_seq), (2, 5, 5));
}
}

backend_tests! {
/// Three pages with acks while new messages arrive: no skip, no repeat, then `end`; a second
/// device of the same user still gets everything.
async fn pages_with_acks_while_messages_arrive(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    send_n(&broker, 25, "old").await;
    let mut phone = Client::v5(broker.addr, "bob-phone", "bob").await;
    let first = page(&phone.ask("bob", pull("1", "u/alice", 10, None)).await);
    assert_eq!(seqs(&first), (16..=25).rev().collect::<Vec<_>>());
    send_n(&broker, 3, "new").await;
    let second = page(
        &phone
            .ask("bob", pull("2", "u/alice", 10, cursor(&first)))
            .await,
    );
    assert_eq!(seqs(&second)[..3], [28, 27, 26]);
    let mut seen = [seqs(&first), seqs(&second)].concat();
    let mut last = second;
    while !last.end {
        last = page(
            &phone
                .ask("bob", pull("n", "u/alice", 10, cursor(&last)))
                .await,
        );
        seen.extend(seqs(&last));
    }
    let done = page(
        &phone
            .ask("bob", pull("f", "u/alice", 10, cursor(&last)))
            .await,
    );
    assert!(done.messages.is_empty() && done.end);
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=28).collect::<Vec<_>>(),
        "every message exactly once"
    );

    let mut laptop = Client::v4(broker.addr, "bob-laptop", "bob", 30).await;
    let all = page(&laptop.ask("bob", pull("l", "u/alice", 50, None)).await);
    assert_eq!(
        all.messages.len(),
        0,
        "the laptop was first seen after the phone acked all"
    );
    drop(laptop);
    // A device that existed before the acks keeps its own backlog.
    let mut tablet = Client::v4(broker.addr, "bob-tablet", "bob", 30).await;
    let _ = page(&tablet.ask("bob", pull("t", "u/alice", 1, None)).await);
    send_n(&broker, 2, "later").await;
    let from_phone = page(&phone.ask("bob", pull("p", "u/alice", 50, None)).await);
    assert_eq!(seqs(&from_phone), vec![30, 29]);
    let from_tablet = page(&tablet.ask("bob", pull("t2", "u/alice", 50, None)).await);
    assert_eq!(seqs(&from_tablet), vec![30, 29]);
}
}

backend_tests! {
/// A device that pulled the newest 20 of 100 and stopped gets the older 80 next time.
async fn pull_twenty_of_hundred_then_stop_keeps_the_hole(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    send_n(&broker, 100, "m").await;
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    let newest = page(&bob.ask("bob", pull("1", "u/alice", 20, None)).await);
    let ack = pb::request::Kind::Ack(pb::Ack {
        conversation: "u/alice".into(),
        up_to: 0,
    });
    let bad = bob.ask("bob", request("bad", ack)).await;
    assert_eq!(bad.status, pb::Status::Error as i32);
    // Acknowledge the newest page through the next pull, then stop (disconnect).
    let _ = page(
        &bob.ask("bob", pull("2", "u/alice", 1, cursor(&newest)))
            .await,
    );
    bob.disconnect().await;
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    assert_eq!(bob.digest("bob").await.sessions["u/alice"].unacked, 80);
    let rest = page(&bob.ask("bob", pull("3", "u/alice", 200, None)).await);
    assert_eq!(seqs(&rest), (1..=80).rev().collect::<Vec<_>>());
    assert!(rest.end);
    let history = page(
        &bob.ask(
            "bob",
            request(
                "h",
                pb::request::Kind::History(pb::History {
                    conversation: "u/alice".into(),
                    before_seq: 0,
                    page_size: 5,
                }),
            ),
        )
        .await,
    );
    assert_eq!(seqs(&history), vec![100, 99, 98, 97, 96]);
}
}

backend_tests! {
/// MQTT 5 Response Topic and Correlation Data are honoured.
async fn v5_response_topic_and_correlation_data(backend: TestBackend) {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let broker = TestBroker::start_on(backend.clone()).await;
    send_n(&broker, 1, "x").await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let _ = bob.digest("bob").await;
    let properties = PublishProperties {
        response_topic: Some("im/u/bob/replies".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-1")),
        ..Default::default()
    };
    let request = pull("r", "u/alice", 5, None);
    bob.publish_with("im/u/bob/req", request, properties).await;
    let (reply, correlation) = bob.next_with_correlation("im/u/bob/replies").await;
    assert_eq!(correlation.as_deref(), Some(&b"corr-1"[..]));
    let response = <pb::Response as prost::Message>::decode(reply.as_slice()).unwrap();
    assert_eq!(page(&response).messages.len(), 1);
}
}

backend_tests! {
/// MarkRead moves the user's read cursor: the user's other devices see it as `read_seq`, the
/// peer's devices as `peer_read_seq`.
async fn mark_read_shows_in_digests(backend: TestBackend) {
    let broker = TestBroker::start_on(backend.clone()).await;
    send_n(&broker, 3, "r").await;
    let mut phone = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    let mark = pb::request::Kind::MarkRead(pb::MarkRead {
        conversation: "u/alice".into(),
        seq: 2,
    });
    let response = phone.ask("bob", request("m", mark)).await;
    match response.result {
        Some(pb::response::Result::Read(read)) => assert_eq!(read.read_seq, 2),
        other => panic!("expected a read cursor, got {other:?}"),
    }
    let beyond = pb::request::Kind::MarkRead(pb::MarkRead {
        conversation: "u/alice".into(),
        seq: 99,
    });
    assert_eq!(
        phone.ask("bob", request("b", beyond)).await.status,
        pb::Status::Error as i32
    );
    let mut laptop = Client::v4(broker.addr, "bob-laptop", "bob", 30).await;
    laptop.subscribe("im/u/bob/#", 1).await;
    assert_eq!(laptop.digest("bob").await.sessions["u/alice"].read_seq, 2);
    let mut alice = Client::v4(broker.addr, "alice-laptop", "alice", 30).await;
    alice.subscribe("im/u/alice/#", 1).await;
    let session = &alice.digest("alice").await.sessions["u/bob"];
    assert_eq!((session.peer_read_seq, session.count), (2, 0));
}
}

backend_tests! {
    /// A client announcing a small MQTT 5 Maximum Packet Size gets a digest without previews
    /// and smaller pages — never a packet it would have to drop — and still every message.
    async fn replies_respect_the_client_maximum_packet_size(backend: TestBackend) {
        let broker = TestBroker::start_on(backend).await;
        let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
        let text = "y".repeat(900);
        for i in 0..12 {
            let id = format!("big-{i}");
            assert_eq!(alice.publish_acked("im/u/bob", chat(&id, "bob", &text, false)).await, 0);
        }
        let mut bob = Client::v5_max_packet(broker.addr, "bob-phone", "bob", Some(2048)).await;
        bob.subscribe("im/u/bob/#", 1).await;
        let session = bob.digest("bob").await.sessions["u/alice"].clone();
        assert_eq!((session.count, session.last_msgs.len()), (12, 0));
        let mut seen = Vec::new();
        let mut ack = None;
        loop {
            let page = page(&bob.ask("bob", pull("p", "u/alice", 10, ack)).await);
            assert!(page.messages.len() <= 2, "{} messages in one page", page.messages.len());
            seen.extend(seqs(&page));
            if page.messages.is_empty() && page.end {
                break;
            }
            ack = page.cursor;
        }
        seen.sort_unstable();
        assert_eq!(seen, (1..=12).collect::<Vec<_>>());
    }
}

backend_tests! {
/// Live messages the device acknowledged (its PUBACKs are written in the background) never
/// come back in its Pull or count in its digest, however soon it asks; a group too.
async fn live_acknowledged_messages_stay_out_of_the_next_pull(backend: TestBackend) {
    // Written in the background only after the test: the Pull must write them itself.
    let broker =
        TestBroker::start_with_on(backend.clone(), |c| {
            c.im.live_ack_flush = mqtt_im::config::Period::millis(60_000)
        })
        .await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    let create = pb::request::Kind::GroupCreate(pb::GroupCreate {
        gid: "team".into(),
        members: vec!["bob".into()],
    });
    assert_eq!(alice.ask("alice", request("c", create)).await.status, pb::Status::Ok as i32);
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    bob.subscribe("im/g/team", 1).await;
    let _ = bob.digest("bob").await;
    for round in 0..3 {
        let id = format!("d{round}");
        assert_eq!(alice.publish_acked("im/u/bob", chat(&id, "bob", &id, false)).await, 0);
        let gid = format!("g{round}");
        assert_eq!(alice.publish_acked("im/g/team", group_chat(&gid, "team")).await, 0);
        assert_eq!(chat_seq(&bob.next_on("im/u/bob").await), round + 1);
        assert_eq!(chat_seq(&bob.next_on("im/g/team").await), round + 1);
        // rumqttc acknowledged both before the Pull goes out on the same connection.
        let direct = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
        assert_eq!(seqs(&direct), Vec::<u64>::new(), "round {round}");
        assert!(direct.end);
        let group = page(&bob.ask("bob", pull("q", "g/team", 10, None)).await);
        assert_eq!(seqs(&group), Vec::<u64>::new(), "round {round}");
    }
    assert_eq!(alice.publish_acked("im/u/bob", chat("last", "bob", "last", false)).await, 0);
    assert_eq!(chat_seq(&bob.next_on("im/u/bob").await), 4);
    bob.disconnect().await;
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    let digest = bob.digest("bob").await;
    assert!(digest.sessions.is_empty(), "{digest:?}");
}
}

backend_tests! {
/// A digest cut down to the client's Maximum Packet Size records only the conversations it
/// carried: ClearCounters clears those, and the ones left out still count in the next digest.
async fn clear_counters_clears_only_what_the_digest_carried(backend: TestBackend) {
    let senders: Vec<String> = (0..30).map(|i| format!("a-sender-with-a-long-name-{i:02}")).collect();
    let users = senders.clone();
    let broker = TestBroker::start_with_on(backend, move |config| {
        for uid in users {
            config.auth.users.insert(uid, "pw".into());
        }
    })
    .await;
    for uid in &senders {
        let mut sender = Client::v4(broker.addr, &format!("{uid}-phone"), uid, 30).await;
        assert_eq!(sender.publish_acked("im/u/bob", chat("m", "bob", "hello", false)).await, 0);
        sender.disconnect().await;
    }
    let mut small = Client::v5_max_packet(broker.addr, "bob-phone", "bob", Some(600)).await;
    small.subscribe("im/u/bob/#", 1).await;
    let shown = small.digest("bob").await;
    assert!(!shown.sessions.is_empty());
    assert!(shown.sessions.len() < senders.len(), "{} fit", shown.sessions.len());
    let clear = pb::request::Kind::ClearCounters(pb::ClearCounters { version: shown.version });
    assert_eq!(small.ask("bob", request("c", clear)).await.status, pb::Status::Ok as i32);
    small.disconnect().await;

    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let next = bob.digest("bob").await;
    assert_eq!(next.sessions.len(), senders.len(), "every conversation is still unacked");
    for uid in &senders {
        let session = &next.sessions[&format!("u/{uid}")];
        let expected = if shown.sessions.contains_key(&format!("u/{uid}")) { 0 } else { 1 };
        assert_eq!((session.count, session.unacked), (expected, 1), "{uid}");
    }
}
}
