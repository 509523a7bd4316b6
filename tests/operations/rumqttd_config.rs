//! A team's unchanged `rumqttd.toml`: the sample that ships with the rumqttd crate starts
//! behind the hook layer, and clients meet the same credentials and limits on each listener
//! as on bare rumqttd run from the same file in the same test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
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

/// The sample's commented-out lines from `from` up to (not including) `until`, switched on.
fn uncomment(sample: &str, from: &str, until: &str) -> String {
    assert!(
        sample.contains(from) && sample.contains(until),
        "the sample changed"
    );
    let mut on = false;
    let lines = sample.lines().map(|line| {
        on = (on || line == from) && line != until;
        let uncommented = line.strip_prefix("# ").or_else(|| line.strip_prefix('#'));
        match uncommented {
            Some(uncommented) if on => uncommented.to_owned(),
            _ => line.to_owned(),
        }
    });
    lines.collect::<Vec<_>>().join("\n")
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
    start_bare(bare_config(dir, text)).await
}

/// `text` as bare rumqttd runs it here: on fixed free ports, without the console and the
/// Prometheus exporter (process-wide in rumqttd, and not what is compared), and without
/// WebSocket (this build of rumqttd has none).
fn bare_config(dir: &Path, text: &str) -> rumqttd::Config {
    let path = write(dir, "bare.toml", &on_loopback(text, free_port));
    let mut config = mqtt_im::rumqttd_config::load(&path).unwrap();
    config.console = None;
    config.prometheus = None;
    config.ws = None;
    config
}

/// Runs bare rumqttd on `config`; its v4 and v5 listeners once they accept connections.
async fn start_bare(config: rumqttd::Config) -> (SocketAddr, SocketAddr) {
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
    start_mqtt_im(dir, mqtt_im::rumqttd_config::load(&path).unwrap()).await
}

