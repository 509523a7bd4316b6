//! Several mqtt-im nodes on one PostgreSQL and one Redis: live hand-over between nodes,
//! moving devices, a node killed with SIGKILL, and a flushed Redis; plain topics across
//! nodes in `plain`; offline push sent once per notification in `push`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use mqtt_im::config::Config;
use mqtt_im::wire::pb;

#[derive(Clone)]
struct Services {
    backend: TestBackend,
    redis: String,
    /// Whether `redis` names a Redis Cluster.
    redis_cluster: bool,
    prefix: String,
}

/// PostgreSQL and one Redis.
fn services() -> Option<Services> {
    with_redis(redis_url()?, false)
}

/// PostgreSQL and a Redis Cluster (MQTT_IM_TEST_REDIS_CLUSTER_URL: its seed URLs,
/// comma-separated; `.ci/run` starts one). Required when services are.
fn cluster_services() -> Option<Services> {
    let required = std::env::var("MQTT_IM_REQUIRE_SERVICES").as_deref() == Ok("1");
    match std::env::var("MQTT_IM_TEST_REDIS_CLUSTER_URL") {
        Ok(seeds) => with_redis(seeds, true),
        Err(_) if required => panic!("MQTT_IM_TEST_REDIS_CLUSTER_URL is not set"),
        Err(_) => None,
    }
}

fn with_redis(redis: String, redis_cluster: bool) -> Option<Services> {
    let backend = TestBackend::postgres()?;
    let TestBackend::Postgres(settings) = &backend else {
        return None;
    };
    let prefix = format!("test-{}", settings.schema);
    Some(Services {
        backend,
        redis,
        redis_cluster,
        prefix,
    })
}

/// Held shared by the scenarios on the test Redis Cluster, and alone by the one that cuts
/// every subscriber's connection there.
static REDIS_CLUSTER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A cluster scenario run twice: on one Redis (`redis`) and on a Redis Cluster
/// (`redis_cluster`).
macro_rules! on_each_redis {
    ($(#[$doc:meta])* async fn $name:ident($services:ident: Services) $body:block) => {
        $(#[$doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn scenario($services: crate::cluster::Services) $body

            #[tokio::test]
            async fn redis() {
                match crate::cluster::services() {
                    Some(services) => scenario(services).await,
                    None => eprintln!("skipped: PostgreSQL or Redis not configured"),
                }
            }

            #[tokio::test]
            async fn redis_cluster() {
                match crate::cluster::cluster_services() {
                    Some(services) => {
                        let _shared = crate::cluster::REDIS_CLUSTER.read().await;
                        scenario(services).await
                    }
                    None => eprintln!("skipped: PostgreSQL or a Redis Cluster not configured"),
                }
            }
        }
    };
}

mod plain;
mod push;
mod redis_cluster;
mod retained;
mod sessions;
mod shared;

fn node(services: &Services, id: &str) -> impl FnOnce(&mut Config) {
    let redis_cluster = services.redis_cluster;
    let (redis, prefix, id) = (
        services.redis.clone(),
        services.prefix.clone(),
        id.to_owned(),
    );
    move |config: &mut Config| {
        config.cluster.redis_url = redis;
        config.cluster.redis_cluster = redis_cluster;
        config.cluster.key_prefix = prefix;
        config.cluster.node_id = id;
        config.cluster.heartbeat = mqtt_im::config::Period::millis(100);
        config.cluster.node_ttl = mqtt_im::config::Period::millis(600);
    }
}

/// Nodes n1 and n2 on the same PostgreSQL and Redis, each following the cluster's channels.
async fn two_nodes(services: &Services) -> (TestBroker, TestBroker) {
    let n1 = TestBroker::start_with_on(services.backend.clone(), node(services, "n1")).await;
    let n2 = TestBroker::start_with_on(services.backend.clone(), node(services, "n2")).await;
    following(&n1).await;
    following(&n2).await;
    (n1, n2)
}

/// Waits until `broker` follows the cluster's channels: it loads the retained messages at
/// start and again once it follows them.
async fn following(broker: &TestBroker) {
    wait_for(|| rounds(broker, "retained_loads") >= 2.0).await;
}

/// A node in a process of its own (to be killed), on the test's PostgreSQL and Redis; with
/// its data folder.
fn spawn_node(services: &Services, id: &str) -> (Node, SocketAddr, tempfile::TempDir) {
    let TestBackend::Postgres(settings) = &services.backend else {
        unreachable!("cluster tests run on PostgreSQL");
    };
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("MQTT_IM__STORE__BACKEND", "postgres".to_string()),
        ("MQTT_IM__STORE__POSTGRES__URL", settings.url.clone()),
        ("MQTT_IM__STORE__POSTGRES__SCHEMA", settings.schema.clone()),
        ("MQTT_IM__CLUSTER__REDIS_URL", services.redis.clone()),
        (
            "MQTT_IM__CLUSTER__REDIS_CLUSTER",
            services.redis_cluster.to_string(),
        ),
        ("MQTT_IM__CLUSTER__KEY_PREFIX", services.prefix.clone()),
        ("MQTT_IM__CLUSTER__NODE_ID", id.to_string()),
        ("MQTT_IM__CLUSTER__HEARTBEAT", "100ms".to_string()),
        ("MQTT_IM__CLUSTER__NODE_TTL", "600ms".to_string()),
    ];
    let (node, addr) = spawn_with(dir.path(), &env);
    (node, addr, dir)
}

