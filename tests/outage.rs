//! PostgreSQL unreachable, then back: nothing is acknowledged that was not stored, the
//! broker keeps running, and retransmits land once.
mod common;

use std::time::Duration;

use common::*;
use mqtt_im::wire::pb;

/// While PostgreSQL is cut off, chat publishes get MQTT 5 PUBACK 0x80 (3.1.1: no PUBACK and
/// an error frame); once it is back the pool recovers and the same messages are stored once.
#[tokio::test]
async fn postgres_outage_refuses_then_recovers() {
    let Some(TestBackend::Postgres(mut settings)) = TestBackend::postgres() else {
        eprintln!("skipped: MQTT_IM_TEST_POSTGRES_URL is not set");
        return;
    };
    let target: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(target).await;
    settings.url = settings
        .url
        .replace("127.0.0.1:5432", &proxy.addr.to_string());
    settings.connect_timeout_ms = 500;
    let broker = TestBroker::start_on(TestBackend::Postgres(settings)).await;
    let mut v5 = Client::v5(broker.addr, "alice-5", "alice").await;
    assert_eq!(
        v5.publish_acked("im/u/bob", chat("before", "bob", "1", false))
            .await,
        0
    );

    proxy.down();
    let (code, reason) = v5
        .publish_answered("im/u/bob", chat("during", "bob", "2", false))
        .await;
    assert_eq!(code, 0x80, "{reason:?}");
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    v4.subscribe("im/u/alice/resp", 1).await;
    v4.publish("im/u/bob", 1, chat("during-4", "bob", "3", false))
        .await;
    let error = v4.response("alice").await.error.unwrap();
    assert_eq!(error.code, pb::ErrorCode::Unavailable as i32);
    // No PUBACK for the 3.1.1 publish that was not stored.
    assert!(matches!(
        v4.quiet_for(Duration::from_millis(300)).await,
        None | Some(Seen::Publish { .. })
    ));

    proxy.up();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let code = v5
            .publish_acked("im/u/bob", chat("during", "bob", "2", false))
            .await;
        if code == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "store did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        v5.publish_acked("im/u/bob", chat("during-4", "bob", "3", false))
            .await,
        0
    );
    assert_eq!(
        v5.publish_acked("im/u/bob", chat("during", "bob", "2", false))
            .await,
        0
    );
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
    let ids: Vec<&str> = page.messages.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids, vec!["during-4", "during", "before"]);
    assert_eq!(seqs(&page), vec![3, 2, 1]);
}
