//! TLS, WebSocket and WebSocket-over-TLS listeners: the same auth, ACL, IM flow and
//! pass-through as plain TCP, with real rumqttc clients over each transport; client
//! certificates as identities.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use mqtt_im::config::ClientAuth;
use mqtt_im::server::ListenerKind;
use mqtt_im::Config;
use rumqttc::{TlsConfiguration, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::ClientConfig;

/// Every transport on port 0, with the test CA's server certificate.
fn all_transports(pki: &TestPki, client_auth: ClientAuth) -> impl FnOnce(&mut Config) + '_ {
    move |config| {
        let any = "127.0.0.1:0".parse().ok();
        config.listeners.tls = any;
        config.listeners.ws = any;
        config.listeners.wss = any;
        config.tls.cert = pki.cert.clone();
        config.tls.key = pki.key.clone();
        config.tls.client_ca = pki.ca_file.clone();
        config.tls.client_auth = client_auth;
        config.listeners.metrics = any;
    }
}

/// MQTT 3.1.1 options for `kind` at `addr`, with a password unless `user` is `None`.
fn v4_options(
    kind: ListenerKind,
    addr: SocketAddr,
    client_id: &str,
    user: Option<&str>,
    tls: Arc<ClientConfig>,
) -> rumqttc::MqttOptions {
    let (host, transport) = match kind {
        ListenerKind::Tcp => (addr.ip().to_string(), Transport::Tcp),
        ListenerKind::Tls => (
            addr.ip().to_string(),
            Transport::tls_with_config(TlsConfiguration::Rustls(tls)),
        ),
        ListenerKind::Ws => (format!("ws://{addr}/mqtt"), Transport::Ws),
        ListenerKind::Wss => (
            format!("wss://{addr}/mqtt"),
            Transport::wss_with_config(TlsConfiguration::Rustls(tls)),
        ),
    };
    let mut options = rumqttc::MqttOptions::new(client_id, host, addr.port());
    options.set_transport(transport);
    options.set_keep_alive(Duration::from_secs(30));
    if let Some(user) = user {
        options.set_credentials(user, "pw");
    }
    options
}

/// The MQTT 5 twin of [`v4_options`].
fn v5_options(
    kind: ListenerKind,
    addr: SocketAddr,
    client_id: &str,
    user: Option<&str>,
    tls: Arc<ClientConfig>,
) -> rumqttc::v5::MqttOptions {
    let v4 = v4_options(kind, addr, client_id, user, tls);
    let (host, port) = v4.broker_address();
    let mut options = rumqttc::v5::MqttOptions::new(client_id, host, port);
    options.set_transport(v4.transport());
    options.set_keep_alive(Duration::from_secs(30));
    if let Some(login) = v4.credentials() {
        options.set_credentials(login.username, login.password);
    }
    options
}

