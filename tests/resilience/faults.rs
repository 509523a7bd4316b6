//! Backends that stall or vanish: a silent partition to PostgreSQL gets an answer within the
//! call deadline and heals by itself; Redis down at start-up or stalled later costs only Redis
//! work. Each fault is made by a TCP proxy the test controls, on the PostgreSQL + Redis backend.

use std::time::{Duration, Instant};

use crate::common::*;

/// The store call deadline the tests configure.
const CALL_TIMEOUT: Duration = Duration::from_millis(1000);
/// What an answer may take beyond its deadline on a loaded test machine.
const SLACK: Duration = Duration::from_millis(1500);

/// PostgreSQL through a proxy, with a short call deadline.
async fn postgres_behind() -> Option<(Proxy, TestBackend)> {
    let (proxy, mut settings) = postgres_behind_proxy().await?;
    settings.call_timeout = mqtt_im::config::Period(CALL_TIMEOUT);
    Some((proxy, TestBackend::Postgres(settings)))
}

/// Redis through a proxy, beside the test PostgreSQL.
async fn redis_behind() -> Option<(Proxy, TestBackend)> {
    let backend = TestBackend::postgres()?;
    Some((redis_behind_proxy().await?, backend))
}

/// Publishes until the store takes it again (PUBACK 0).
async fn publish_until_stored(client: &mut Client, msg_id: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while client
        .publish_acked("im/u/bob", chat(msg_id, "bob", msg_id, false))
        .await
        != 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "store did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A silent partition (connections open, nothing passes): every MQTT 5 publish gets PUBACK
/// 0x80 within the call deadline, pooled connections left hanging are discarded, and once
/// PostgreSQL is reachable again the retransmissions are stored exactly once.
#[tokio::test]
async fn postgres_stall_is_answered_within_the_deadline_then_heals() {
    let Some((proxy, backend)) = postgres_behind().await else {
        return;
    };
    let broker = TestBroker::start_on(backend).await;
    let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("before", "bob", "1", false))
            .await,
        0
    );

    proxy.stall();
    for msg_id in ["stalled-1", "stalled-2", "stalled-3"] {
        let started = Instant::now();
        let (code, reason) = alice
            .publish_answered("im/u/bob", chat(msg_id, "bob", msg_id, false))
            .await;
        let took = started.elapsed();
        assert_eq!(code, 0x80, "{reason:?}");
        assert!(
            took < CALL_TIMEOUT + SLACK,
            "{msg_id} answered after {took:?}"
        );
        let reason = reason.unwrap_or_default();
        assert_eq!(reason.matches("unavailable").count(), 1, "{reason}");
    }

    proxy.up();
    for msg_id in ["stalled-1", "stalled-2", "stalled-3"] {
        publish_until_stored(&mut alice, msg_id).await;
    }
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
    let mut ids: Vec<&str> = page.messages.iter().map(|m| m.msg_id.as_str()).collect();
    ids.reverse();
    assert_eq!(ids, vec!["before", "stalled-1", "stalled-2", "stalled-3"]);
    assert_eq!(seqs(&page), vec![4, 3, 2, 1]);
}

/// Redis behind a proxy, as the cluster bus and digest cache of a PostgreSQL node.
fn with_redis(proxy: &Proxy, node: &str) -> impl FnOnce(&mut mqtt_im::config::Config) {
    let (url, node) = (format!("redis://{}", proxy.addr), node.to_owned());
    move |config| {
        config.cluster.redis_url = url;
        config.cluster.node_id = node;
        config.cluster.heartbeat = mqtt_im::config::Period::millis(100);
        config.cluster.node_ttl = mqtt_im::config::Period::millis(600);
        config.cluster.redis_timeout = mqtt_im::config::Period::millis(300);
    }
}

/// Live chat between two local devices, acknowledged and delivered.
async fn chat_live(alice: &mut Client, bob: &mut Client, msg_id: &str) {
    let started = Instant::now();
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat(msg_id, "bob", msg_id, false))
            .await,
        0
    );
    assert!(
        started.elapsed() < SLACK,
        "PUBACK after {:?}",
        started.elapsed()
    );
    let delivered = bob.next_on("im/u/bob").await;
    assert!(chat_seq(&delivered) > 0);
}