async fn wait_located(broker: &TestBroker, uid: &str, expected: &[(&str, &str)]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut found = broker.im.locate(uid).await.unwrap_or_default();
        found.sort();
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(c, n)| (c.to_string(), n.to_string()))
            .collect();
        if found == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{uid} at {found:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

on_each_redis! {
    /// A on node 1 sends to B on node 2: delivered live there; B moves to node 1 and its digest
    /// is right; a flushed Redis heals with the next heartbeat.
    async fn two_nodes_hand_over_and_share_state(services: Services) {
        let (n1, n2) = two_nodes(&services).await;
        let mut bob = Client::v4(n2.addr, "bob-phone", "bob", 30).await;
        bob.subscribe("im/u/bob/#", 1).await;
        let _ = bob.digest("bob").await;
        wait_located(&n1, "bob", &[("bob-phone", "n2")]).await;

        let mut alice = Client::v5(n1.addr, "alice-phone", "alice").await;
        assert_eq!(
            alice
                .publish_acked("im/u/bob", chat("x1", "bob", "across", false))
                .await,
            0
        );
        assert_eq!(chat_seq(&bob.next_on("im/u/bob").await), 1);

        // Redis loses everything of this deployment: presence comes back with the heartbeat.
        flush_deployment(&services).await;
        wait_located(&n1, "bob", &[("bob-phone", "n2")]).await;
        assert_eq!(
            alice
                .publish_acked("im/u/bob", chat("x2", "bob", "again", false))
                .await,
            0
        );
        assert_eq!(chat_seq(&bob.next_on("im/u/bob").await), 2);

        // B moves to node 1 while two messages arrive offline; its digest there is right.
        bob.disconnect().await;
        wait_located(&n1, "bob", &[]).await;
        assert_eq!(
            alice
                .publish_acked("im/u/bob", chat("x3", "bob", "3", false))
                .await,
            0
        );
        assert_eq!(
            alice
                .publish_acked("im/u/bob", chat("x4", "bob", "4", false))
                .await,
            0
        );
        let mut bob = Client::v4(n1.addr, "bob-phone", "bob", 30).await;
        bob.subscribe("im/u/bob/#", 1).await;
        let session = bob.digest("bob").await.sessions["u/alice"].clone();
        assert_eq!((session.count, session.unacked, session.max_seq), (2, 2, 4));
        let page = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
        assert_eq!(seqs(&page), vec![4, 3]);
    }
}

/// A node killed with SIGKILL stops counting as holding its users within the node TTL;
/// messages sent then are kept for the user's next connection.
#[tokio::test]
async fn killed_node_users_become_offline() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let n1 = TestBroker::start_with_on(services.backend.clone(), node(&services, "n1")).await;
    let (mut child, addr, _dir) = spawn_node(&services, "doomed");
    let mut bob = Client::v4(addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    wait_located(&n1, "bob", &[("bob-phone", "doomed")]).await;
    let mut alice = Client::v5(n1.addr, "alice-phone", "alice").await;
    child.kill().unwrap();
    child.wait().unwrap();
    drop(bob);
    // Dead, but its presence has not expired yet: the hand-over reaches no one, and says so.
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("d", "bob", "to the dead", false))
            .await,
        0
    );
    // The undelivered hand-over is counted.
    wait_for(|| metric(&n1, "mqtt_im_handovers_failed_total") >= 1.0).await;
    wait_located(&n1, "bob", &[]).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("k", "bob", "kept", false))
            .await,
        0
    );
    let mut bob = Client::v4(n1.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    assert_eq!(bob.digest("bob").await.sessions["u/alice"].count, 2);
}

