//! Shared helpers: an in-process broker on port 0 with its own data folder, real rumqttc
//! clients (3.1.1 and 5), and payload builders.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use mqtt_im::server::CancellationToken;
use mqtt_im::wire::pb;
use mqtt_im::Config;
use prost::Message;

mod bare;
mod client;
mod gateway;
mod http;
mod pki;
mod process;
mod raw;

#[allow(unused_imports)]
pub use bare::*;
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use gateway::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use pki::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use raw::*;

pub const WAIT: Duration = Duration::from_secs(10);

/// A running mqtt-im with users alice, bob, carol (password "pw").
pub struct TestBroker {
    pub addr: SocketAddr,
    /// Every public listener's real address.
    pub listeners: Vec<(mqtt_im::server::ListenerKind, SocketAddr)>,
    /// The metrics and status endpoint, when configured.
    pub metrics: Option<SocketAddr>,
    pub im: mqtt_im::im::ImService,
    pub policy: std::sync::Arc<mqtt_im::policy::LuaPolicy>,
    pub store: std::sync::Arc<dyn mqtt_im::store::Store>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    pub dir: tempfile::TempDir,
    pub backend: TestBackend,
}

/// Which store a test broker runs on.
#[derive(Debug, Clone)]
pub enum TestBackend {
    Embedded,
    /// A PostgreSQL schema of its own, with Redis (when configured) under its own prefix.
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
            connect_timeout: mqtt_im::config::Period::millis(3000),
            call_timeout: mqtt_im::config::Period::millis(5000),
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
        // Production is postgres + redis: presence and the digest cache, under a prefix of
        // the test's own.
        if let Some(redis) = redis_url() {
            config.cluster.redis_url = redis;
            config.cluster.key_prefix = format!("test-{}", settings.schema);
        }
    }
    // Clear text keeps the tests fast; tests/auth.rs covers the hashes.
    config.auth.plaintext = true;
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

    /// Starts with `build` adding to the builder (hooks, links) and `adjust` to the
    /// configuration.
    pub async fn start_built(
        adjust: impl FnOnce(&mut Config),
        build: impl FnOnce(mqtt_im::Builder) -> mqtt_im::Builder,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), &TestBackend::Embedded);
        adjust(&mut config);
        let builder = build(mqtt_im::Builder::from_config(config));
        Self::launch_built(builder, dir, TestBackend::Embedded).await
    }

    /// Starts on an existing data folder / schema (a restart).
    pub async fn start_in(dir: tempfile::TempDir, backend: TestBackend) -> Self {
        let config = config(dir.path(), &backend);
        Self::launch(config, dir, backend).await
    }

    async fn launch(config: Config, dir: tempfile::TempDir, backend: TestBackend) -> Self {
        Self::launch_built(mqtt_im::Builder::from_config(config), dir, backend).await
    }

    async fn launch_built(
        builder: mqtt_im::Builder,
        dir: tempfile::TempDir,
        backend: TestBackend,
    ) -> Self {
        // RUST_LOG=mqtt_im=debug shows the server's side of a failing test.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let server = builder.bind().await.unwrap();
        let addr = server.local_addr().unwrap();
        let listeners = all_listeners()
            .into_iter()
            .filter_map(|kind| Some((kind, server.listener_addr(kind)?.unwrap())))
            .collect();
        let metrics = server.metrics_addr().map(Result::unwrap);
        let im = server.im();
        let policy = server.policy();
        let store = server.store();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Self {
            addr,
            listeners,
            metrics,
            im,
            policy,
            store,
            shutdown,
            task,
            dir,
            backend,
        }
    }

    /// The address of the `kind` listener (configured by the test).
    pub fn addr_of(&self, kind: mqtt_im::server::ListenerKind) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, addr)| *addr)
            .expect("listener configured")
    }

    /// Stops the server (every in-flight store finishes) and returns its data folder.
    pub async fn stop(self) -> (tempfile::TempDir, TestBackend) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        (self.dir, self.backend)
    }
}

fn all_listeners() -> [mqtt_im::server::ListenerKind; 4] {
    use mqtt_im::server::ListenerKind as K;
    [K::Tcp, K::Tls, K::Ws, K::Wss]
}

/// A user id from a literal.
pub fn uid(text: &str) -> mqtt_im::domain::Uid {
    mqtt_im::domain::Uid::parse(text).unwrap()
}

/// A group id from a literal.
pub fn gid(text: &str) -> mqtt_im::domain::Gid {
    mqtt_im::domain::Gid::parse(text).unwrap()
}

/// The 1:1 conversation of `a` and `b`.
pub fn direct(a: &str, b: &str) -> mqtt_im::domain::Conversation {
    mqtt_im::domain::Conversation::direct(&uid(a), &uid(b))
}

/// Group `id`'s conversation.
pub fn group(id: &str) -> mqtt_im::domain::Conversation {
    mqtt_im::domain::Conversation::group(&gid(id))
}

/// Device `client_id` of `user`.
pub fn device(user: &str, client_id: &str) -> mqtt_im::domain::Device {
    mqtt_im::domain::Device {
        uid: uid(user),
        client_id: client_id.into(),
    }
}

