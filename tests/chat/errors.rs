//! No internal text reaches a client: when the database fails under a running broker, MQTT
//! 5 and 3.1.1 clients get a stable code and a fixed message with an id to quote, never the
//! database's own words; a broken constraint is not reported as an outage to retry.

use crate::common::*;
use mqtt_im::wire::pb;

/// Words of SQLite's and PostgreSQL's own error texts, and of the schema.
const INTERNAL: [&str; 8] = [
    "sqlite", "postgres", "relation", "table", "messages", "no such", "SQL", "syntax",
];

fn assert_clean(message: &str, expected: &str) {
    for word in INTERNAL {
        assert!(!message.contains(word), "{word:?} leaked: {message}");
    }
    assert!(message.contains(expected), "{message}");
    let id = message
        .rsplit("(error ")
        .next()
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_default();
    assert!(
        id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "no error id in {message}"
    );
}

backend_tests! {
/// The messages table is gone: a send is answered UNAVAILABLE (MQTT 5 PUBACK 0x80 with a
/// clean reason; 3.1.1 gets no PUBACK, so it retransmits, and a clean error frame), and so
/// is a Pull.
async fn a_failing_database_is_reported_without_its_words(backend: TestBackend) {
    let broker = TestBroker::start_on(backend).await;
    let mut v5 = Client::v5(broker.addr, "alice-5", "alice").await;
    assert_eq!(v5.publish_acked("im/u/bob", chat("ok", "bob", "ok", false)).await, 0);
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    v4.subscribe("im/u/alice/#", 1).await;
    let _ = v4.digest("alice").await;
    run_sql(
        &broker,
        "ALTER TABLE messages RENAME TO messages_gone",
        "ALTER TABLE messages RENAME TO messages_gone",
    )
    .await;
    let (code, reason) = v5.publish_answered("im/u/bob", chat("m1", "bob", "x", false)).await;
    assert_eq!(code, 0x80);
    assert_clean(&reason.unwrap(), "unavailable, retry later");

    v4.publish("im/u/bob", 1, chat("m2", "bob", "x", false)).await;
    let frame = v4.response("alice").await.error.unwrap();
    assert_eq!(frame.code, pb::ErrorCode::Unavailable as i32);
    assert_clean(&frame.message, "unavailable, retry later");
    // Then the 3.1.1 connection closes, so that the client reconnects and retransmits.
    v4.closed().await;
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    v4.subscribe("im/u/alice/resp", 1).await;

    let history = pb::request::Kind::History(pb::History {
        conversation: "u/bob".into(),
        before_seq: 0,
        page_size: 10,
    });
    let response = v4.ask("alice", request("h", history)).await;
    let error = response.error.unwrap();
    assert_eq!(error.code, pb::ErrorCode::Unavailable as i32);
    assert_clean(&error.message, "unavailable, retry later");
}

/// A write the database refuses by a rule of its schema (here a trigger raising a
/// constraint error) is INTERNAL, not UNAVAILABLE: a 3.1.1 client gets its PUBACK and an
/// error frame instead of retransmitting for ever.
async fn a_refused_write_is_not_an_outage_to_retry(backend: TestBackend) {
    let broker = TestBroker::start_on(backend).await;
    run_sql(
        &broker,
        "CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation'; END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .await;
    let mut v5 = Client::v5(broker.addr, "alice-5", "alice").await;
    let (code, reason) = v5.publish_answered("im/u/bob", chat("m1", "bob", "x", false)).await;
    assert_eq!(code, 0x80);
    assert_clean(&reason.unwrap(), "internal error");

    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    v4.subscribe("im/u/alice/#", 1).await;
    let _ = v4.digest("alice").await;
    assert_eq!(v4.publish_acked("im/u/bob", chat("m2", "bob", "x", false)).await, 0);
    let frame = v4.response("alice").await.error.unwrap();
    assert_eq!(frame.code, pb::ErrorCode::Internal as i32);
    assert_clean(&frame.message, "internal error");
}
}