/// With Redis unreachable, messages are still stored, delivered on the local node and counted
/// for the rest, and digests come from PostgreSQL; when Redis is back, presence is recorded
/// again by the heartbeat.
#[tokio::test]
async fn redis_outage_keeps_storing() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let Some(proxy) = redis_behind_proxy().await else {
        return;
    };
    let proxied = Services {
        redis: format!("redis://{}", proxy.addr),
        ..services
    };
    let n1 = TestBroker::start_with_on(proxied.backend.clone(), node(&proxied, "n1")).await;
    let mut bob = Client::v4(n1.addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    let _ = bob.digest("bob").await;
    wait_located(&n1, "bob", &[("bob-phone", "n1")]).await;

    proxy.down();
    let mut alice = Client::v5(n1.addr, "alice-phone", "alice").await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("r1", "bob", "local", false))
            .await,
        0
    );
    assert_eq!(chat_seq(&bob.next_on("im/u/bob").await), 1);
    let history = pb::request::Kind::History(pb::History {
        conversation: "u/alice".into(),
        before_seq: 0,
        page_size: 10,
    });
    let stored = page(&bob.ask("bob", request("h", history)).await);
    assert_eq!(seqs(&stored), vec![1]);
    // Digests are computed from PostgreSQL alone meanwhile: an offline user gets a message
    // counted, twice (the second time without waiting on Redis again).
    assert_eq!(
        alice
            .publish_acked("im/u/carol", chat("r2", "carol", "offline", false))
            .await,
        0
    );
    for _ in 0..2 {
        let mut carol = Client::v5(n1.addr, "carol-phone", "carol").await;
        carol.subscribe("im/u/carol/#", 1).await;
        let session = carol.digest("carol").await.sessions["u/alice"].clone();
        assert_eq!((session.count, session.unacked, session.max_seq), (1, 1, 1));
        assert_eq!(session.last_msgs.len(), 1);
        carol.disconnect().await;
    }
    // The node says it is degraded, and stops saying so when Redis is back.
    wait_for(|| metric(&n1, "mqtt_im_redis_up") == 0.0).await;

    proxy.up();
    wait_located(&n1, "bob", &[("bob-phone", "n1")]).await;
    wait_for(|| metric(&n1, "mqtt_im_redis_up") == 1.0).await;
}

