//! The hook layer: owns the public listeners, authenticates, relays each client to a private
//! rumqttd listener in MQTT 5, and serves IM topics itself. The only code that sees packets.

mod acl;
mod auth;
mod codec;
mod connection;
mod packet_ids;
mod relay;
mod reply;
mod topics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AuthSettings, Config};
use crate::im::{DeviceEvent, DeviceSink, ImService};
pub(crate) use codec::CodecError;
use topics::Topics;

/// Username the hook layer presents to rumqttd; the password is the per-process secret.
pub(crate) const EDGE_USER: &str = "mqtt-im-edge";

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EdgeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection refused: {0}")]
    Refused(&'static str),
}

/// What every connection needs, shared.
#[derive(Debug)]
pub(crate) struct EdgeContext {
    pub(crate) im: ImService,
    pub(crate) topics: Topics,
    pub(crate) auth: AuthSettings,
    pub(crate) broker: SocketAddr,
    pub(crate) secret: String,
    pub(crate) max_packet: usize,
    pub(crate) connect_timeout: Duration,
    next_connection: AtomicU64,
}

impl EdgeContext {
    pub(crate) fn new(config: &Config, im: ImService, broker: SocketAddr, secret: String) -> Self {
        Self {
            im,
            topics: Topics::new(&config.im.prefix),
            auth: config.auth.clone(),
            broker,
            secret,
            max_packet: config.broker.max_packet_size,
            connect_timeout: Duration::from_millis(config.broker.connect_timeout_ms),
            next_connection: AtomicU64::new(1),
        }
    }
}

/// Accepts clients until `shutdown`, one task per connection, tracked by `tasks`.
pub(crate) async fn serve(
    listener: TcpListener,
    context: Arc<EdgeContext>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let _ = stream.set_nodelay(true);
                let id = context.next_connection.fetch_add(1, Ordering::Relaxed);
                let context = Arc::clone(&context);
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    connection::serve(stream, peer, context, id, shutdown).await;
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A connection as a [`DeviceSink`]: a bounded queue drained by the connection task.
#[derive(Debug)]
pub(crate) struct ConnectionSink(mpsc::Sender<DeviceEvent>);

impl DeviceSink for ConnectionSink {
    fn push(&self, event: DeviceEvent) -> bool {
        self.0.try_send(event).is_ok()
    }
}
