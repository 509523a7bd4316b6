//! Shared helpers: an in-process broker on port 0 with its own data folder, real rumqttc
//! clients (3.1.1 and 5), and payload builders.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use mqtt_im::server::CancellationToken;
use mqtt_im::wire::pb;
use mqtt_im::{Config, Server};
use prost::Message;
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(10);

/// A running mqtt-im with users alice, bob, carol (password "pw").
pub struct TestBroker {
    pub addr: SocketAddr,
    pub im: mqtt_im::im::ImService,
    pub policy: std::sync::Arc<mqtt_im::policy::LuaPolicy>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    pub dir: tempfile::TempDir,
    pub backend: TestBackend,
}

/// Which store a test broker runs on.
#[derive(Debug, Clone)]
pub enum TestBackend {
    Embedded,
    /// A PostgreSQL schema of its own.
    Postgres(mqtt_im::config::PostgresSettings),
}

impl TestBackend {
    /// PostgreSQL from MQTT_IM_TEST_POSTGRES_URL (the local CI service when
    /// MQTT_IM_REQUIRE_SERVICES=1), in a fresh schema; `None` when not configured.
    pub fn postgres() -> Option<Self> {
        let required = std::env::var("MQTT_IM_REQUIRE_SERVICES").as_deref() == Ok("1");
        let url = match std::env::var("MQTT_IM_TEST_POSTGRES_URL") {
            Ok(url) => url,
            Err(_) if required => "postgres://postgres@127.0.0.1:5432/test".into(),
            Err(_) => return None,
        };
        Some(Self::Postgres(mqtt_im::config::PostgresSettings {
            url,
            schema: format!("t_{:016x}", rand_u64()),
            pool_size: 8,
            connect_timeout_ms: 3000,
        }))
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    hasher.finish()
}

/// Runs each test body once per backend: `embedded` always, `postgres` when configured.
#[macro_export]
macro_rules! backend_tests {
    ($($(#[$meta:meta])* async fn $name:ident($backend:ident: TestBackend) $body:block)*) => {
        $(
            $(#[$meta])*
            #[allow(clippy::unwrap_used, clippy::expect_used)]
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn run($backend: $crate::common::TestBackend) $body

                #[tokio::test]
                async fn embedded() {
                    run($crate::common::TestBackend::Embedded).await
                }

                #[tokio::test]
                async fn postgres() {
                    match $crate::common::TestBackend::postgres() {
                        Some(backend) => run(backend).await,
                        None => eprintln!("skipped: MQTT_IM_TEST_POSTGRES_URL is not set"),
                    }
                }
            }
        )*
    };
}

pub fn config(dir: &std::path::Path, backend: &TestBackend) -> Config {
    let mut config = Config::default();
    config.listeners.mqtt = "127.0.0.1:0".parse().unwrap();
    config.store.path = dir.join("im.db");
    if let TestBackend::Postgres(settings) = backend {
        config.store.backend = mqtt_im::config::Backend::Postgres;
        config.store.postgres = settings.clone();
    }
    for user in ["alice", "bob", "carol"] {
        config.auth.users.insert(user.into(), "pw".into());
    }
    config
}

impl TestBroker {
    /// A broker on the embedded store.
    pub async fn start() -> Self {
        Self::start_on(TestBackend::Embedded).await
    }

    pub async fn start_on(backend: TestBackend) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), backend).await
    }

    /// Starts with a configuration adjusted by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_on(TestBackend::Embedded, adjust).await
    }

    pub async fn start_with_on(backend: TestBackend, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), &backend);
        adjust(&mut config);
        Self::launch(config, dir, backend).await
    }

    /// Starts on an existing data folder / schema (a restart).
    pub async fn start_in(dir: tempfile::TempDir, backend: TestBackend) -> Self {
        let config = config(dir.path(), &backend);
        Self::launch(config, dir, backend).await
    }

    async fn launch(config: Config, dir: tempfile::TempDir, backend: TestBackend) -> Self {
        // RUST_LOG=mqtt_im=debug shows the server's side of a failing test.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let server = Server::bind(config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let im = server.im();
        let policy = server.policy();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Self {
            addr,
            im,
            policy,
            shutdown,
            task,
            dir,
            backend,
        }
    }

    /// Stops the server (every in-flight store finishes) and returns its data folder.
    pub async fn stop(self) -> (tempfile::TempDir, TestBackend) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        (self.dir, self.backend)
    }
}