/// Deletes every Redis key of this deployment: what FLUSHALL does to it, without disturbing
/// other tests that share the Redis server.
#[allow(clippy::unwrap_used)]
/// Deletes every key of the deployment; on a Redis Cluster also checks that its keys were
/// spread over more than one shard (the seeds are all of the test cluster's masters).
async fn flush_deployment(services: &Services) {
    let mut shards_used = 0;
    for url in services.redis.split(',') {
        let client = redis::Client::open(url).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", services.prefix))
            .query_async(&mut connection)
            .await
            .unwrap();
        shards_used += usize::from(!keys.is_empty());
        // One key per DEL: on a cluster, keys of several slots cannot go in one.
        for key in keys {
            let _: () = redis::cmd("DEL")
                .arg(key)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    }
    assert!(shards_used > 0, "the deployment wrote nothing to Redis");
    if services.redis_cluster {
        assert!(
            shards_used > 1,
            "every key of the deployment is on one shard"
        );
    }
}

async fn send_to_bob(from: &mut Client, id: &str) {
    assert_eq!(
        from.publish_acked("im/u/bob", chat(id, "bob", id, false))
            .await,
        0
    );
}

on_each_redis! {
    /// Counters and previews cached in Redis are lost mid-run (after a digest and its clear,
    /// between offline messages): the next digest is rebuilt from PostgreSQL and is exactly right.
    async fn flushed_cache_gives_a_correct_digest(services: Services) {
        let broker = TestBroker::start_with_on(services.backend.clone(), node(&services, "n1")).await;
        let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
        let mut carol = Client::v5(broker.addr, "carol-phone", "carol").await;
        for id in ["a1", "a2", "a3"] {
            send_to_bob(&mut alice, id).await;
        }
        send_to_bob(&mut carol, "c1").await;
        let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
        bob.subscribe("im/u/bob/#", 1).await;
        let first = bob.digest("bob").await;
        assert_eq!(first.sessions["u/alice"].count, 3);
        let clear = pb::request::Kind::ClearCounters(pb::ClearCounters {
            version: first.version,
        });
        assert_eq!(
            bob.ask("bob", request("c", clear)).await.status,
            pb::Status::Ok as i32
        );
        bob.disconnect().await;

        send_to_bob(&mut alice, "a4").await;
        send_to_bob(&mut alice, "a5").await;
        flush_deployment(&services).await;
        send_to_bob(&mut alice, "a6").await;

        let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
        bob.subscribe("im/u/bob/#", 1).await;
        let digest = bob.digest("bob").await;
        let from_alice = &digest.sessions["u/alice"];
        assert_eq!(
            (from_alice.count, from_alice.unacked, from_alice.max_seq),
            (3, 6, 6)
        );
        let previews: Vec<u64> = from_alice.last_msgs.iter().map(|m| m.seq).collect();
        assert_eq!(previews, vec![6, 5, 4]);
        let from_carol = &digest.sessions["u/carol"];
        assert_eq!((from_carol.count, from_carol.unacked), (0, 1));
        bob.disconnect().await;

        // Flushed again with nothing new: the rebuilt digest is the same.
        flush_deployment(&services).await;
        let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
        bob.subscribe("im/u/bob/#", 1).await;
        let again = bob.digest("bob").await;
        assert_eq!(again.sessions, digest.sessions);

        // Pages acknowledged after that: the cached counters no longer apply, and are not used.
        let newest = page(&bob.ask("bob", pull("p1", "u/alice", 2, None)).await);
        assert_eq!(seqs(&newest), vec![6, 5]);
        let older = page(
            &bob.ask("bob", pull("p2", "u/alice", 2, newest.cursor))
                .await,
        );
        assert_eq!(seqs(&older), vec![4, 3]);
        bob.disconnect().await;
        let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
        bob.subscribe("im/u/bob/#", 1).await;
        let from_alice = bob.digest("bob").await.sessions["u/alice"].clone();
        assert_eq!((from_alice.count, from_alice.unacked), (1, 4));
    }
}

/// A group message posted on node 1 reaches a member subscribed on node 2 live; removed on
/// node 1, that member is cut off on node 2 (through the removal log) and gets nothing more.
#[tokio::test]
async fn groups_span_nodes() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let (n1, n2) = two_nodes(&services).await;
    let mut alice = Client::v5(n1.addr, "alice-phone", "alice").await;
    let create = pb::request::Kind::GroupCreate(pb::GroupCreate {
        gid: "crew".into(),
        members: vec!["bob".into()],
    });
    alice.subscribe("im/u/alice/#", 1).await;
    let _ = alice.digest("alice").await;
    assert_eq!(
        alice.ask("alice", request("c", create)).await.status,
        pb::Status::Ok as i32
    );
    let mut bob = Client::v5(n2.addr, "bob-phone", "bob").await;
    assert_eq!(bob.subscribe("im/g/crew", 1).await, vec![1]);
    assert_eq!(
        alice
            .publish_acked("im/g/crew", group_chat("c1", "crew"))
            .await,
        0
    );
    assert_eq!(chat_seq(&bob.next_on("im/g/crew").await), 1);

    let remove = pb::request::Kind::GroupRemove(pb::GroupRemove {
        gid: "crew".into(),
        members: vec!["bob".into()],
    });
    assert_eq!(
        alice.ask("alice", request("r", remove)).await.status,
        pb::Status::Ok as i32
    );
    // Node 2 reads the removal log every removal_poll_ms.
    after_round(&n2, "removals").await;
    assert_eq!(
        alice
            .publish_acked("im/g/crew", group_chat("c2", "crew"))
            .await,
        0
    );
    while let Some(seen) = bob.quiet_for(Duration::from_millis(500)).await {
        if let Seen::Publish { topic, .. } = seen {
            assert_ne!(topic, "im/g/crew", "a removed member got a group message");
        }
    }
}