backend_tests! {
/// Alice on TLS (3.1.1) writes to offline bob, who comes back over WSS (5), gets his digest
/// and pulls; carol on WebSocket gets a message live and a pass-through topic; the ACL holds
/// on every transport.
async fn every_transport_carries_the_im_flow(backend: TestBackend) {
    let certs = tempfile::tempdir().unwrap();
    let pki = TestPki::new(certs.path());
    let broker = TestBroker::start_with_on(backend, all_transports(&pki, ClientAuth::None)).await;
    let tls = pki.client(None);
    let at = |kind| broker.addr_of(kind);

    let options = v4_options(ListenerKind::Tls, at(ListenerKind::Tls), "alice-tls", Some("alice"), tls.clone());
    let mut alice = Client::v4_with(options).await;
    for (id, text) in [("m1", "over tls"), ("m2", "still tls")] {
        assert_eq!(alice.publish_acked("im/u/bob", chat(id, "bob", text, false)).await, 0);
    }
    assert_eq!(alice.subscribe("im/u/bob/#", 1).await, vec![0x80], "ACL over TLS");

    let options = v5_options(ListenerKind::Wss, at(ListenerKind::Wss), "bob-wss", Some("bob"), tls.clone());
    let mut bob = Client::v5_with(options).await;
    assert_eq!(bob.subscribe("im/u/bob/#", 1).await, vec![1]);
    let digest = bob.digest("bob").await;
    let session = &digest.sessions["u/alice"];
    assert_eq!((session.count, session.max_seq), (2, 2));
    assert_eq!(text_of(&session.last_msgs[0]), "still tls");
    let page = page(&bob.ask("bob", pull("p1", "u/alice", 10, None)).await);
    assert_eq!(seqs(&page), vec![2, 1]);
    assert!(page.end);

    let options = v4_options(ListenerKind::Ws, at(ListenerKind::Ws), "carol-ws", Some("carol"), tls.clone());
    let mut carol = Client::v4_with(options).await;
    assert_eq!(carol.subscribe("im/u/carol/#", 1).await, vec![1]);
    let _ = carol.digest("carol").await;
    assert_eq!(carol.subscribe("sensors/+/t", 1).await, vec![1]);
    assert_eq!(alice.publish_acked("im/u/carol", chat("m3", "carol", "live over ws", false)).await, 0);
    let live = carol.next_on("im/u/carol").await;
    assert_eq!(chat_seq(&live), 1);
    alice.publish("sensors/1/t", 1, b"21.5".to_vec()).await;
    assert_eq!(carol.next_on("sensors/1/t").await, b"21.5");

    let wrong = v4_options(ListenerKind::Ws, at(ListenerKind::Ws), "mallory", Some("mallory"), tls);
    assert!(refused(wrong).await, "unknown users are refused over WebSocket too");

    // Connections are counted by listener and protocol version.
    let all = samples(&http_get(broker.metrics.unwrap(), "/metrics").await.1);
    for (listener, protocol) in [("tls", "3.1.1"), ("wss", "5"), ("ws", "3.1.1")] {
        let series = format!(r#"mqtt_im_connections{{listener="{listener}",protocol="{protocol}"}}"#);
        assert_eq!(sample(&all, &series), 1.0, "{series}");
    }
    let plain = all.get(r#"mqtt_im_connections{listener="mqtt",protocol="3.1.1"}"#);
    assert_eq!(plain.copied().unwrap_or(0.0), 0.0, "nobody used plain TCP");
}
}

/// With `client_auth = "optional"` a certificate's common name is the uid (no password);
/// a username naming someone else is refused; password clients still work. With
/// `"required"`, a client without a certificate does not get through the TLS handshake.
#[tokio::test]
async fn client_certificate_is_the_identity() {
    let certs = tempfile::tempdir().unwrap();
    let pki = TestPki::new(certs.path());
    let broker = TestBroker::start_with(all_transports(&pki, ClientAuth::Optional)).await;
    let tls_addr = broker.addr_of(ListenerKind::Tls);

    // dave is in no users table: his certificate is his identity.
    let options = v5_options(
        ListenerKind::Tls,
        tls_addr,
        "dave-phone",
        None,
        pki.client(Some("dave")),
    );
    let mut dave = Client::v5_with(options).await;
    assert_eq!(dave.subscribe("im/u/dave/#", 1).await, vec![1]);
    let _ = dave.digest("dave").await;
    assert_eq!(
        dave.subscribe("im/u/alice/#", 1).await,
        vec![0x87],
        "dave is not alice"
    );
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    assert_eq!(
        alice
            .publish_acked("im/u/dave", chat("m1", "dave", "hi dave", false))
            .await,
        0
    );
    assert_eq!(chat_seq(&dave.next_on("im/u/dave").await), 1);

    let impostor = v4_options(
        ListenerKind::Tls,
        tls_addr,
        "x",
        Some("alice"),
        pki.client(Some("dave")),
    );
    assert!(
        refused(impostor).await,
        "a certificate for dave cannot log in as alice"
    );
    let password = v4_options(
        ListenerKind::Tls,
        tls_addr,
        "carol-tls",
        Some("carol"),
        pki.client(None),
    );
    Client::v4_with(password).await.disconnect().await;
    let wss = v4_options(
        ListenerKind::Wss,
        broker.addr_of(ListenerKind::Wss),
        "dave-web",
        None,
        pki.client(Some("dave")),
    );
    Client::v4_with(wss).await.disconnect().await;
    // A common name that is no IM uid connects for plain topics only.
    let options = v5_options(
        ListenerKind::Tls,
        tls_addr,
        "ops-console",
        None,
        pki.client(Some("Dave Smith/ops")),
    );
    let mut ops = Client::v5_with(options).await;
    assert_eq!(ops.subscribe("im/u/Dave Smith/ops/#", 1).await, vec![0x87]);
    assert_eq!(ops.subscribe("plain/#", 1).await, vec![1]);

    let strict = TestBroker::start_with(all_transports(&pki, ClientAuth::Required)).await;
    let tls_addr = strict.addr_of(ListenerKind::Tls);
    let no_cert = v4_options(
        ListenerKind::Tls,
        tls_addr,
        "carol-tls",
        Some("carol"),
        pki.client(None),
    );
    assert!(refused(no_cert).await, "a certificate is required");
    let with_cert = v4_options(
        ListenerKind::Tls,
        tls_addr,
        "carol-tls",
        None,
        pki.client(Some("carol")),
    );
    Client::v4_with(with_cert).await.disconnect().await;
}

/// The WebSocket upgrade answers only the configured path and only subprotocol `mqtt`.
#[tokio::test]
async fn websocket_upgrade_checks_path_and_subprotocol() {
    let broker = TestBroker::start_with(|config| {
        config.listeners.ws = "127.0.0.1:0".parse().ok();
        config.listeners.ws_path = "/chat".into();
    })
    .await;
    let addr = broker.addr_of(ListenerKind::Ws);
    let status = |path: &'static str, protocol: Option<&'static str>| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let protocol = protocol.map_or(String::new(), |p| {
            format!("Sec-WebSocket-Protocol: {p}\r\n")
        });
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 1024];
        let n = tokio::time::timeout(WAIT, stream.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    assert!(status("/mqtt", Some("mqtt"))
        .await
        .starts_with("HTTP/1.1 404"));
    assert!(status("/chat", None).await.starts_with("HTTP/1.1 400"));
    let accepted = status("/chat", Some("mqttv3.1, mqtt")).await;
    assert!(accepted.starts_with("HTTP/1.1 101"), "{accepted}");
    assert!(
        accepted
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol: mqtt"),
        "{accepted}"
    );
}