/// An envelope with one text chat message.
pub fn chat(msg_id: &str, to: &str, text: &str, ack_flg: bool) -> Vec<u8> {
    let mut envelope = pb::Envelope::text(msg_id, to, text);
    if let Some(pb::envelope::Body::Chat(message)) = envelope.body.as_mut() {
        message.ack_flg = ack_flg;
        // Spoofed: the server must replace it with the authenticated sender.
        message.from = "mallory".into();
    }
    envelope.encode_to_vec()
}

pub fn pull(id: &str, conversation: &str, page_size: u32, ack: Option<pb::Cursor>) -> Vec<u8> {
    request(
        id,
        pb::request::Kind::Pull(pb::Pull {
            conversation: conversation.into(),
            page_size,
            ack,
        }),
    )
}

pub fn request(id: &str, kind: pb::request::Kind) -> Vec<u8> {
    pb::Request {
        request_id: id.into(),
        kind: Some(kind),
    }
    .encode_to_vec()
}

pub fn text_of(message: &pb::ChatMessage) -> &str {
    match message.msg.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(pb::content::Kind::Text(text)) => text,
        _ => "",
    }
}

/// What a client saw.
#[derive(Debug, Clone)]
pub enum Seen {
    Publish {
        topic: String,
        payload: Vec<u8>,
        /// MQTT 5 Correlation Data, if any.
        correlation: Option<Vec<u8>>,
    },
    PubAck {
        pkid: u16,
        reason: u8,
        /// MQTT 5 reason string, if any.
        reason_string: Option<String>,
    },
    SubAck {
        codes: Vec<u8>,
    },
    PubComp {
        pkid: u16,
    },
}

/// A 3.1.1 client (rumqttc) whose events arrive on a channel.
pub struct Client {
    pub v4: Option<rumqttc::AsyncClient>,
    pub v5: Option<rumqttc::v5::AsyncClient>,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One step of a client's event loop, as the tests see it.
enum Step {
    Connected(bool),
    Seen(Seen),
    Skip,
}

/// The two rumqttc event loops, driven the same way.
trait EventSource: Send + 'static {
    /// `None` when the connection ended.
    fn step(&mut self) -> impl std::future::Future<Output = Option<Step>> + Send;
}

impl EventSource for rumqttc::EventLoop {
    async fn step(&mut self) -> Option<Step> {
        use rumqttc::{Event, Packet, SubscribeReasonCode as C};
        let Event::Incoming(packet) = self.poll().await.ok()? else {
            return Some(Step::Skip);
        };
        Some(match packet {
            Packet::ConnAck(ack) => {
                Step::Connected(ack.code == rumqttc::ConnectReturnCode::Success)
            }
            Packet::Publish(p) => Step::Seen(Seen::Publish {
                topic: p.topic,
                payload: p.payload.to_vec(),
                correlation: None,
            }),
            Packet::PubAck(a) => Step::Seen(Seen::PubAck {
                pkid: a.pkid,
                reason: 0,
                reason_string: None,
            }),
            Packet::PubComp(c) => Step::Seen(Seen::PubComp { pkid: c.pkid }),
            Packet::SubAck(s) => Step::Seen(Seen::SubAck {
                codes: s
                    .return_codes
                    .iter()
                    .map(|c| match c {
                        C::Success(q) => *q as u8,
                        C::Failure => 0x80,
                    })
                    .collect(),
            }),
            _ => Step::Skip,
        })
    }
}

impl EventSource for rumqttc::v5::EventLoop {
    async fn step(&mut self) -> Option<Step> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::Event;
        let Event::Incoming(packet) = self.poll().await.ok()? else {
            return Some(Step::Skip);
        };
        Some(match packet {
            Packet::ConnAck(_) => Step::Connected(true),
            Packet::Publish(p) => Step::Seen(Seen::Publish {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                correlation: p
                    .properties
                    .and_then(|props| props.correlation_data)
                    .map(|data| data.to_vec()),
            }),
            Packet::PubAck(a) => Step::Seen(Seen::PubAck {
                pkid: a.pkid,
                reason: v5_ack_code(a.reason),
                reason_string: a.properties.and_then(|p| p.reason_string),
            }),
            Packet::PubComp(c) => Step::Seen(Seen::PubComp { pkid: c.pkid }),
            Packet::SubAck(s) => Step::Seen(Seen::SubAck {
                codes: s.return_codes.iter().map(v5_code).collect(),
            }),
            _ => Step::Skip,
        })
    }
}