/// Alice on node 1 sends `count` messages to bob; bob's `receiver` gets every one live, in
/// order, with the seqs following `first`.
async fn all_live(alice: &mut Client, receiver: &mut Client, first: u64, count: u64) {
    for i in 0..count {
        let id = format!("t{}", first + i);
        assert_eq!(
            alice
                .publish_acked("im/u/bob", chat(&id, "bob", &id, false))
                .await,
            0
        );
    }
    for seq in first..first + count {
        assert_eq!(chat_seq(&receiver.next_on("im/u/bob").await), seq);
    }
}

/// The same client id connects to node 2 while its connection on node 1 is alive: node 1
/// closes it (MQTT 5: DISCONNECT 0x8E), presence names node 2 only, and every live message
/// goes to the new connection.
#[tokio::test]
async fn a_client_id_connected_twice_across_nodes_is_taken_over() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let (n1, n2) = two_nodes(&services).await;
    let mut old = Client::v5(n1.addr, "bob-phone", "bob").await;
    old.subscribe("im/u/bob/#", 1).await;
    wait_located(&n2, "bob", &[("bob-phone", "n1")]).await;

    let mut new = Client::v5(n2.addr, "bob-phone", "bob").await;
    new.subscribe("im/u/bob/#", 1).await;
    loop {
        if let Seen::Disconnect { reason } = old.next().await {
            assert_eq!(reason, 0x8E);
            break;
        }
    }
    wait_located(&n1, "bob", &[("bob-phone", "n2")]).await;
    let mut alice = Client::v5(n1.addr, "alice-phone", "alice").await;
    all_live(&mut alice, &mut new, 1, 40).await;
    // Heartbeats of node 1 do not take the device back.
    after_round(&n1, "heartbeat").await;
    wait_located(&n1, "bob", &[("bob-phone", "n2")]).await;
    all_live(&mut alice, &mut new, 41, 10).await;
}

/// The device moved to node 2 while its node 1 connection is half-open (open, silent: a
/// phone that lost its network): node 1 drops it when node 2 claims the client id, and all
/// live messages reach the device's current connection.
#[tokio::test]
async fn a_device_that_moved_while_half_open_gets_everything_on_its_new_node() {
    let Some(services) = services() else {
        eprintln!("skipped: PostgreSQL or Redis not configured");
        return;
    };
    let (n1, n2) = two_nodes(&services).await;
    let link = Proxy::start(n1.addr).await;
    let mut old = Client::v5(link.addr, "bob-phone", "bob").await;
    old.subscribe("im/u/bob/#", 1).await;
    wait_located(&n2, "bob", &[("bob-phone", "n1")]).await;
    link.stall();

    let mut new = Client::v5(n2.addr, "bob-phone", "bob").await;
    new.subscribe("im/u/bob/#", 1).await;
    wait_located(&n1, "bob", &[("bob-phone", "n2")]).await;
    // Node 1 drops its stale connection.
    wait_for(|| n1.im.online_counts() == (0, 0)).await;
    let mut alice = Client::v5(n1.addr, "alice-phone", "alice").await;
    all_live(&mut alice, &mut new, 1, 40).await;
}
