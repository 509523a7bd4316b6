//! A TCP proxy and the binary as a child process: services that go down, nodes that die.

use std::net::SocketAddr;

/// A TCP proxy a test can cut, stall, deafen and point elsewhere, to take a service "down"
/// without touching the shared server other tests use.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: std::sync::Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// What the proxy's connections read on every turn.
struct Shared {
    state: std::sync::atomic::AtomicU8,
    cut: tokio::sync::Notify,
    target: std::sync::Mutex<SocketAddr>,
    /// Bytes passed from the target to the clients.
    downstream: std::sync::atomic::AtomicU64,
}

const UP: u8 = 0;
const DOWN: u8 = 1;
const STALLED: u8 = 2;
/// What clients send is dropped; what the target sends still reaches them.
const DEAF: u8 = 3;
/// What the target sends is dropped; what clients send still reaches it.
const MUTE: u8 = 4;

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until either side ends or the proxy is cut (a stalled proxy holds
/// both halves open and silent); while it is deaf, what clients send is dropped.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: std::sync::Arc<Shared>,
    upstream: bool,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => Some(read),
            () = shared.cut.notified() => None,
        };
        match shared.state.load(Ordering::SeqCst) {
            DOWN => return,
            STALLED => {
                // A link that died without a word.
                let _held = (from, to);
                std::future::pending::<()>().await;
                return;
            }
            _ => {}
        }
        let n = match read {
            Some(Ok(0) | Err(_)) => return,
            Some(Ok(n)) => n,
            None => continue,
        };
        let state = shared.state.load(Ordering::SeqCst);
        if (upstream && state == DEAF) || (!upstream && state == MUTE) {
            continue;
        }
        if !upstream {
            shared.downstream.fetch_add(n as u64, Ordering::SeqCst);
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = std::sync::Arc::new(Shared {
            state: std::sync::atomic::AtomicU8::new(UP),
            cut: tokio::sync::Notify::new(),
            target: std::sync::Mutex::new(target),
            downstream: std::sync::atomic::AtomicU64::new(0),
        });
        let each = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                match each.state.load(Ordering::SeqCst) {
                    DOWN => continue, // dropped: the connection is refused
                    STALLED => {
                        // Accepted, and nothing ever passes.
                        tokio::spawn(async move {
                            let _held = inbound;
                            std::future::pending::<()>().await;
                        });
                        continue;
                    }
                    _ => {}
                }
                let shared = each.clone();
                tokio::spawn(async move {
                    let target = *shared.target.lock().unwrap();
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                    let (client_read, client_write) = inbound.into_split();
                    let (server_read, server_write) = outbound.into_split();
                    tokio::spawn(pass(client_read, server_write, shared.clone(), true));
                    pass(server_read, client_write, shared, false).await;
                });
            }
        });
        Self { addr, shared, task }
    }

    fn set(&self, state: u8) {
        self.shared
            .state
            .store(state, std::sync::atomic::Ordering::SeqCst);
        self.shared.cut.notify_waiters();
    }

    /// Drops every proxied connection and refuses new ones.
    pub fn down(&self) {
        self.set(DOWN);
    }

    /// Silences every proxied connection for good (open, nothing passes) and accepts new
    /// ones that never get an answer: a silent partition.
    pub fn stall(&self) {
        self.set(STALLED);
    }

    /// Connections stay open, but what clients send is lost (a half-dead uplink): the
    /// target's packets still arrive, the clients' answers never do.
    pub fn deafen(&self) {
        self.shared
            .state
            .store(DEAF, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections stay open, but what the target sends is lost: the clients' packets
    /// arrive, its answers never do.
    pub fn mute(&self) {
        self.shared
            .state
            .store(MUTE, std::sync::atomic::Ordering::SeqCst);
    }

    /// New connections pass again (stalled ones stay dead).
    pub fn up(&self) {
        self.shared
            .state
            .store(UP, std::sync::atomic::Ordering::SeqCst);
    }

    /// New connections go to `target` (a restarted node on another port).
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
    }

    /// Bytes the target sent to the clients so far.
    pub fn downstream_bytes(&self) -> u64 {
        self.shared
            .downstream
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A child process (the `mqtt-im` binary, the test push gateway), killed when dropped: a
/// failing test never leaves one running.
pub struct Node(std::process::Child);

impl From<std::process::Child> for Node {
    fn from(child: std::process::Child) -> Self {
        Self(child)
    }
}

impl std::ops::Deref for Node {
    type Target = std::process::Child;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the `mqtt-im` binary on `dir` with extra environment; returns it and its address.
pub fn spawn_with(dir: &std::path::Path, env: &[(&str, String)]) -> (Node, SocketAddr) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"));
    command
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("MQTT_IM__LISTENERS__MQTT", "127.0.0.1:0")
        .env("MQTT_IM__STORE__PATH", dir.join("im.db"))
        .env("MQTT_IM__AUTH__USERS__ALICE", "pw")
        .env("MQTT_IM__AUTH__USERS__BOB", "pw")
        .env("MQTT_IM__AUTH__PLAINTEXT", "true");
    let (node, lines) = spawn_reading(command, 1);
    let line = &lines[0];
    let addr = line
        .strip_prefix("mqtt-im listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (node, addr)
}

/// Runs `command` (the binary) and reads its first `count` lines of output; the rest is
/// drained for as long as it lives.
pub fn spawn_reading(mut command: std::process::Command, count: usize) -> (Node, Vec<String>) {
    use std::io::BufRead;
    let mut child = command
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let node = Node::from(child);
    let mut stdout = std::io::BufReader::new(stdout);
    let mut lines = Vec::with_capacity(count);
    for _ in 0..count {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        lines.push(line.trim().to_owned());
    }
    // Keep the pipe open and drained for as long as the child lives.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (node, lines)
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

/// The test PostgreSQL behind a fresh [`Proxy`] (connections given up after 500 ms), or
/// `None` when PostgreSQL is not configured.
pub async fn postgres_behind_proxy() -> Option<(Proxy, mqtt_im::config::PostgresSettings)> {
    let Some(super::TestBackend::Postgres(mut settings)) = super::TestBackend::postgres() else {
        eprintln!("skipped: MQTT_IM_TEST_POSTGRES_URL is not set");
        return None;
    };
    let target: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(target).await;
    settings.url = settings
        .url
        .replace("127.0.0.1:5432", &proxy.addr.to_string());
    settings.connect_timeout = mqtt_im::config::Period::millis(500);
    Some((proxy, settings))
}

/// The test Redis behind a fresh [`Proxy`], or `None` when Redis is not configured.
pub async fn redis_behind_proxy() -> Option<Proxy> {
    let Some(url) = redis_url() else {
        eprintln!("skipped: MQTT_IM_TEST_REDIS_URL is not set");
        return None;
    };
    let target = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    Some(Proxy::start(target).await)
}