/// Drives `events` in a task until the CONNACK, then forwards what the client sees.
async fn pump(
    mut events: impl EventSource,
) -> (mpsc::UnboundedReceiver<Seen>, tokio::task::JoinHandle<()>) {
    let (tx, seen) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        while let Some(step) = events.step().await {
            match step {
                Step::Connected(ok) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(ok);
                    }
                }
                Step::Seen(event) => {
                    let _ = tx.send(event);
                }
                Step::Skip => {}
            }
        }
        if let Some(r) = ready_tx.take() {
            let _ = r.send(false);
        }
    });
    assert!(
        tokio::time::timeout(WAIT, ready).await.unwrap().unwrap(),
        "connect failed"
    );
    (seen, task)
}

impl Client {
    /// Connects with MQTT 3.1.1 and waits for the CONNACK.
    pub async fn v4(addr: SocketAddr, client_id: &str, user: &str, keep_alive: u64) -> Self {
        Self::v4_session(addr, client_id, user, keep_alive, true).await
    }

    /// Connects with MQTT 3.1.1 and the given clean-session flag.
    pub async fn v4_session(
        addr: SocketAddr,
        client_id: &str,
        user: &str,
        keep_alive: u64,
        clean: bool,
    ) -> Self {
        let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_credentials(user, "pw");
        options.set_keep_alive(Duration::from_secs(keep_alive));
        options.set_clean_session(clean);
        let (client, events) = rumqttc::AsyncClient::new(options, 100);
        let (seen, task) = pump(events).await;
        Self {
            v4: Some(client),
            v5: None,
            seen,
            task,
        }
    }