/// A node starts while Redis is unreachable and serves its own clients; it joins the cluster
/// when Redis comes; a later silent Redis partition costs only Redis calls, each bounded.
#[tokio::test]
async fn redis_down_at_start_then_stalled_costs_only_redis_work() {
    let Some((proxy, backend)) = redis_behind().await else {
        return;
    };
    proxy.down();
    let broker = TestBroker::start_with_on(backend, with_redis(&proxy, "n-faults")).await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
    chat_live(&mut alice, &mut bob, "while-down").await;

    proxy.up();
    let joined = ("bob-phone".to_owned(), "n-faults".to_owned());
    eventually(|| async {
        let found = broker.im.locate("bob").await.unwrap_or_default();
        found.contains(&joined)
    })
    .await;

    proxy.stall();
    let started = Instant::now();
    assert!(broker.im.locate("bob").await.is_err());
    assert!(
        started.elapsed() < SLACK,
        "locate took {:?}",
        started.elapsed()
    );
    chat_live(&mut alice, &mut bob, "while-stalled").await;
    let mut late = Client::v5(broker.addr, "carol-phone", "carol").await;
    assert_eq!(
        late.publish_acked("im/u/bob", chat("c1", "bob", "hi", false))
            .await,
        0
    );

    // The stalled connections stay dead; the node reconnects and is in the cluster again.
    proxy.up();
    eventually(|| async { broker.im.locate("bob").await.is_ok() }).await;
}

/// Local work does not wait for a stalled Redis: acknowledgements of live deliveries are
/// written, and a member an operator removes (in the store, as `mqtt-im group remove` does)
/// is cut off by the removal poll, while every Redis call hangs.
#[tokio::test]
async fn acks_and_removals_go_on_while_redis_is_stalled() {
    let Some((proxy, backend)) = redis_behind().await else {
        return;
    };
    let broker = TestBroker::start_with_on(backend, with_redis(&proxy, "n-local")).await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
    let group = mqtt_im::wire::pb::request::Kind::GroupCreate(mqtt_im::wire::pb::GroupCreate {
        gid: "ops".into(),
        members: vec!["bob".into()],
    });
    assert!(alice
        .ask("alice", request("create", group))
        .await
        .error
        .is_none());
    assert_eq!(bob.subscribe("im/g/ops", 1).await, vec![1]);

    proxy.stall();
    // A live delivery's acknowledgement is written: a new device of bob's starts past it.
    let acks = store_calls(&broker, "ack");
    chat_live(&mut alice, &mut bob, "acked-live").await;
    wait_for(|| store_calls(&broker, "ack") > acks).await;
    let mut tablet = Client::v5(broker.addr, "bob-tablet", "bob").await;
    let unacked = page(&tablet.ask("bob", pull("p", "u/alice", 10, None)).await);
    assert!(
        unacked.messages.is_empty(),
        "ack not written: {:?}",
        seqs(&unacked)
    );

    // A removal made in the store is applied by the node within its poll interval.
    let removed = broker
        .store
        .remove_members(&crate::common::group("ops"), &[uid("bob")])
        .await
        .unwrap();
    assert_eq!(removed, vec![uid("bob")]);
    after_round(&broker, "removals").await;
    assert_eq!(
        alice
            .publish_acked("im/g/ops", group_chat("g1", "ops"))
            .await,
        0
    );
    while let Some(seen) = bob.quiet_for(Duration::from_millis(500)).await {
        if let Seen::Publish { topic, .. } = seen {
            assert_ne!(topic, "im/g/ops", "a removed member got a group message");
        }
    }
}

/// Operator commands that do not need Redis do not wait for it: `mqtt-im group create` on a
/// deployment whose Redis is unreachable answers within a connection time-out or two.
#[tokio::test]
async fn operator_commands_run_while_redis_is_down() {
    let Some((proxy, TestBackend::Postgres(settings))) = redis_behind().await else {
        return;
    };
    proxy.down();
    let started = Instant::now();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
        .args(["group", "create", "ops", "--owner", "alice", "bob"])
        .env("MQTT_IM__STORE__BACKEND", "postgres")
        .env("MQTT_IM__STORE__POSTGRES__URL", &settings.url)
        .env("MQTT_IM__STORE__POSTGRES__SCHEMA", &settings.schema)
        .env(
            "MQTT_IM__CLUSTER__REDIS_URL",
            format!("redis://{}", proxy.addr),
        )
        // The old millisecond spelling of cluster.redis_timeout, still read.
        .env("MQTT_IM__CLUSTER__REDIS_TIMEOUT_MS", "300")
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "created ops\n");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}
