//! Group conversations and read receipts over MQTT, on every backend: management under
//! roles, live fan-out and digests, the pull hole, receipts and their batched updates, and
//! members cut off at once when removed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use mqtt_im::wire::pb;
use prost::Message;

fn group_request(id: &str, kind: pb::request::Kind) -> Vec<u8> {
    request(id, kind)
}

fn create(gid: &str, members: &[&str]) -> Vec<u8> {
    group_request(
        "create",
        pb::request::Kind::GroupCreate(pb::GroupCreate {
            gid: gid.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        }),
    )
}

fn add(gid: &str, members: &[&str], role: pb::Role) -> Vec<u8> {
    group_request(
        "add",
        pb::request::Kind::GroupAdd(pb::GroupAdd {
            gid: gid.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            role: role as i32,
        }),
    )
}

fn remove(gid: &str, members: &[&str]) -> Vec<u8> {
    group_request(
        "remove",
        pb::request::Kind::GroupRemove(pb::GroupRemove {
            gid: gid.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        }),
    )
}

fn members(response: &pb::Response) -> Vec<(String, pb::Role)> {
    match &response.result {
        Some(pb::response::Result::Group(info)) => info
            .members
            .iter()
            .map(|m| (m.uid.clone(), pb::Role::try_from(m.role).unwrap()))
            .collect(),
        other => panic!("expected group info, got {other:?} ({:?})", response.error),
    }
}

fn refused(response: &pb::Response) -> bool {
    response.status == pb::Status::Error as i32
        && response.error.as_ref().map(|e| e.code) == Some(pb::ErrorCode::NotAuthorized as i32)
}

/// Users alice, bob, carol (password "pw") plus dave and erin.
fn with_more_users(config: &mut mqtt_im::Config) {
    for user in ["dave", "erin"] {
        config.auth.users.insert(user.into(), "pw".into());
    }
    config.im.receipt_interval = mqtt_im::config::Period::millis(300);
}

/// A connected client subscribed to its own tree, its digest read.
async fn online(broker: &TestBroker, uid: &str) -> (Client, pb::Digest) {
    let mut client = Client::v5(broker.addr, &format!("{uid}-phone"), uid).await;
    client.subscribe(&format!("im/u/{uid}/#"), 1).await;
    let digest = client.digest(uid).await;
    (client, digest)
}

backend_tests! {
/// Owners add and remove anyone, admins add and remove members only, members neither; an
/// owner who leaves hands the group to its admin.
async fn roles_decide_who_adds_and_removes(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, with_more_users).await;
    let (mut alice, _) = online(&broker, "alice").await;
    let (mut bob, _) = online(&broker, "bob").await;
    let (mut carol, _) = online(&broker, "carol").await;

    let created = alice.ask("alice", create("team", &["bob"])).await;
    assert_eq!(
        members(&created),
        vec![("alice".into(), pb::Role::Owner), ("bob".into(), pb::Role::Member)]
    );
    assert_eq!(alice.ask("alice", create("team", &[])).await.status, pb::Status::Error as i32);
    assert!(refused(&bob.ask("bob", add("team", &["carol"], pb::Role::Member)).await));
    assert!(refused(&carol.ask("carol", add("team", &["carol"], pb::Role::Member)).await));
    // A user named twice is added once.
    let twice = alice.ask("alice", add("team", &["erin", "erin"], pb::Role::Member)).await;
    assert!(members(&twice).contains(&("erin".into(), pb::Role::Member)));
    let added = alice.ask("alice", add("team", &["carol"], pb::Role::Admin)).await;
    assert!(members(&added).contains(&("carol".into(), pb::Role::Admin)));
    // The admin adds members but not admins, removes members but not the owner.
    assert!(refused(&carol.ask("carol", add("team", &["erin"], pb::Role::Admin)).await));
    let with_dave = carol.ask("carol", add("team", &["dave"], pb::Role::Member)).await;
    assert!(members(&with_dave).contains(&("dave".into(), pb::Role::Member)));
    assert!(refused(&carol.ask("carol", remove("team", &["alice"])).await));
    assert!(refused(&bob.ask("bob", remove("team", &["dave"])).await));
    let without_dave = carol.ask("carol", remove("team", &["dave"])).await;
    assert!(!members(&without_dave).iter().any(|(uid, _)| uid == "dave"));

    // The owner leaves: the admin owns the group now.
    let leave = pb::request::Kind::GroupLeave(pb::GroupLeave { gid: "team".into() });
    assert_eq!(alice.ask("alice", request("leave", leave)).await.status, pb::Status::Ok as i32);
    let mine = carol
        .ask("carol", request("mine", pb::request::Kind::MyGroups(pb::MyGroups {})))
        .await;
    match mine.result {
        Some(pb::response::Result::Groups(list)) => {
            assert_eq!(list.groups.get("team"), Some(&(pb::Role::Owner as i32)));
        }
        other => panic!("expected my groups, got {other:?}"),
    }
    let list = pb::request::Kind::GroupMembers(pb::GroupMembers { gid: "team".into() });
    assert!(refused(&alice.ask("alice", request("list", list)).await));
}

