//! The operator's HTTP endpoint (`listeners.metrics`): Prometheus `GET /metrics`, and
//! `GET /status`, a JSON snapshot of online users and devices, connections and store sizes
//! (what `mqtt-im stats` prints). Read-only, GET only, bounded requests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::accept_until;
use crate::im::ImService;
use crate::metrics::{catch_up, Metrics, PolicyErrorLabels};
use crate::policy::LuaPolicy;
use crate::store::{Store, StoreSizes};

/// Largest request head accepted.
const MAX_REQUEST: usize = 8192;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint reports on.
#[derive(Debug, Clone)]
pub(crate) struct StatusSource {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) im: ImService,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) policy: Arc<LuaPolicy>,
    pub(crate) backend: &'static str,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
struct Status {
    online_users: usize,
    online_devices: usize,
    /// Open connections by listener (`mqtt`, `tls`, `ws`, `wss`).
    connections: BTreeMap<&'static str, i64>,
    backend: &'static str,
    /// `None` when the store could not answer.
    store: Option<StoreSizes>,
    store_error: Option<String>,
    /// Dependencies this node cannot reach now (`store`, `redis`); empty when healthy.
    degraded: Vec<&'static str>,
}

impl StatusSource {
    /// Brings the figures kept elsewhere (presence, policy counters) into the metrics.
    fn refresh(&self) {
        let (users, devices) = self.im.online_counts();
        let metrics = &self.metrics;
        metrics
            .online_users
            .set(i64::try_from(users).unwrap_or(i64::MAX));
        metrics
            .online_devices
            .set(i64::try_from(devices).unwrap_or(i64::MAX));
        for (script, kind, total) in self.policy.failures() {
            let labels = PolicyErrorLabels {
                script,
                kind: kind.label(),
            };
            catch_up(&metrics.policy_errors.get_or_create(&labels), total);
        }
    }

    async fn status(&self) -> Status {
        let (online_users, online_devices) = self.im.online_counts();
        let (store, store_error) = match self.store.sizes().await {
            Ok(sizes) => (Some(sizes), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let mut degraded = Vec::new();
        if store_error.is_some() {
            degraded.push("store");
        }
        if self.im.cluster_up() == Some(false) {
            degraded.push("redis");
        }
        Status {
            online_users,
            online_devices,
            connections: self.metrics.connections_by_listener(),
            backend: self.backend,
            store,
            store_error,
            degraded,
        }
    }

    /// The status code, content type and body answering `path`.
    async fn answer(&self, path: &str) -> (&'static str, &'static str, String) {
        match path {
            "/metrics" => {
                self.refresh();
                let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                ("200 OK", kind, self.metrics.render())
            }
            "/status" => match serde_json::to_string_pretty(&self.status().await) {
                Ok(json) => ("200 OK", "application/json", json),
                Err(e) => ("500 Internal Server Error", "text/plain", e.to_string()),
            },
            _ => (
                "404 Not Found",
                "text/plain",
                "try /metrics or /status\n".into(),
            ),
        }
    }
}

/// Serves the endpoint until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    source: StatusSource,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let source = Arc::new(source);
    accept_until(&listener, &shutdown, |stream, _| {
        let source = Arc::clone(&source);
        tasks.spawn(async move {
            if let Err(e) = respond(stream, &source).await {
                tracing::debug!(error = %e, "status request failed");
            }
        });
    })
    .await;
}

async fn respond(mut stream: TcpStream, source: &StatusSource) -> std::io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let mut words = head.split_ascii_whitespace();
    let (status, kind, body) = match (words.next(), words.next()) {
        (Some("GET"), Some(target)) => {
            let path = target.split('?').next().unwrap_or_default();
            source.answer(path).await
        }
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The request line and headers (the body, if any, is ignored).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
