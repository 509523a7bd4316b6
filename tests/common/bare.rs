//! Bare rumqttd 0.20, without the hook layer, for the tests that show what the hook layer
//! corrects: the same scenario runs on both and the outcomes differ.

use std::net::SocketAddr;

/// Starts bare rumqttd with one MQTT 5 listener (no authentication) and returns its address
/// once it accepts connections. The port is held (SO_REUSEADDR, not listening) until
/// rumqttd listens on it, so nothing else can take it in between.
pub async fn bare_rumqttd_v5() -> SocketAddr {
    let holder = tokio::net::TcpSocket::new_v4().unwrap();
    holder.set_reuseaddr(true).unwrap();
    holder.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = holder.local_addr().unwrap();
    let text = format!(
        r#"
id = 0
[router]
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 1048576
max_segment_count = 2
[v5.1]
name = "bare-v5"
listen = "{addr}"
next_connection_delay_ms = 0
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 65536
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bare.toml");
    std::fs::write(&path, text).unwrap();
    let mut config = mqtt_im::rumqttd_config::load(&path).unwrap();
    config.console = None;
    config.prometheus = None;
    std::thread::spawn(move || {
        if let Err(e) = rumqttd::Broker::new(config).start() {
            panic!("bare rumqttd stopped: {e}");
        }
    });
    crate::common::eventually(|| async move { tokio::net::TcpStream::connect(addr).await.is_ok() })
        .await;
    drop(holder);
    addr
}