/// Members online get a group message live on the group topic; a member offline finds it in
/// its digest and pulls it; a member added later does not get what was said before it
/// joined; non-members can neither subscribe, publish nor pull.
async fn fan_out_live_and_digest_offline(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, with_more_users).await;
    let (mut alice, _) = online(&broker, "alice").await;
    alice.ask("alice", create("team", &["bob", "carol"])).await;
    let (mut bob, _) = online(&broker, "bob").await;
    assert_eq!(bob.subscribe("im/g/team", 1).await, vec![1]);
    assert_eq!(alice.subscribe("im/g/team", 1).await, vec![1]);

    assert_eq!(alice.publish_acked("im/g/team", group_chat("g1", "team")).await, 0);
    assert_eq!(chat_seq(&bob.next_on("im/g/team").await), 1);
    // The sending device itself does not get its own message back.
    assert!(alice.quiet_for(Duration::from_millis(300)).await.is_none());

    let (mut carol, digest) = online(&broker, "carol").await;
    let session = &digest.sessions["g/team"];
    assert_eq!((session.count, session.unacked, session.max_seq), (1, 1, 1));
    assert_eq!(session.last_msgs.len(), 1);
    let pulled = page(&carol.ask("carol", pull("p", "g/team", 10, None)).await);
    assert_eq!(seqs(&pulled), vec![1]);

    // dave joins after the first message: his backlog starts after it.
    alice.ask("alice", add("team", &["dave"], pb::Role::Member)).await;
    assert_eq!(alice.publish_acked("im/g/team", group_chat("g2", "team")).await, 0);
    let (mut dave, digest) = online(&broker, "dave").await;
    let session = &digest.sessions["g/team"];
    assert_eq!((session.unacked, session.max_seq), (1, 2));
    let pulled = page(&dave.ask("dave", pull("p", "g/team", 10, None)).await);
    assert_eq!(seqs(&pulled), vec![2]);

    // erin is not a member.
    let (mut erin, digest) = online(&broker, "erin").await;
    assert!(!digest.sessions.contains_key("g/team"));
    assert_eq!(erin.subscribe("im/g/team", 1).await, vec![0x87]);
    assert_eq!(erin.publish_acked("im/g/team", group_chat("x", "team")).await, 0x87);
    assert!(refused(&erin.ask("erin", pull("p", "g/team", 10, None)).await));
    let history = pb::request::Kind::History(pb::History {
        conversation: "g/team".into(),
        before_seq: 0,
        page_size: 10,
    });
    assert!(refused(&erin.ask("erin", request("h", history)).await));
}

/// A member who read the newest 20 of 100 group messages and left gets the older 80 next
/// time: the hole is kept per device.
async fn newest_twenty_of_hundred_keeps_the_hole(backend: TestBackend) {
    let broker = TestBroker::start_on(backend).await;
    let (mut alice, _) = online(&broker, "alice").await;
    alice.ask("alice", create("team", &["bob"])).await;
    for i in 0..100 {
        let id = format!("m{i}");
        assert_eq!(alice.publish_acked("im/g/team", group_chat(&id, "team")).await, 0);
    }
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    let newest = page(&bob.ask("bob", pull("1", "g/team", 20, None)).await);
    assert_eq!(seqs(&newest), (81..=100).rev().collect::<Vec<_>>());
    let _ = bob.ask("bob", pull("2", "g/team", 1, newest.cursor)).await;
    bob.disconnect().await;

    let (mut bob, digest) = online(&broker, "bob").await;
    assert_eq!(digest.sessions["g/team"].unacked, 80);
    let rest = page(&bob.ask("bob", pull("3", "g/team", 200, None)).await);
    assert_eq!(seqs(&rest), (1..=80).rev().collect::<Vec<_>>());
    assert!(rest.end);
}