/// mqtt-im around `rumqttd` with the built-in IM settings.
async fn start_mqtt_im(dir: &Path, rumqttd: rumqttd::Config) -> Handle {
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

/// Each login meets the expected admission on bare rumqttd's `bare` and mqtt-im's `ours`.
async fn same_admissions(
    bare: SocketAddr,
    ours: SocketAddr,
    cases: &[(Option<(&str, &str)>, bool)],
) {
    for &(login, admitted) in cases {
        assert_eq!(
            accepted(bare, false, login).await,
            admitted,
            "bare {login:?}"
        );
        assert_eq!(
            accepted(ours, false, login).await,
            admitted,
            "mqtt-im {login:?}"
        );
    }
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

    // Open listeners admit everyone, but a username nobody checked is no IM identity.
    let mut options = rumqttc::MqttOptions::new("claims-alice", v4.ip().to_string(), v4.port());
    options.set_credentials("alice", "anything");
    let mut claimant = Client::v4_with(options).await;
    assert_eq!(claimant.subscribe("im/u/alice/#", 1).await, vec![0x80]);

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
    same_admissions(
        bare_v4,
        v4,
        &[
            (Some(("user1", "p@ssw0rd")), true),
            (Some(("user2", "password")), true),
            (Some(("user1", "password")), false),
            (Some(("nobody", "p@ssw0rd")), false),
            (None, false),
        ],
    )
    .await;

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

#[tokio::test(flavor = "multi_thread")]
async fn the_samples_tls_listener_requires_client_certificates_signed_by_its_capath() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let sample = uncomment(&shipped_sample(), "# [v4.2]", "[v5.1]")
        .replace("/etc/tls/ca.cert.pem", pki.ca_file.to_str().unwrap())
        .replace("/etc/tls/server.cert.pem", pki.cert.to_str().unwrap())
        .replace("/etc/tls/server.key.pem", pki.key.to_str().unwrap());
    let handle = mqtt_im(dir.path(), &sample).await;
    let tls = handle.listener_addr("v4.2").unwrap();
    let options = |id: &str, client: Option<&str>| {
        let mut options = rumqttc::MqttOptions::new(id, "localhost", tls.port());
        let config = rumqttc::TlsConfiguration::Rustls(pki.client(client));
        options.set_transport(rumqttc::Transport::tls_with_config(config));
        options
    };
    assert!(
        refused(options("anonymous", None)).await,
        "a certificate is required"
    );
    // The certificate's common name is the uid: alice reads her own inbox.
    let mut alice = Client::v4_with(options("alice-tls", Some("alice"))).await;
    assert_eq!(alice.subscribe("im/u/alice/#", 1).await, vec![1]);
    let digest = alice.digest("alice").await;
    assert!(digest.sessions.is_empty());
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_samples_bridge_brings_a_remote_brokers_topics_to_local_clients() {
    let dir = tempfile::tempdir().unwrap();
    let sample = shipped_sample();
    // The remote end: bare rumqttd on the sample.
    let (remote, _) = bare_rumqttd(dir.path(), &sample).await;
    let bridged = uncomment(&sample, "# [bridge]", "#     [bridge.transport.tls]")
        .replace("localhost:1883", &remote.to_string());
    let handle = mqtt_im(dir.path(), &bridged).await;
    let local = handle.listener_addr("v4.1").unwrap();
    let mut subscriber = Client::v4_with(rumqttc::MqttOptions::new(
        "local-subscriber",
        local.ip().to_string(),
        local.port(),
    ))
    .await;
    assert_eq!(subscriber.subscribe("remote/#", 0).await, vec![0]);
    let publisher = Client::v4_with(rumqttc::MqttOptions::new(
        "remote-publisher",
        remote.ip().to_string(),
        remote.port(),
    ))
    .await;
    // The bridge connects in the background: publish until one gets across.
    let crossed = tokio::time::timeout(WAIT, async {
        loop {
            publisher
                .publish("remote/news", 0, b"across".to_vec())
                .await;
            if let Some(Seen::Publish { topic, payload, .. }) = subscriber
                .within(std::time::Duration::from_millis(200))
                .await
            {
                return (topic, payload);
            }
        }
    })
    .await
    .expect("nothing crossed the bridge");
    assert_eq!(crossed, ("remote/news".to_owned(), b"across".to_vec()));
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_is_closed_after_the_listeners_connection_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sample = shipped_sample().replace(
        "connection_timeout_ms = 60000",
        "connection_timeout_ms = 300",
    );
    let (bare_v4, _) = bare_rumqttd(dir.path(), &sample).await;
    let handle = mqtt_im(dir.path(), &sample).await;
    for addr in [bare_v4, handle.listener_addr("v4.1").unwrap()] {
        use tokio::io::AsyncReadExt;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        // Well within mqtt-im's own default (5 s), far beyond the listener's 300 ms.
        let read = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{addr}: {read:?}");
    }
    handle.shutdown().await;
}

/// `check-config` reads both files, names what mqtt-im treats differently, and refuses a
/// listener it cannot serve.
#[test]
fn check_config_validates_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let rumqttd = write(
        dir.path(),
        "rumqttd.toml",
        &on_loopback(&shipped_sample(), || 0),
    );
    let im = write(dir.path(), "im.toml", "[im]\nmax_backlog = 100\n");
    let check = |rumqttd: &Path, im: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
            .arg("check-config")
            .arg("--rumqttd-config")
            .arg(rumqttd)
            .arg("--config")
            .arg(im)
            .output()
            .unwrap()
    };
    // The repository's example is honoured as written (Prometheus is read on request).
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/rumqttd.toml");
    let clean = check(&example, &im);
    let printed = String::from_utf8_lossy(&clean.stdout);
    assert!(clean.status.success(), "{printed}");
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2, "{printed}");
    assert!(lines[0].starts_with("note: prometheus:"), "{printed}");
    assert_eq!(lines[1], "configuration is valid");

    let valid = check(&rumqttd, &im);
    let printed = String::from_utf8_lossy(&valid.stdout);
    assert!(valid.status.success(), "{printed}");
    for note in [
        "router: 104857600 × 10 segments",
        "capped to 4194304 × 4",
        "ws.1.connections.throttle_delay_ms: not a rumqttd 0.20 setting",
        "prometheus: mqtt-im's metrics",
        "configuration is valid",
    ] {
        assert!(printed.contains(note), "{note:?} in {printed}");
    }

    let bad_im = write(dir.path(), "bad.toml", "[im]\nmax_backlog = \"lots\"\n");
    let refused = check(&rumqttd, &bad_im);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("config error") && stderr.contains("\"lots\""),
        "{stderr}"
    );

    let pkcs12 = format!(
        "{}\n[v4.9]\nname = \"legacy\"\nlisten = \"127.0.0.1:0\"\nnext_connection_delay_ms = 0\n[v4.9.tls]\npkcs12path = \"x.p12\"\npkcs12pass = \"\"\n[v4.9.connections]\nconnection_timeout_ms = 1000\nmax_payload_size = 1024\nmax_inflight_count = 10\n",
        on_loopback(&shipped_sample(), || 0)
    );
    let native = check(&write(dir.path(), "native.toml", &pkcs12), &im);
    assert!(!native.status.success());
    let stderr = String::from_utf8_lossy(&native.stderr);
    assert!(stderr.contains("v4.9.tls: native-tls"), "{stderr}");
}