/// An envelope with one text chat message to group `gid`.
pub fn group_chat(msg_id: &str, gid: &str) -> Vec<u8> {
    let mut envelope = pb::Envelope::text(msg_id, gid, msg_id);
    if let Some(pb::envelope::Body::Chat(message)) = envelope.body.as_mut() {
        message.chat_type = pb::ChatType::Group as i32;
    }
    envelope.encode_to_vec()
}

/// The seq of a delivered chat envelope.
pub fn chat_seq(bytes: &[u8]) -> u64 {
    match pb::Envelope::decode(bytes).map(|e| e.body) {
        Ok(Some(pb::envelope::Body::Chat(message))) => message.seq,
        other => panic!("not a chat envelope: {other:?}"),
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

/// Writes `source` as a script in `dir` and returns its path.
pub fn script(dir: &std::path::Path, name: &str, source: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, source).unwrap();
    path
}

/// Waits until `condition` holds.
pub async fn wait_for(condition: impl Fn() -> bool) {
    eventually(|| std::future::ready(condition())).await;
}

/// Waits until the asynchronous `condition` holds (checked every 20 ms, at most [`WAIT`]).
pub async fn eventually<F, C>(mut condition: C)
where
    C: FnMut() -> F,
    F: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one series (`name{labels}`) in the broker's metrics; 0 for a labelled
/// series nothing has counted under yet.
pub fn metric(broker: &TestBroker, series: &str) -> f64 {
    samples(&broker.im.metrics().render())
        .get(series)
        .copied()
        .unwrap_or(0.0)
}

/// Rounds `task` (a background task of the IM service) has finished.
pub fn rounds(broker: &TestBroker, task: &str) -> f64 {
    metric(
        broker,
        &format!("mqtt_im_background_rounds_total{{task=\"{task}\"}}"),
    )
}

/// Store calls of operation `op` so far: each written batch of acknowledged live deliveries
/// is one `ack` call.
pub fn store_calls(broker: &TestBroker, op: &str) -> f64 {
    metric(
        broker,
        &format!("mqtt_im_store_seconds_count{{op=\"{op}\"}}"),
    )
}

/// Waits until the broker holds `expected` links to its rumqttd: a link goes once rumqttd
/// has closed it too, so a session rumqttd keeps is in place from then on.
pub async fn wait_links(broker: &TestBroker, expected: f64) {
    wait_for(|| metric(broker, "mqtt_im_upstream_links") == expected).await;
}

/// Waits until `task` has run a whole round that started after this call: two more rounds
/// finished (the first may have been under way already).
pub async fn after_round(broker: &TestBroker, task: &str) {
    let start = rounds(broker, task);
    wait_for(|| rounds(broker, task) >= start + 2.0).await;
}

/// The policy scripts and word lists the project ships, as `examples/mqtt-im.toml` loads them.
pub fn shipped_policy(config: &mut Config) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    config.policy.scripts = vec![root.join("policy.lua"), root.join("sensitive_words.lua")];
    config
        .policy
        .words
        .insert("default".into(), root.join("words/sensitive.txt"));
    config
        .policy
        .words
        .insert("blocked".into(), root.join("words/blocked.txt"));
}

/// Runs SQL straight on the broker's database (behind its back, as an operator or a fault
/// would): `sqlite` on the embedded store, `postgres` in the broker's PostgreSQL schema.
pub async fn run_sql(broker: &TestBroker, sqlite: &str, postgres: &str) {
    match &broker.backend {
        TestBackend::Embedded => {
            let db = rusqlite::Connection::open(broker.dir.path().join("im.db")).unwrap();
            db.execute_batch(sqlite).unwrap();
        }
        TestBackend::Postgres(settings) => {
            let client = postgres_client(settings).await;
            let sql = format!("SET search_path TO {}; {postgres}", settings.schema);
            client.batch_execute(&sql).await.unwrap();
        }
    }
}

/// A plain connection to the test PostgreSQL server.
pub async fn postgres_client(
    settings: &mqtt_im::config::PostgresSettings,
) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&settings.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Runs the `mqtt-im` binary as an operator would (`args` from the subcommand on) against
/// the broker's store and Redis, and returns what it printed.
pub fn operator(broker: &TestBroker, args: &[&str]) -> String {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"));
    command.args(args).env_remove("RUST_LOG");
    match &broker.backend {
        TestBackend::Embedded => {
            command.env("MQTT_IM__STORE__PATH", broker.dir.path().join("im.db"));
        }
        TestBackend::Postgres(settings) => {
            command
                .env("MQTT_IM__STORE__BACKEND", "postgres")
                .env("MQTT_IM__STORE__POSTGRES__URL", &settings.url)
                .env("MQTT_IM__STORE__POSTGRES__SCHEMA", &settings.schema);
            if let Some(redis) = redis_url() {
                command.env("MQTT_IM__CLUSTER__REDIS_URL", redis).env(
                    "MQTT_IM__CLUSTER__KEY_PREFIX",
                    format!("test-{}", settings.schema),
                );
            }
        }
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