/// Receipts count the readers of each message from their read cursors; the online sender
/// gets batched updates (fewer than one per reader per message); a 1:1 peer's read reaches
/// its sender too.
async fn receipts_and_batched_updates(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, with_more_users).await;
    let (mut alice, _) = online(&broker, "alice").await;
    alice.ask("alice", create("team", &["bob", "carol", "dave"])).await;
    for id in ["r1", "r2", "r3"] {
        assert_eq!(alice.publish_acked("im/g/team", group_chat(id, "team")).await, 0);
    }
    let (mut bob, _) = online(&broker, "bob").await;
    let (mut carol, _) = online(&broker, "carol").await;
    let read = |seq: u64| {
        request(
            "read",
            pb::request::Kind::MarkRead(pb::MarkRead {
                conversation: "g/team".into(),
                seq,
            }),
        )
    };
    let marks = [(&mut bob, "bob", 1), (&mut carol, "carol", 3)];
    for (client, uid, seq) in marks {
        assert_eq!(client.ask(uid, read(seq)).await.status, pb::Status::Ok as i32);
    }
    assert_eq!(bob.ask("bob", read(2)).await.status, pb::Status::Ok as i32);

    // Updates: whose cursor moved, batched.
    let mut latest = std::collections::BTreeMap::new();
    let mut updates = 0;
    while latest.len() < 2 || latest.get("bob") != Some(&2) {
        let bytes = alice.next_on("im/u/alice/resp").await;
        let update = pb::Response::decode(bytes.as_slice()).unwrap();
        let Some(pb::response::Result::Receipts(list)) = update.result else {
            panic!("expected a receipt update, got {update:?}");
        };
        assert_eq!(list.conversation, "g/team");
        updates += 1;
        for read in list.reads {
            latest.insert(read.uid, read.read_seq);
        }
    }
    assert!(updates < 3, "{updates} updates for 3 cursor moves");
    assert_eq!(latest.into_iter().collect::<Vec<_>>(), vec![("bob".into(), 2), ("carol".into(), 3)]);

    let ask = pb::request::Kind::Receipts(pb::Receipts {
        conversation: "g/team".into(),
        seqs: vec![1, 2, 3, 9],
    });
    let answer = alice.ask("alice", request("rc", ask)).await;
    let Some(pb::response::Result::Receipts(list)) = answer.result else {
        panic!("expected receipts, got {answer:?}");
    };
    let counts: Vec<(u64, u32, Vec<String>)> = list
        .receipts
        .into_iter()
        .map(|r| {
            let mut readers = r.readers;
            readers.sort();
            (r.seq, r.read_count, readers)
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            (1, 2, vec!["bob".into(), "carol".into()]),
            (2, 2, vec!["bob".into(), "carol".into()]),
            (3, 1, vec!["carol".into()]),
        ]
    );

    // 1:1: bob reads alice's message; alice learns it on resp, named after bob.
    assert_eq!(alice.publish_acked("im/u/bob", chat("d1", "bob", "hi", false)).await, 0);
    let _ = bob.next_on("im/u/bob").await;
    let read_dm = pb::request::Kind::MarkRead(pb::MarkRead {
        conversation: "u/alice".into(),
        seq: 1,
    });
    assert_eq!(bob.ask("bob", request("rd", read_dm)).await.status, pb::Status::Ok as i32);
    let bytes = alice.next_on("im/u/alice/resp").await;
    let update = pb::Response::decode(bytes.as_slice()).unwrap();
    let Some(pb::response::Result::Receipts(list)) = update.result else {
        panic!("expected a receipt update, got {update:?}");
    };
    assert_eq!(list.conversation, "u/bob");
    assert_eq!(list.reads, vec![pb::ReadCursorOf { uid: "bob".into(), read_seq: 1 }]);

    // An offline sender learns reads from its next digest (conversations where the others'
    // read cursor moved since its last digest are listed) and by asking.
    alice.disconnect().await;
    let read_all = pb::request::Kind::MarkRead(pb::MarkRead {
        conversation: "g/team".into(),
        seq: 3,
    });
    assert_eq!(bob.ask("bob", request("ra", read_all)).await.status, pb::Status::Ok as i32);
    let (alice_again, digest) = online(&broker, "alice").await;
    assert_eq!(digest.sessions["g/team"].peer_read_seq, 3);
    assert_eq!(digest.sessions["u/bob"].peer_read_seq, 1);
    alice_again.disconnect().await;
    let (mut alice, digest) = online(&broker, "alice").await;
    assert!(digest.sessions.is_empty(), "nothing new: {digest:?}");
    let ask = pb::request::Kind::Receipts(pb::Receipts {
        conversation: "g/team".into(),
        seqs: vec![2],
    });
    alice.publish("im/u/alice/req", 1, request("rc2", ask)).await;
    // A batched receipt update (empty request_id) may come first on the same topic.
    let answer = loop {
        let response = alice.response("alice").await;
        if response.request_id == "rc2" {
            break response;
        }
    };
    let Some(pb::response::Result::Receipts(list)) = answer.result else {
        panic!("expected receipts, got {answer:?}");
    };
    assert_eq!(list.receipts[0].read_count, 2);
}

