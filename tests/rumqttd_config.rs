//! A team's unchanged `rumqttd.toml`: the sample that ships with the rumqttd crate starts
//! behind the hook layer, and clients meet the same credentials and limits on each listener
//! as on bare rumqttd run from the same file in the same test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::*;
use mqtt_im::{Builder, Config, Handle};

/// The sample `rumqttd.toml` that ships with the rumqttd crate (found through `cargo
/// metadata`, for this host's dependencies only: nothing to download).
fn shipped_sample() -> String {
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .unwrap();
    let version = String::from_utf8(rustc.stdout).unwrap();
    let host = version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .unwrap();
    let metadata = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "{}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let rumqttd = json["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|package| package["name"] == "rumqttd")
        .expect("rumqttd among the dependencies");
    let manifest = Path::new(rumqttd["manifest_path"].as_str().unwrap());
    std::fs::read_to_string(manifest.with_file_name("rumqttd.toml")).unwrap()
}

/// The sample with every `listen` address on loopback, at the port `port` gives.
fn on_loopback(sample: &str, mut port: impl FnMut() -> u16) -> String {
    let lines = sample.lines().map(|line| {
        let active = !line.trim_start().starts_with('#');
        match line.split_once("listen = ") {
            Some((indent, _)) if active => format!("{indent}listen = \"127.0.0.1:{}\"", port()),
            _ => line.to_owned(),
        }
    });
    lines.collect::<Vec<_>>().join("\n")
}

/// The sample's own commented-out credentials for `v4.1`, switched on.
fn with_v4_auth(sample: &str) -> String {
    let commented = " #   auth = { user1 = \"p@ssw0rd\", user2 = \"password\" }";
    assert!(sample.contains(commented), "the sample changed");
    sample.replace(
        commented,
        "    auth = { user1 = \"p@ssw0rd\", user2 = \"password\" }",
    )
}

fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Bare rumqttd on `text` (its listeners on fixed free ports), without the console and
/// Prometheus exporter (process-wide in rumqttd, and not what is compared); the v4 and v5
/// listeners' addresses once they accept connections.
async fn bare_rumqttd(dir: &Path, text: &str) -> (SocketAddr, SocketAddr) {
    let path = write(dir, "bare.toml", &on_loopback(text, free_port));
    let mut config = mqtt_im::rumqttd_config::load(&path).unwrap();
    config.console = None;
    config.prometheus = None;
    // This build of rumqttd has no WebSocket listener.
    config.ws = None;
    let v4 = config.v4.as_ref().unwrap()["1"].listen;
    let v5 = config.v5.as_ref().unwrap()["1"].listen;
    std::thread::spawn(move || {
        if let Err(e) = rumqttd::Broker::new(config).start() {
            panic!("bare rumqttd stopped: {e}");
        }
    });
    for addr in [v4, v5] {
        eventually(|| async move { tokio::net::TcpStream::connect(addr).await.is_ok() }).await;
    }
    (v4, v5)
}

/// mqtt-im on `text` (every listener on port 0) with the built-in IM settings.
async fn mqtt_im(dir: &Path, text: &str) -> Handle {
    let path = write(dir, "rumqttd.toml", &on_loopback(text, || 0));
    let rumqttd = mqtt_im::rumqttd_config::load(&path).unwrap();
    let mut settings = Config::default();
    settings.store.path = dir.join("im.db");
    Builder::new(rumqttd)
        .unwrap()
        .im(settings)
        .start()
        .await
        .unwrap()
}

/// What a client meets on a broker's `v4.1` and `v5.1` listeners.
#[derive(Debug, PartialEq, Eq)]
struct Meets {
    v4_on_v4: bool,
    v5_on_v5: bool,
    v5_on_v4: bool,
    v4_on_v5: bool,
    /// A 10,000-byte publish (below the sample's max_payload_size of 20,480) is acknowledged.
    small_publish: bool,
    /// A 30,000-byte publish is acknowledged.
    large_publish: bool,
}

async fn accepted(addr: SocketAddr, v5: bool, login: Option<(&str, &str)>) -> bool {
    let id = format!("probe-{}", rand_suffix());
    try_connect(addr, v5, &id, true, login)
        .await
        .is_some_and(|ack| ack.code == 0)
}

