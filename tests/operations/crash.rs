//! Crash safety and graceful shutdown under load: senders publish acknowledged QoS 1 chat
//! messages while the broker process is killed with SIGKILL, or stopped with SIGTERM; after a
//! restart, every message whose PUBACK a sender saw is in the receiver's backlog exactly once.
//! A notification owed when the broker is killed is pushed once after the restart.
#![allow(clippy::unwrap_used)] // test support

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// The environment that puts the binary on `backend` (postgres with Redis beside it).
fn backend_env(backend: &TestBackend) -> Vec<(&'static str, String)> {
    match backend {
        TestBackend::Embedded => Vec::new(),
        TestBackend::Postgres(settings) => {
            let mut env = vec![
                ("MQTT_IM__STORE__BACKEND", "postgres".into()),
                ("MQTT_IM__STORE__POSTGRES__URL", settings.url.clone()),
                ("MQTT_IM__STORE__POSTGRES__SCHEMA", settings.schema.clone()),
            ];
            if let Some(redis) = redis_url() {
                env.push(("MQTT_IM__CLUSTER__REDIS_URL", redis));
                env.push((
                    "MQTT_IM__CLUSTER__KEY_PREFIX",
                    format!("test-{}", settings.schema),
                ));
            }
            env
        }
    }
}

const SENDERS: usize = 20;

/// One sender: publishes to bob one message at a time and records each id whose PUBACK
/// arrived, until the connection breaks.
async fn sender(addr: std::net::SocketAddr, n: usize, acked: Arc<Mutex<Vec<String>>>) {
    let mut options = MqttOptions::new(format!("sender-{n}"), "127.0.0.1", addr.port());
    options.set_credentials("alice", "pw");
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 10);
    for i in 0.. {
        let id = format!("s{n}-{i}");
        if client
            .publish(
                "im/u/bob",
                QoS::AtLeastOnce,
                false,
                chat(&id, "bob", &id, false),
            )
            .await
            .is_err()
        {
            return;
        }
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked.lock().unwrap().push(id);
                    break;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

/// How the broker is stopped in the middle of the load.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Kill,
    Terminate,
}