/// A member removed while connected stops receiving the group at once, and can no longer
/// publish to it or pull it.
async fn removed_member_is_cut_off_live(backend: TestBackend) {
    let broker = TestBroker::start_on(backend).await;
    let (mut alice, _) = online(&broker, "alice").await;
    alice.ask("alice", create("team", &["bob"])).await;
    let (mut bob, _) = online(&broker, "bob").await;
    assert_eq!(bob.subscribe("im/g/team", 1).await, vec![1]);
    assert_eq!(alice.publish_acked("im/g/team", group_chat("before", "team")).await, 0);
    assert_eq!(chat_seq(&bob.next_on("im/g/team").await), 1);

    assert!(!refused(&alice.ask("alice", remove("team", &["bob"])).await));
    assert_eq!(alice.publish_acked("im/g/team", group_chat("after", "team")).await, 0);
    let mut late = Vec::new();
    while let Some(seen) = bob.quiet_for(Duration::from_millis(500)).await {
        if let Seen::Publish { topic, .. } = seen {
            late.push(topic);
        }
    }
    assert!(!late.contains(&"im/g/team".to_owned()), "{late:?}");
    assert_eq!(bob.publish_acked("im/g/team", group_chat("x", "team")).await, 0x87);
    assert!(refused(&bob.ask("bob", pull("p", "g/team", 10, None)).await));
    // Subscribing again is refused too.
    assert_eq!(bob.subscribe("im/g/team", 1).await, vec![0x87]);
}
}

/// The Lua policy sees group messages with the group id.
#[tokio::test]
async fn policy_sees_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let script = script(
        dir.path(),
        "quiet.lua",
        r#"hooks = { on_message = function(msg)
             if msg.group == "quiet" and msg.chat_type == "group" then
               return false, "this group is read-only"
             end
             return true
           end }"#,
    );
    let broker = TestBroker::start_with(move |config| config.policy.scripts = vec![script]).await;
    let (mut alice, _) = online(&broker, "alice").await;
    alice.ask("alice", create("quiet", &["bob"])).await;
    alice.ask("alice", create("loud", &["bob"])).await;
    let (code, reason) = alice
        .publish_answered("im/g/quiet", group_chat("q", "quiet"))
        .await;
    assert_eq!(
        (code, reason.as_deref()),
        (0x87, Some("denied by policy: this group is read-only"))
    );
    assert_eq!(
        alice
            .publish_acked("im/g/loud", group_chat("l", "loud"))
            .await,
        0
    );
}

/// Rows in every table of the broker's database.
async fn rows(broker: &TestBroker) -> i64 {
    match &broker.backend {
        TestBackend::Embedded => {
            let db = rusqlite::Connection::open(broker.dir.path().join("im.db")).unwrap();
            let tables: Vec<String> = db
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
                .unwrap()
                .query_map([], |row| row.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            tables
                .iter()
                .map(|t| {
                    db.query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |row| {
                        row.get::<_, i64>(0)
                    })
                    .unwrap()
                })
                .sum()
        }
        TestBackend::Postgres(settings) => {
            let client = postgres_client(settings).await;
            let tables = client
                .query(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                    &[&settings.schema],
                )
                .await
                .unwrap();
            let mut total = 0;
            for table in tables {
                let name: String = table.get(0);
                let sql = format!("SELECT count(*) FROM {}.\"{name}\"", settings.schema);
                total += client.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0);
            }
            total
        }
    }
}

const BIG: usize = 10_000;

fn big_member(i: usize) -> String {
    format!("u{i:05}")
}