async fn acked(addr: SocketAddr, login: Option<(&str, &str)>, size: usize) -> bool {
    let id = format!("publisher-{}", rand_suffix());
    let mut ack = try_connect(addr, false, &id, true, login).await.unwrap();
    assert_eq!(ack.code, 0);
    raw_publish_acked(&mut ack.stream, "sensors/big", size).await
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

async fn meets(v4: SocketAddr, v5: SocketAddr, login: Option<(&str, &str)>) -> Meets {
    Meets {
        v4_on_v4: accepted(v4, false, login).await,
        v5_on_v5: accepted(v5, true, None).await,
        v5_on_v4: accepted(v4, true, login).await,
        v4_on_v5: accepted(v5, false, None).await,
        small_publish: acked(v4, login, 10_000).await,
        large_publish: acked(v4, login, 30_000).await,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_sample_serves_every_listener_as_bare_rumqttd_does() {
    let dir = tempfile::tempdir().unwrap();
    let sample = shipped_sample();
    let (bare_v4, bare_v5) = bare_rumqttd(dir.path(), &sample).await;
    let handle = mqtt_im(dir.path(), &sample).await;
    let names: Vec<&str> = handle
        .listeners()
        .iter()
        .map(|(n, _, _)| n.as_str())
        .collect();
    assert_eq!(names, ["v4.1", "v5.1", "ws.1"]);
    let (v4, v5) = (
        handle.listener_addr("v4.1").unwrap(),
        handle.listener_addr("v5.1").unwrap(),
    );
    let expected = Meets {
        v4_on_v4: true,
        v5_on_v5: true,
        v5_on_v4: false,
        v4_on_v5: false,
        small_publish: true,
        large_publish: false,
    };
    assert_eq!(
        meets(bare_v4, bare_v5, None).await,
        expected,
        "bare rumqttd"
    );
    assert_eq!(meets(v4, v5, None).await, expected, "mqtt-im");

    // The WebSocket listener: MQTT 3.1.1 over WebSocket, on any path, pub/sub through
    // rumqttd behind the hook layer.
    let ws = handle.listener_addr("ws.1").unwrap();
    let mut options = rumqttc::MqttOptions::new("ws-client", format!("ws://{ws}/"), ws.port());
    options.set_transport(rumqttc::Transport::Ws);
    let mut subscriber = Client::v4_with(options).await;
    assert_eq!(subscriber.subscribe("plant/#", 1).await, vec![1]);
    let publisher = Client::v4_with(rumqttc::MqttOptions::new(
        "tcp-client",
        v4.ip().to_string(),
        v4.port(),
    ))
    .await;
    publisher.publish("plant/line-1", 1, b"on".to_vec()).await;
    assert_eq!(subscriber.next_on("plant/line-1").await, b"on");

    // [prometheus] listen is where mqtt-im's metrics are.
    let metrics = handle.metrics_addr().expect("[prometheus] listen");
    let (status, body) = http_get(metrics, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("mqtt_im_connections"), "{body}");
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listener_auth_table_admits_exactly_its_users_and_they_chat() {
    let dir = tempfile::tempdir().unwrap();
    let sample = with_v4_auth(&shipped_sample());
    let (bare_v4, _) = bare_rumqttd(dir.path(), &sample).await;
    let handle = mqtt_im(dir.path(), &sample).await;
    let v4 = handle.listener_addr("v4.1").unwrap();
    for (login, admitted) in [
        (Some(("user1", "p@ssw0rd")), true),
        (Some(("user2", "password")), true),
        (Some(("user1", "password")), false),
        (Some(("nobody", "p@ssw0rd")), false),
        (None, false),
    ] {
        assert_eq!(
            accepted(bare_v4, false, login).await,
            admitted,
            "bare {login:?}"
        );
        assert_eq!(
            accepted(v4, false, login).await,
            admitted,
            "mqtt-im {login:?}"
        );
    }

    // The table's users are IM users: user1 writes to user2, who is offline, then reads it.
    let login = |user: &str, password: &str, id: &str| {
        let mut options = rumqttc::MqttOptions::new(id, v4.ip().to_string(), v4.port());
        options.set_credentials(user, password);
        options
    };
    let mut user1 = Client::v4_with(login("user1", "p@ssw0rd", "user1-phone")).await;
    let stored = user1
        .publish_acked("im/u/user2", chat("m1", "user2", "hello", false))
        .await;
    assert_eq!(stored, 0);
    let mut user2 = Client::v4_with(login("user2", "password", "user2-phone")).await;
    user2.subscribe("im/u/user2/#", 1).await;
    let digest = user2.digest("user2").await;
    assert_eq!(digest.sessions["u/user1"].unacked, 1);
    let page = page(&user2.ask("user2", pull("p1", "u/user1", 10, None)).await);
    assert_eq!(text_of(&page.messages[0]), "hello");
    assert_eq!(page.messages[0].from, "user1");
    handle.shutdown().await;
}
