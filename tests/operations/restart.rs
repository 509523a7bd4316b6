//! The binary, killed with SIGKILL and restarted on the same data folder, loses no
//! acknowledged message.
#![allow(clippy::unwrap_used)] // the spawn helper is test support

use std::process::Command;

use crate::common::*;

/// The environment that puts the binary on `backend`.
fn backend_env(backend: &TestBackend) -> Vec<(&'static str, String)> {
    match backend {
        TestBackend::Embedded => Vec::new(),
        TestBackend::Postgres(settings) => vec![
            ("MQTT_IM__STORE__BACKEND", "postgres".into()),
            ("MQTT_IM__STORE__POSTGRES__URL", settings.url.clone()),
            ("MQTT_IM__STORE__POSTGRES__SCHEMA", settings.schema.clone()),
        ],
    }
}

backend_tests! {
/// Every PUBACKed message survives kill -9 and is pulled exactly once after restart.
async fn acknowledged_messages_survive_kill_and_restart(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let env = backend_env(&backend);
    let (mut child, addr) = spawn_with(dir.path(), &env);
    let mut alice = Client::v4(addr, "alice-phone", "alice", 30).await;
    for i in 0..50 {
        let id = format!("m{i}");
        assert_eq!(
            alice
                .publish_acked("im/u/bob", chat(&id, "bob", &id, false))
                .await,
            0
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(alice);

    let (mut child, addr) = spawn_with(dir.path(), &env);
    let mut bob = Client::v4(addr, "bob-phone", "bob", 30).await;
    bob.subscribe("im/u/bob/#", 1).await;
    assert_eq!(bob.digest("bob").await.sessions["u/alice"].count, 50);
    let page = page(&bob.ask("bob", pull("p", "u/alice", 100, None)).await);
    let mut ids: Vec<String> = page.messages.iter().map(|m| m.msg_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50);
    assert_eq!(seqs(&page), (1..=50).rev().collect::<Vec<_>>());
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A clean in-process stop (shutdown token) followed by a start keeps everything too.
async fn graceful_restart_keeps_messages(backend: TestBackend) {
    let broker = TestBroker::start_on(backend).await;
    let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    for i in 0..5 {
        let id = format!("g{i}");
        assert_eq!(
            alice
                .publish_acked("im/u/bob", chat(&id, "bob", &id, false))
                .await,
            0
        );
    }
    let (dir, backend) = broker.stop().await;
    // MQTT 5 clients are told why: Server shutting down.
    assert_eq!(alice.disconnect_reason().await, 0x8B);
    let broker = TestBroker::start_in(dir, backend).await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
    assert_eq!(page.messages.len(), 5);
}

}

/// SIGHUP reloads the policy scripts of a running binary (file polling is off here).
#[tokio::test]
async fn sighup_reloads_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let gate = script(
        dir.path(),
        "gate.lua",
        "hooks = { on_message = function() return false, 'closed' end }",
    );
    let (mut child, addr) = spawn_with(
        dir.path(),
        &[
            ("MQTT_IM__POLICY__SCRIPTS", gate.display().to_string()),
            ("MQTT_IM__POLICY__RELOAD_INTERVAL", "0".into()),
        ],
    );
    let mut alice = Client::v5(addr, "alice-phone", "alice").await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("1", "bob", "a", false))
            .await,
        0x87
    );
    std::fs::write(&gate, "hooks = { on_message = function() return true end }").unwrap();
    // A window for nothing to happen: file checks are off, so nothing may reload the script.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("2", "bob", "b", false))
            .await,
        0x87
    );
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let id = format!("try-{}", deadline.elapsed().as_nanos());
        if alice
            .publish_acked("im/u/bob", chat(&id, "bob", "c", false))
            .await
            == 0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