async fn stop_under_load(backend: TestBackend, stop: Stop) {
    let dir = tempfile::tempdir().unwrap();
    let env = backend_env(&backend);
    let (mut child, addr) = spawn_with(dir.path(), &env);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..SENDERS)
        .map(|n| tokio::spawn(sender(addr, n, Arc::clone(&acked))))
        .collect();
    // Stop once the load is well under way.
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked.lock().unwrap().len() < 500 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the load never got going"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match stop {
        Stop::Kill => {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        Stop::Terminate => {
            let status = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let exit = loop {
                if let Some(exit) = child.try_wait().unwrap() {
                    break exit;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "SIGTERM did not stop it"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert!(exit.success(), "stopped with {exit:?}");
        }
    }
    for sender in senders {
        let _ = tokio::time::timeout(WAIT, sender).await;
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();

    let (mut child, addr) = spawn_with(dir.path(), &env);
    let mut bob = Client::v4(addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    let session = bob.digest("bob").await.sessions["u/alice"].clone();
    let mut stored = Vec::new();
    let mut cursor = None;
    loop {
        let page = page(&bob.ask("bob", pull("p", "u/alice", 200, cursor)).await);
        stored.extend(page.messages.iter().map(|m| (m.seq, m.msg_id.clone())));
        if page.end {
            break;
        }
        cursor = page.cursor;
    }
    let ids: HashSet<&String> = stored.iter().map(|(_, id)| id).collect();
    let seqs: HashSet<u64> = stored.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(ids.len(), stored.len(), "a message is stored twice");
    assert_eq!(seqs.len(), stored.len(), "a seq is used twice");
    assert_eq!(session.max_seq, stored.len() as u64, "seqs have a gap");
    let lost: Vec<&String> = acked.iter().filter(|id| !ids.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost: {lost:?}",
        lost.len()
    );
    eprintln!(
        "{stop:?}: {} acknowledged before the stop, {} stored",
        acked.len(),
        stored.len()
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

backend_tests! {
/// SIGKILL in the middle of a load of acknowledged messages loses none of them and stores
/// none twice.
async fn kill_under_load_loses_no_acknowledged_message(backend: TestBackend) {
    stop_under_load(backend, Stop::Kill).await;
}

/// SIGTERM in the middle of the load: the broker finishes what is in flight, exits by itself
/// with success, and nothing acknowledged is lost or doubled.
async fn sigterm_under_load_stops_cleanly(backend: TestBackend) {
    stop_under_load(backend, Stop::Terminate).await;
}

/// A message stored (PUBACK seen) for an offline user with a pusher, then SIGKILL before the
/// push delay ran out: after the restart the notification goes out, once.
async fn a_push_owed_at_a_sigkill_is_sent_once_after_the_restart(backend: TestBackend) {
    let mut gateway = Gateway::start();
    let dir = tempfile::tempdir().unwrap();
    let mut env = backend_env(&backend);
    env.extend([
        ("MQTT_IM__PUSH__ALLOWED_URLS", gateway.url()),
        ("MQTT_IM__PUSH__DELAY", "1s".to_owned()),
        ("MQTT_IM__PUSH__COALESCE", "2s".to_owned()),
    ]);
    let (mut node, addr) = spawn_with(dir.path(), &env);
    register_and_leave(addr, "bob", "bob-phone", &gateway, "").await;
    let mut alice = Client::v4(addr, "alice-phone", "alice", 30).await;
    assert_eq!(alice.publish_acked("im/u/bob", chat("k1", "bob", "before the kill", false)).await, 0);
    node.kill().unwrap();
    node.wait().unwrap();
    gateway.none_within(Duration::from_millis(1500)).await;

    let (_node, _addr) = spawn_with(dir.path(), &env);
    let pushed = gateway.next().await;
    assert_eq!(pushed["counts"]["unread"], 1, "{pushed}");
    assert_eq!(pushed["room_id"], "u/alice");
    gateway.none_within(Duration::from_secs(3)).await;
}

/// SIGKILL while a gateway call is under way: after the claim runs out the restarted node
/// sends the notification again, with the same event id (a duplicate the gateway can
/// recognise, never a second notification).
async fn a_push_cut_off_by_a_sigkill_is_sent_again_with_its_id(backend: TestBackend) {
    let mut gateway = Gateway::start();
    let dir = tempfile::tempdir().unwrap();
    let mut env = backend_env(&backend);
    env.extend([
        ("MQTT_IM__PUSH__ALLOWED_URLS", gateway.url()),
        ("MQTT_IM__PUSH__DELAY", "0".to_owned()),
        ("MQTT_IM__PUSH__TIMEOUT", "500ms".to_owned()),
    ]);
    let (mut node, addr) = spawn_with(dir.path(), &env);
    register_and_leave(addr, "bob", "bob-phone", &gateway, "").await;
    gateway.hold(true).await;
    let mut alice = Client::v4(addr, "alice-phone", "alice", 30).await;
    assert_eq!(alice.publish_acked("im/u/bob", chat("k1", "bob", "cut off", false)).await, 0);
    let (handled, first) = gateway.next_seen().await;
    assert_eq!(handled, Handled::Held);
    node.kill().unwrap();
    node.wait().unwrap();
    gateway.hold(false).await;
    let (_node, _addr) = spawn_with(dir.path(), &env);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (handled, seen) = gateway.next_seen().await;
        assert_eq!(handled, Handled::Taken, "{seen}");
        ids.push(seen["event_id"].clone());
    }
    assert_eq!(ids, [first["event_id"].clone(), first["event_id"].clone()]);
    gateway.none_within(Duration::from_secs(2)).await;
}
}