/// A service's own rumqttd auth handler (`set_auth_handler`) decides on its listener, as it
/// does in bare rumqttd, and its users are IM users.
#[tokio::test(flavor = "multi_thread")]
async fn an_embedders_auth_handler_decides_as_in_bare_rumqttd() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = bare_config(dir.path(), &shipped_sample());
    // The password is the username backwards.
    let v4 = config.v4.as_mut().unwrap().get_mut("1").unwrap();
    v4.set_auth_handler(|_client_id, user: String, password: String| async move {
        user.chars().rev().collect::<String>() == password
    });
    let (bare_v4, _) = start_bare(config.clone()).await;
    for server in config
        .v4
        .iter_mut()
        .chain(config.v5.iter_mut())
        .flat_map(|s| s.values_mut())
    {
        server.listen.set_port(0);
    }
    let handle = start_mqtt_im(dir.path(), config).await;
    let v4 = handle.listener_addr("v4.1").unwrap();
    same_admissions(
        bare_v4,
        v4,
        &[
            (Some(("alice", "ecila")), true),
            (Some(("alice", "alice")), false),
            (None, false),
        ],
    )
    .await;
    let mut options = rumqttc::MqttOptions::new("alice-phone", v4.ip().to_string(), v4.port());
    options.set_credentials("alice", "ecila");
    let mut alice = Client::v4_with(options).await;
    assert_eq!(alice.subscribe("im/u/alice/#", 1).await, vec![1]);
    let _ = alice.digest("alice").await;
    handle.shutdown().await;
}

/// The binary on a `rumqttd.toml` (the repository's example, on port 0): it prints each
/// listener's address, and the file's users chat over IM through it.
#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_a_rumqttd_toml() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/rumqttd.toml");
    let text = on_loopback(&std::fs::read_to_string(example).unwrap(), || 0);
    let path = write(dir.path(), "rumqttd.toml", &text);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"));
    command
        .arg("--rumqttd-config")
        .arg(&path)
        .env("MQTT_IM__STORE__PATH", dir.path().join("im.db"));
    // The first plain listener, the WebSocket one, then every listener by name.
    let (_node, lines) = spawn_reading(command, 5);
    let listener = |name: &str| -> SocketAddr {
        let prefix = format!("mqtt-im listener {name} ");
        let line = lines.iter().find(|l| l.starts_with(&prefix));
        let addr = line.and_then(|l| l.rsplit(' ').next());
        addr.unwrap_or_else(|| panic!("{name} in {lines:?}"))
            .parse()
            .unwrap()
    };
    let (v4, v5) = (listener("v4.1"), listener("v5.1"));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("mqtt-im listener ws.1 (ws) on ")));

    let mut alice = rumqttc::MqttOptions::new("alice-phone", v4.ip().to_string(), v4.port());
    alice.set_credentials("alice", "alice-pw");
    let mut alice = Client::v4_with(alice).await;
    let stored = alice
        .publish_acked("im/u/bob", chat("m1", "bob", "through rumqttd.toml", false))
        .await;
    assert_eq!(stored, 0);
    let mut bob = rumqttc::v5::MqttOptions::new("bob-phone", v5.ip().to_string(), v5.port());
    bob.set_credentials("bob", "bob-pw");
    let mut bob = Client::v5_with(bob).await;
    assert_eq!(bob.subscribe("im/u/bob/#", 1).await, vec![1]);
    assert_eq!(bob.digest("bob").await.sessions["u/alice"].unacked, 1);
}
