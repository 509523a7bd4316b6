//! Limits over real connections: publish rate (MQTT 5 refused with quota exceeded and a
//! reason; 3.1.1 slowed down, nothing lost), devices per user (newest refused or oldest
//! closed), connections per listener (closed before any handshake).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crate::common::*;
use mqtt_im::config::DeviceOverflow;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn an_mqtt5_client_over_its_rate_is_told() {
    let broker = TestBroker::start_with(|c| {
        c.limits.publish_rate = 5;
        c.limits.publish_burst = 5;
        c.listeners.metrics = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut v5 = Client::v5(broker.addr, "fast", "alice").await;
    for i in 0..30 {
        v5.publish("plain/t", 1, format!("{i}").into_bytes()).await;
    }
    let (mut accepted, mut refused) = (0, 0);
    while accepted + refused < 30 {
        if let Seen::PubAck {
            reason,
            reason_string,
            ..
        } = v5.next().await
        {
            if reason == 0 {
                accepted += 1;
            } else {
                assert_eq!(reason, 0x97);
                assert_eq!(reason_string.as_deref(), Some("message rate too high"));
                refused += 1;
            }
        }
    }
    assert!(
        accepted >= 5 && refused >= 10,
        "{accepted} accepted, {refused} refused"
    );
    let (_, metrics) = http_get(broker.metrics.unwrap(), "/metrics").await;
    assert!(metrics.contains(&format!(
        "mqtt_im_limited_total{{limit=\"rate\"}} {refused}"
    )));
}

/// 3.1.1 cannot be told: the connection is read more slowly, and every message arrives.
#[tokio::test]
async fn a_mqtt311_client_over_its_rate_is_slowed_down() {
    let broker = TestBroker::start_with(|c| {
        c.limits.publish_rate = 20;
        c.limits.publish_burst = 1;
    })
    .await;
    let mut watcher = Client::v5(broker.addr, "watcher", "bob").await;
    watcher.subscribe("plain/#", 1).await;
    let v4 = Client::v4(broker.addr, "fast-4", "alice", 30).await;
    let started = Instant::now();
    for i in 0..40 {
        v4.publish("plain/t", 1, format!("{i}").into_bytes()).await;
    }
    let mut got = Vec::new();
    while got.len() < 40 {
        got.push(String::from_utf8(watcher.next_on("plain/t").await).unwrap());
    }
    assert_eq!(got, (0..40).map(|i| i.to_string()).collect::<Vec<_>>());
    // 39 publishes beyond the burst at 20 a second cannot pass in less than ~1.95 s.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn devices_per_user() {
    let broker = TestBroker::start_with(|c| c.limits.max_devices_per_user = 2).await;
    let _phone = Client::v5(broker.addr, "alice-phone", "alice").await;
    let _laptop = Client::v4(broker.addr, "alice-laptop", "alice", 30).await;
    let login = Some(("alice", "pw"));
    assert_eq!(
        raw_connect(broker.addr, true, "alice-tablet", true, login)
            .await
            .code,
        0x97
    );
    assert_eq!(
        raw_connect(broker.addr, false, "alice-tablet", true, login)
            .await
            .code,
        3
    );
    // A take-over of one of the two is no third device; other users are not affected.
    let _again = Client::v5(broker.addr, "alice-laptop", "alice").await;
    let _bob = Client::v5(broker.addr, "bob-phone", "bob").await;

    let broker = TestBroker::start_with(|c| {
        c.limits.max_devices_per_user = 1;
        c.limits.device_overflow = DeviceOverflow::DisconnectOldest;
    })
    .await;
    let mut old = Client::v5(broker.addr, "alice-old", "alice").await;
    let mut new = Client::v5(broker.addr, "alice-new", "alice").await;
    assert_eq!(old.disconnect_reason().await, 0x97);
    assert_eq!(new.subscribe("plain/x", 1).await, vec![1]);
}

#[tokio::test]
async fn connections_per_listener() {
    let broker = TestBroker::start_with(|c| c.limits.max_connections_per_listener = 2).await;
    let first = Client::v5(broker.addr, "c1", "alice").await;
    let _second = Client::v5(broker.addr, "c2", "alice").await;
    assert!(!admitted(&broker).await, "closed before any handshake");
    first.disconnect().await;
    eventually(|| admitted(&broker)).await;
}

/// Whether a new TCP connection is kept open (waiting for its CONNECT) rather than closed.
async fn admitted(broker: &TestBroker) -> bool {
    let mut stream = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await;
    read.is_err()
}

/// Over its bandwidth, even an MQTT 5 client is slowed down rather than refused.
#[tokio::test]
async fn bandwidth_slows_a_client_down() {
    let broker = TestBroker::start_with(|c| c.limits.publish_bytes_per_s = 100_000).await;
    let mut watcher = Client::v5(broker.addr, "watcher", "bob").await;
    watcher.subscribe("bulk/#", 1).await;
    let mut sender = Client::v5(broker.addr, "bulk", "alice").await;
    let started = Instant::now();
    for i in 0..30u8 {
        assert_eq!(sender.publish_acked("bulk/t", vec![i; 10_000]).await, 0);
    }
    for i in 0..30u8 {
        assert_eq!(watcher.next_on("bulk/t").await, vec![i; 10_000]);
    }
    // 300 kB at 100 kB/s with one second saved up cannot pass in less than ~2 s.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}