    /// Connects with MQTT 5 and waits for the CONNACK.
    pub async fn v5(addr: SocketAddr, client_id: &str, user: &str) -> Self {
        use rumqttc::v5;
        let mut options = v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_credentials(user, "pw");
        options.set_keep_alive(Duration::from_secs(30));
        let (client, events) = v5::AsyncClient::new(options, 100);
        let (seen, task) = pump(events).await;
        Self {
            v4: None,
            v5: Some(client),
            seen,
            task,
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Vec<u8> {
        if let Some(c) = &self.v4 {
            c.subscribe(filter, rumqttc::qos(qos).unwrap())
                .await
                .unwrap();
        } else if let Some(c) = &self.v5 {
            c.subscribe(filter, rumqttc::v5::mqttbytes::qos(qos).unwrap())
                .await
                .unwrap();
        }
        loop {
            if let Seen::SubAck { codes } = self.next().await {
                return codes;
            }
        }
    }

    pub async fn publish(&self, topic: &str, qos: u8, payload: Vec<u8>) {
        if let Some(c) = &self.v4 {
            c.publish(topic, rumqttc::qos(qos).unwrap(), false, payload)
                .await
                .unwrap();
        } else if let Some(c) = &self.v5 {
            c.publish(
                topic,
                rumqttc::v5::mqttbytes::qos(qos).unwrap(),
                false,
                payload,
            )
            .await
            .unwrap();
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK reason code.
    pub async fn publish_acked(&mut self, topic: &str, payload: Vec<u8>) -> u8 {
        self.publish_answered(topic, payload).await.0
    }

    /// Publishes at QoS 1 and returns the PUBACK reason code and reason string.
    pub async fn publish_answered(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
    ) -> (u8, Option<String>) {
        self.publish(topic, 1, payload).await;
        loop {
            if let Seen::PubAck {
                reason,
                reason_string,
                ..
            } = self.next().await
            {
                return (reason, reason_string);
            }
        }
    }

    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("timed out waiting for a packet")
            .expect("connection ended")
    }

    /// The next publish on `topic`, skipping other packets.
    pub async fn next_on(&mut self, topic: &str) -> Vec<u8> {
        self.next_with_correlation(topic).await.0
    }

    /// The next publish on `topic` with its Correlation Data.
    pub async fn next_with_correlation(&mut self, topic: &str) -> (Vec<u8>, Option<Vec<u8>>) {
        loop {
            if let Seen::Publish {
                topic: t,
                payload,
                correlation,
            } = self.next().await
            {
                if t == topic {
                    return (payload, correlation);
                }
            }
        }
    }

    /// Nothing at all arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) -> Option<Seen> {
        tokio::time::timeout(wait, self.seen.recv())
            .await
            .ok()
            .flatten()
    }

    pub async fn digest(&mut self, uid: &str) -> pb::Digest {
        let bytes = self.next_on(&format!("im/u/{uid}/digest")).await;
        pb::Digest::decode(bytes.as_slice()).unwrap()
    }

    pub async fn response(&mut self, uid: &str) -> pb::Response {
        let bytes = self.next_on(&format!("im/u/{uid}/resp")).await;
        pb::Response::decode(bytes.as_slice()).unwrap()
    }

    /// Sends a request on `req` and returns the response.
    pub async fn ask(&mut self, uid: &str, request: Vec<u8>) -> pb::Response {
        self.publish(&format!("im/u/{uid}/req"), 1, request).await;
        self.response(uid).await
    }

    pub async fn disconnect(self) {
        if let Some(c) = &self.v4 {
            let _ = c.disconnect().await;
        } else if let Some(c) = &self.v5 {
            let _ = c.disconnect().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The page of a Pull/History response.
pub fn page(response: &pb::Response) -> pb::Page {
    match &response.result {
        Some(pb::response::Result::Page(page)) => page.clone(),
        other => panic!("expected a page, got {other:?} ({:?})", response.error),
    }
}

/// Waits until `uid`'s online devices on this node are exactly `expected`.
pub async fn wait_presence(broker: &TestBroker, uid: &str, expected: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut online = broker.im.online_devices(uid);
        online.sort();
        if online == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{uid} online on {online:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn seqs(page: &pb::Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

fn v5_code(code: &rumqttc::v5::mqttbytes::v5::SubscribeReasonCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as C;
    match code {
        C::Success(qos) => *qos as u8,
        C::NotAuthorized => 0x87,
        C::TopicFilterInvalid => 0x8f,
        _ => 0x80,
    }
}

fn v5_ack_code(reason: rumqttc::v5::mqttbytes::v5::PubAckReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    match reason {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// Writes `source` as a script in `dir` and returns its path.
pub fn script(dir: &std::path::Path, name: &str, source: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, source).unwrap();
    path
}

/// Waits until `condition` holds.
pub async fn wait_for(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy a test can cut and restore, to take a service "down" without touching the
/// shared server other tests use.
pub struct Proxy {
    pub addr: SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let cut = std::sync::Arc::new(tokio::sync::Notify::new());
        let (flag, notify) = (up.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let notify = notify.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = notify.notified() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            cut,
            task,
        }
    }

    /// Drops every proxied connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    pub fn up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Runs the `mqtt-im` binary on `dir` with extra environment; returns it and its address.
pub fn spawn_with(
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> (std::process::Child, SocketAddr) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("MQTT_IM__LISTENERS__MQTT", "127.0.0.1:0")
        .env("MQTT_IM__STORE__PATH", dir.join("im.db"))
        .env("MQTT_IM__AUTH__USERS__ALICE", "pw")
        .env("MQTT_IM__AUTH__USERS__BOB", "pw")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(stdout);
    stdout.read_line(&mut line).unwrap();
    // Keep the pipe open and drained for as long as the child lives.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = line
        .trim()
        .strip_prefix("mqtt-im listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

/// Redis for cluster tests: MQTT_IM_TEST_REDIS_URL, or the local CI service when services are
/// required; `None` when not configured.
pub fn redis_url() -> Option<String> {
    let required = std::env::var("MQTT_IM_REQUIRE_SERVICES").as_deref() == Ok("1");
    match std::env::var("MQTT_IM_TEST_REDIS_URL") {
        Ok(url) => Some(url),
        Err(_) if required => Some("redis://127.0.0.1:6379".into()),
        Err(_) => None,
    }
}
