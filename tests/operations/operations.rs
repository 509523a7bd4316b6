//! What operators see: Prometheus metrics and the status endpoint after a real IM flow, and
//! the `mqtt-im stats` command against a running node.

use crate::common::*;

backend_tests! {
/// Two offline messages, a refused one, a digest, a pull of two and a live delivery move the
/// matching counters; `/status` shows who is online and what the store holds.
async fn metrics_follow_the_im_flow(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, |config| {
        config.listeners.metrics = "127.0.0.1:0".parse().ok();
    })
    .await;
    let endpoint = broker.metrics.unwrap();
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    for id in ["m1", "m2"] {
        assert_eq!(alice.publish_acked("im/u/bob", chat(id, "bob", "hi", false)).await, 0);
    }
    // A 3.1.1 client gets its PUBACK (and an error frame) for a refused message.
    assert_eq!(alice.publish_acked("im/u/bob", b"not protobuf".to_vec()).await, 0);
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;
    bob.subscribe("im/u/bob/#", 1).await;
    let _ = bob.digest("bob").await;
    assert_eq!(seqs(&page(&bob.ask("bob", pull("p1", "u/alice", 10, None)).await)), vec![2, 1]);
    assert_eq!(alice.publish_acked("im/u/bob", chat("m3", "bob", "live", false)).await, 0);
    let _ = bob.next_on("im/u/bob").await;

    let (status, text) = http_get(endpoint, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let all = samples(&text);
    assert_eq!(sample(&all, r#"mqtt_im_messages_received_total{chat="direct"}"#), 4.0);
    assert_eq!(sample(&all, r#"mqtt_im_messages_stored_total{chat="direct"}"#), 3.0);
    assert_eq!(sample(&all, r#"mqtt_im_messages_refused_total{reason="invalid"}"#), 1.0);
    assert_eq!(sample(&all, "mqtt_im_messages_offline_total"), 2.0);
    assert_eq!(sample(&all, "mqtt_im_deliveries_live_total"), 1.0);
    assert_eq!(sample(&all, "mqtt_im_digests_sent_total"), 1.0);
    assert_eq!(sample(&all, "mqtt_im_pulls_total"), 1.0);
    assert_eq!(sample(&all, "mqtt_im_pull_page_messages_sum"), 2.0);
    assert_eq!(sample(&all, r#"mqtt_im_policy_verdicts_total{hook="message",verdict="allow"}"#), 3.0);
    assert_eq!(sample(&all, r#"mqtt_im_policy_verdicts_total{hook="connect",verdict="allow"}"#), 2.0);
    assert_eq!(sample(&all, r#"mqtt_im_connections{listener="mqtt",protocol="3.1.1"}"#), 1.0);
    assert_eq!(sample(&all, r#"mqtt_im_connections{listener="mqtt",protocol="5"}"#), 1.0);
    assert_eq!(sample(&all, r#"mqtt_im_store_seconds_count{op="append"}"#), 3.0);
    assert!(sample(&all, r#"mqtt_im_store_seconds_sum{op="append"}"#) > 0.0);
    assert_eq!(sample(&all, r#"mqtt_im_store_seconds_count{op="pull"}"#), 1.0);
    assert_eq!(sample(&all, "mqtt_im_online_users"), 1.0);
    assert!(text.contains("# HELP mqtt_im_store_seconds Store call latency"), "{text}");

    let (status, json) = http_get(endpoint, "/status").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(json.contains("\"online_users\": 1"), "{json}");
    assert!(json.contains("\"online_devices\": 1"), "{json}");
    assert!(json.contains("\"messages\": 3"), "{json}");
    assert!(json.contains("\"devices\": 2"), "{json}");
    assert!(json.contains("\"mqtt\": 2"), "{json}");

    bob.disconnect().await;
    wait_for(|| broker.im.online_devices("bob").is_empty()).await;
    let all = samples(&http_get(endpoint, "/metrics").await.1);
    assert_eq!(sample(&all, "mqtt_im_online_devices"), 0.0);
    assert_eq!(http_get(endpoint, "/nope").await.0, "HTTP/1.1 404 Not Found");
}
}

/// `mqtt-im stats` prints the running node's status.
#[tokio::test]
async fn stats_command_asks_the_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let env = [("MQTT_IM__LISTENERS__METRICS", metrics.clone())];
    let (mut child, addr) = spawn_with(dir.path(), &env);
    let mut alice = Client::v4(addr, "alice-phone", "alice", 30).await;
    alice.subscribe("im/u/alice/#", 1).await;
    let _ = alice.digest("alice").await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("m1", "bob", "hi", false))
            .await,
        0
    );

    let stats = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
            .arg("stats")
            .env("MQTT_IM__LISTENERS__METRICS", &metrics)
            .output()
    };
    let output = stats().await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains("\"online_users\": 1"), "{printed}");
    assert!(printed.contains("\"messages\": 1"), "{printed}");
    assert!(printed.contains("\"backend\": \"embedded\""), "{printed}");

    let refused = stats().await.unwrap();
    assert!(!refused.status.success(), "nothing runs there any more");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no mqtt-im answers"));
}
