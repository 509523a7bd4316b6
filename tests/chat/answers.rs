//! Every request gets a documented answer (README "Answers"): malformed, unknown and foreign
//! conversations are told apart; an Ack says what it acknowledged; nothing internal leaks.

use crate::common::*;
use mqtt_im::wire::pb;

/// `(status, error code)` of a response; code 0 for OK.
fn outcome(response: &pb::Response) -> (i32, i32) {
    (
        response.status,
        response.error.as_ref().map_or(0, |e| e.code),
    )
}

const OK: (i32, i32) = (pb::Status::Ok as i32, 0);

fn error(code: pb::ErrorCode) -> (i32, i32) {
    (pb::Status::Error as i32, code as i32)
}

fn pull_of(conversation: &str) -> pb::request::Kind {
    pb::request::Kind::Pull(pb::Pull {
        conversation: conversation.into(),
        page_size: 10,
        ack: None,
    })
}

fn ack_of(conversation: &str, up_to: u64) -> pb::request::Kind {
    pb::request::Kind::Ack(pb::Ack {
        conversation: conversation.into(),
        up_to,
    })
}

fn read_of(conversation: &str, seq: u64) -> pb::request::Kind {
    pb::request::Kind::MarkRead(pb::MarkRead {
        conversation: conversation.into(),
        seq,
    })
}

fn history_of(conversation: &str) -> pb::request::Kind {
    pb::request::Kind::History(pb::History {
        conversation: conversation.into(),
        before_seq: 0,
        page_size: 10,
    })
}

fn receipts_of(conversation: &str) -> pb::request::Kind {
    pb::request::Kind::Receipts(pb::Receipts {
        conversation: conversation.into(),
        seqs: vec![1],
    })
}

backend_tests! {
/// The README's table of answers, request by request, case by case.
async fn each_case_gets_its_documented_answer(backend: TestBackend) {
    use pb::ErrorCode::{BadRequest, NotAuthorized, NotFound};
    let broker = TestBroker::start_on(backend).await;
    let mut carol = Client::v5(broker.addr, "carol-phone", "carol").await;
    let create = pb::request::Kind::GroupCreate(pb::GroupCreate {
        gid: "team".into(),
        members: vec!["bob".into()],
    });
    assert_eq!(outcome(&carol.ask("carol", request("c", create)).await), OK);
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    for i in 0..3 {
        let id = format!("m{i}");
        assert_eq!(bob.publish_acked("im/u/alice", chat(&id, "alice", &id, false)).await, 0);
    }
    let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    let cases: Vec<(&str, pb::request::Kind, (i32, i32))> = vec![
        ("pull, malformed name", pull_of("x/bob"), error(BadRequest)),
        ("pull, malformed uid", pull_of("u/b:c"), error(BadRequest)),
        ("pull, no such group", pull_of("g/nope"), error(NotFound)),
        ("pull, someone else's group", pull_of("g/team"), error(NotAuthorized)),
        ("pull, 1:1 without messages", pull_of("u/dave"), OK),
        ("history, no such group", history_of("g/nope"), error(NotFound)),
        ("history, someone else's group", history_of("g/team"), error(NotAuthorized)),
        ("history, 1:1 without messages", history_of("u/dave"), OK),
        ("ack, up_to 0", ack_of("u/bob", 0), error(BadRequest)),
        ("ack, 1:1 without messages", ack_of("u/dave", 1), error(NotFound)),
        ("ack, someone else's group", ack_of("g/team", 1), error(NotAuthorized)),
        ("mark read, past the last seq", read_of("u/bob", 99), error(BadRequest)),
        ("mark read, 1:1 without messages", read_of("u/dave", 1), error(NotFound)),
        ("mark read, no such group", read_of("g/nope", 1), error(NotFound)),
        ("receipts, someone else's group", receipts_of("g/team"), error(NotAuthorized)),
        ("receipts, 1:1 without messages", receipts_of("u/dave"), OK),
        (
            "clear counters, a version never sent",
            pb::request::Kind::ClearCounters(pb::ClearCounters { version: 999 }),
            error(NotFound),
        ),
    ];
    for (case, kind, expected) in cases {
        let response = alice.ask("alice", request(case, kind)).await;
        assert_eq!(response.request_id, case);
        assert_eq!(outcome(&response), expected, "{case}: {response:?}");
        if let Some(error) = &response.error {
            assert!(!error.message.contains("dm:") && !error.message.contains("g:"), "{case}: {}", error.message);
        }
    }
    // A request without a kind, and bytes that are no Request at all.
    let empty = pb::Request { request_id: "e".into(), kind: None };
    alice.publish("im/u/alice/req", 1, prost::Message::encode_to_vec(&empty)).await;
    assert_eq!(outcome(&alice.response("alice").await), error(BadRequest));
    alice.publish("im/u/alice/req", 1, vec![0xff, 0xff, 0xff]).await;
    assert_eq!(outcome(&alice.response("alice").await), error(BadRequest));
}

/// An Ack answers with the position it acknowledged: `up_to` clamped to the last seq.
async fn ack_reply_carries_the_acknowledged_position(backend: TestBackend) {
    let broker = TestBroker::start_on(backend).await;
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    for i in 0..3 {
        let id = format!("m{i}");
        assert_eq!(bob.publish_acked("im/u/alice", chat(&id, "alice", &id, false)).await, 0);
    }
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    for (up_to, acked) in [(2, 2), (99, 3)] {
        let response = alice.ask("alice", request("a", ack_of("u/bob", up_to))).await;
        match response.result {
            Some(pb::response::Result::Acked(ack)) => {
                assert_eq!((ack.conversation.as_str(), ack.seq), ("u/bob", acked));
            }
            other => panic!("expected Acked, got {other:?} ({:?})", response.error),
        }
    }
    let page = page(&alice.ask("alice", pull("p", "u/bob", 10, None)).await);
    assert!(page.messages.is_empty() && page.end);
}
}
