//! A TCP proxy and the binary as a child process: services that go down, nodes that die.

use std::net::SocketAddr;

/// A TCP proxy a test can cut, stall and restore, to take a service "down" without touching
/// the shared server other tests use.
pub struct Proxy {
    pub addr: SocketAddr,
    state: std::sync::Arc<std::sync::atomic::AtomicU8>,
    cut: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

const UP: u8 = 0;
const DOWN: u8 = 1;
const STALLED: u8 = 2;

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
        let state = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(UP));
        let cut = std::sync::Arc::new(tokio::sync::Notify::new());
        let (flag, notify) = (state.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                match flag.load(Ordering::SeqCst) {
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
                let (notify, flag) = (notify.clone(), flag.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = notify.notified() => {}
                    }
                    if flag.load(Ordering::SeqCst) == STALLED {
                        // Both ends stay open and silent: a link that died without a word.
                        let _held = (inbound, outbound);
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        Self {
            addr,
            state,
            cut,
            task,
        }
    }

    fn set(&self, state: u8) {
        self.state.store(state, std::sync::atomic::Ordering::SeqCst);
        self.cut.notify_waiters();
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

    /// New connections pass again (stalled ones stay dead).
    pub fn up(&self) {
        self.state.store(UP, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The `mqtt-im` binary as a child process, killed when dropped: a failing test never
/// leaves a node running.
pub struct Node(std::process::Child);

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
    let node = Node(child);
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