backend_tests! {
/// A 10,000-member group (members created in bulk through the store): one post writes O(1)
/// rows and does no per-member work; members online get it live, and every sampled member's
/// digest counts it.
async fn ten_thousand_members_one_post(backend: TestBackend) {
    let sampled = [0, BIG / 2, BIG - 1];
    let broker = TestBroker::start_with_on(backend, move |config| {
        for i in sampled {
            config.auth.users.insert(big_member(i), "pw".into());
        }
    })
    .await;
    let members: Vec<_> = (0..BIG).map(|i| uid(&big_member(i))).collect();
    let started = std::time::Instant::now();
    let big = group("big");
    broker.store.create_group(&big, &uid("alice"), &members).await.unwrap();
    eprintln!("created a group of {BIG} members in {:?}", started.elapsed());
    let live_member = big_member(sampled[0]);
    let mut live = Client::v5(broker.addr, "live-phone", &live_member).await;
    assert_eq!(live.subscribe("im/g/big", 1).await, vec![1]);
    let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    assert_eq!(alice.publish_acked("im/g/big", group_chat("warm-up", "big")).await, 0);
    let _ = live.next_on("im/g/big").await;
    // The warm-up's delivery acknowledgement written before counting starts.
    wait_for(|| store_calls(&broker, "ack") >= 1.0).await;

    let before = rows(&broker).await;
    let started = std::time::Instant::now();
    assert_eq!(alice.publish_acked("im/g/big", group_chat("hello", "big")).await, 0);
    let post = started.elapsed();
    assert_eq!(chat_seq(&live.next_on("im/g/big").await), 2);
    // Once the live member's delivery ack is written, count: one message row, plus at most
    // that ack (an acked range of an existing device is rewritten, not added).
    wait_for(|| store_calls(&broker, "ack") >= 2.0).await;
    let written = rows(&broker).await - before;
    assert!(written <= 2, "one post wrote {written} rows");

    for i in &sampled[1..] {
        let uid = big_member(*i);
        let mut member = Client::v5(broker.addr, &format!("{uid}-phone"), &uid).await;
        let started = std::time::Instant::now();
        member.subscribe(&format!("im/u/{uid}/#"), 1).await;
        let digest = member.digest(&uid).await;
        let took = started.elapsed();
        let session = &digest.sessions["g/big"];
        assert_eq!((session.count, session.unacked, session.max_seq), (2, 2, 2));
        eprintln!("{uid}: digest {took:?} after SUBSCRIBE");
    }
    // Every 50th member, through the store.
    for i in (0..BIG).step_by(50) {
        let device = mqtt_im::store::Device {
            uid: uid(&big_member(i)),
            client_id: "probe".into(),
        };
        let digest = broker.store.digest(&device, 3).await.unwrap();
        let state = digest
            .conversations
            .iter()
            .find(|c| c.conversation == big)
            .unwrap();
        assert_eq!((state.count, state.max_seq), (2, 2), "{device:?}");
    }
    eprintln!("one post to {BIG} members: PUBACK after {post:?}, {written} rows written");
}
}

backend_tests! {
/// An operator creates a group and removes a member from the command line; the running
/// broker cuts that member's live subscription off.
async fn operator_commands(backend: TestBackend) {
    let broker = TestBroker::start_on(backend).await;
    assert_eq!(operator(&broker, &["group", "create", "ops", "--owner", "alice", "bob"]), "created ops\n");
    assert_eq!(operator(&broker, &["group", "add", "ops", "carol", "--admin"]), "added carol\n");
    assert_eq!(
        operator(&broker, &["group", "members", "ops"]),
        "alice Owner read=0\ncarol Admin read=0\nbob Member read=0\n"
    );
    assert_eq!(operator(&broker, &["group", "of", "bob"]), "ops Member\n");
    let (mut alice, _) = online(&broker, "alice").await;
    let (mut bob, _) = online(&broker, "bob").await;
    assert_eq!(bob.subscribe("im/g/ops", 1).await, vec![1]);
    assert_eq!(alice.publish_acked("im/g/ops", group_chat("o1", "ops")).await, 0);
    assert_eq!(chat_seq(&bob.next_on("im/g/ops").await), 1);

    assert_eq!(operator(&broker, &["group", "remove", "ops", "bob"]), "removed bob\n");
    after_round(&broker, "removals").await;
    assert_eq!(alice.publish_acked("im/g/ops", group_chat("o2", "ops")).await, 0);
    while let Some(seen) = bob.quiet_for(Duration::from_millis(500)).await {
        if let Seen::Publish { topic, .. } = seen {
            assert_ne!(topic, "im/g/ops", "a removed member got a group message");
        }
    }
}
}
