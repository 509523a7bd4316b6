//! The hook layer: owns the public listeners, authenticates, relays each client to a private
//! rumqttd listener in MQTT 5, and serves IM topics itself. The only code that sees packets.

mod acl;
mod codec;
mod connection;
mod fit;
mod handshake;
mod limits;
mod links;
mod packet_ids;
mod relay;
mod reply;
mod session;
mod subscribe;
mod topics;
mod transport;
mod upstream;
mod upstream_acks;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::accept_until;
use crate::auth::Authenticator;
use crate::hook::Hooks;
use crate::im::{Device, DeviceEvent, DeviceSink, ImService};
pub(crate) use codec::{CodecError, Version};
pub use limits::{DeviceOverflow, LimitSettings};
use topics::Topics;
pub(crate) use transport::{tls_acceptor, Admission, Listener, Transport};

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
    #[error("websocket: {0}")]
    WebSocket(String),
}

/// The embedded rumqttd as the hook layer reaches it.
#[derive(Debug)]
pub(crate) struct PrivateBroker {
    /// Its private listeners; connections are spread over them.
    pub(crate) listeners: Vec<SocketAddr>,
    /// The per-process secret that opens them.
    pub(crate) secret: String,
    /// The largest packet any public listener takes (rumqttd's links take as much).
    pub(crate) max_packet: usize,
    /// How long rumqttd may take to accept a link.
    pub(crate) connect_timeout: Duration,
}

/// What every connection needs, shared.
#[derive(Debug)]
pub(crate) struct EdgeContext {
    pub(crate) im: ImService,
    /// The hook chain: the Lua policy, then the embedder's hooks.
    pub(crate) hooks: Hooks,
    pub(crate) topics: Topics,
    pub(crate) auth: Arc<Authenticator>,
    /// The embedded rumqttd behind the hook layer.
    pub(crate) broker: PrivateBroker,
    next_connection: AtomicU64,
    /// Persistent sessions, by (uid, client id): their IM subscriptions, restored when the
    /// device reconnects without a clean session (rumqttd keeps only the non-IM ones).
    persistent: Mutex<HashMap<(String, String), HashMap<String, u8>>>,
    /// Client ids whose persistent session rumqttd keeps (their link was open when they
    /// left): their next connection links to rumqttd at once, to resume or discard it.
    upstream_sessions: Mutex<HashSet<String>>,
    /// One rumqttd link per client id at a time (the hook layer does session take-over).
    pub(crate) links: Arc<links::Links>,
    /// Per-client, per-user and per-listener limits.
    pub(crate) limits: LimitSettings,
    /// Connections per user, for `limits.max_devices_per_user`.
    pub(crate) devices: Arc<limits::Devices>,
}

impl EdgeContext {
    /// The private rumqttd listener for connection `id` (round robin).
    pub(crate) fn broker_for(&self, id: u64) -> Option<SocketAddr> {
        let listeners = &self.broker.listeners;
        let count = u64::try_from(listeners.len()).ok().filter(|n| *n > 0)?;
        let index = usize::try_from(id % count).ok()?;
        listeners.get(index).copied()
    }

    /// Takes the IM subscriptions a persistent session of `device` left behind.
    pub(crate) fn restore_session(&self, device: &Device) -> HashMap<String, u8> {
        let key = (device.uid.clone(), device.client_id.clone());
        self.persistent
            .lock()
            .ok()
            .and_then(|mut sessions| sessions.remove(&key))
            .unwrap_or_default()
    }

    /// Whether `device` left a persistent session (for CONNACK's session present).
    pub(crate) fn has_session(&self, device: &Device) -> bool {
        let key = (device.uid.clone(), device.client_id.clone());
        self.persistent
            .lock()
            .is_ok_and(|sessions| sessions.contains_key(&key))
    }

    /// Keeps a persistent session, with its IM subscriptions, for the device's next
    /// connection.
    pub(crate) fn keep_session(&self, device: &Device, filters: HashMap<String, u8>) {
        if let Ok(mut sessions) = self.persistent.lock() {
            let key = (device.uid.clone(), device.client_id.clone());
            sessions.insert(key, filters);
        }
    }

    /// Ends the session of a device that connected with a clean session.
    pub(crate) fn drop_session(&self, device: &Device) {
        if let Ok(mut sessions) = self.persistent.lock() {
            sessions.remove(&(device.uid.clone(), device.client_id.clone()));
        }
    }

    /// Whether rumqttd keeps a session of `client_id`; forgets it (the link that opens now
    /// resumes or discards it, and records it again as it closes).
    pub(crate) fn take_upstream_session(&self, client_id: &str) -> bool {
        self.upstream_sessions
            .lock()
            .is_ok_and(|mut ids| ids.remove(client_id))
    }

    /// Records that rumqttd keeps the session of `client_id` after its link closed.
    pub(crate) fn keep_upstream_session(&self, client_id: &str) {
        if let Ok(mut ids) = self.upstream_sessions.lock() {
            ids.insert(client_id.to_owned());
        }
    }

    /// The shared part of every connection: IM topics under `prefix`, clients held to
    /// `limits`, relayed to `broker`.
    pub(crate) fn new(
        im: ImService,
        hooks: Hooks,
        auth: Arc<Authenticator>,
        broker: PrivateBroker,
        prefix: &str,
        limits: LimitSettings,
    ) -> Self {
        Self {
            im,
            hooks,
            topics: Topics::new(prefix),
            auth,
            broker,
            next_connection: AtomicU64::new(1),
            persistent: Mutex::new(HashMap::new()),
            upstream_sessions: Mutex::new(HashSet::new()),
            links: Arc::default(),
            limits,
            devices: Arc::default(),
        }
    }
}

/// Accepts clients until `shutdown`, one task per connection, tracked by `tasks`; each is
/// upgraded to the listener's transport in its own task.
pub(crate) async fn serve(
    listener: TcpListener,
    profile: Arc<Listener>,
    context: Arc<EdgeContext>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let max = context.limits.max_connections_per_listener;
    let slots = (max > 0).then(|| Arc::new(tokio::sync::Semaphore::new(max)));
    accept_until(&listener, &shutdown, |stream, peer| {
        // Before any TLS or WebSocket work: a full listener costs nothing more.
        let slot = match slots.as_ref().map(|s| Arc::clone(s).try_acquire_owned()) {
            Some(Err(_)) => {
                context.im.metrics().count_limited("connections");
                return;
            }
            Some(Ok(slot)) => Some(slot),
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let id = context.next_connection.fetch_add(1, Ordering::Relaxed);
        let context = Arc::clone(&context);
        let shutdown = shutdown.clone();
        let profile = Arc::clone(&profile);
        tasks.spawn(async move {
            connection::serve(stream, peer, profile, context, id, shutdown).await;
            drop(slot);
        });
    })
    .await;
}

/// A connection as a [`DeviceSink`]: a bounded queue drained by the connection task.
#[derive(Debug)]
pub(crate) struct ConnectionSink {
    events: mpsc::Sender<Box<DeviceEvent>>,
    /// Ends the connection as taken over; never lost to a full queue of a stalled client.
    kick: tokio_util::sync::CancellationToken,
    /// Ends the connection as evicted by an operator; never lost either.
    evict: tokio_util::sync::CancellationToken,
}

impl DeviceSink for ConnectionSink {
    fn push(&self, event: DeviceEvent) -> bool {
        match event {
            DeviceEvent::TakenOver => {
                self.kick.cancel();
                true
            }
            DeviceEvent::Evicted => {
                self.evict.cancel();
                true
            }
            event => self.events.try_send(Box::new(event)).is_ok(),
        }
    }
}

/// Whether rumqttd at `addr` is up and accepts the hook layer's credentials: a real
/// CONNECT/CONNACK/DISCONNECT, so the probe never looks like a broken client to rumqttd.
pub(crate) async fn broker_ready(addr: SocketAddr, secret: &str) -> bool {
    use rumqttd::protocol::{Connect, ConnectReturnCode, Login, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let connect = Connect {
        keep_alive: 10,
        client_id: format!("mqtt-im-probe-{:016x}", rand::random::<u64>()),
        clean_session: true,
    };
    let login = Login {
        username: EDGE_USER.into(),
        password: secret.into(),
    };
    let mut out = bytes::BytesMut::new();
    let packet = Packet::Connect(connect, None, None, None, Some(login));
    if codec::write_packet(&mut out, codec::Version::V5, packet).is_err()
        || stream.write_all(&out).await.is_err()
    {
        return false;
    }
    let mut input = bytes::BytesMut::with_capacity(64);
    let answer = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Ok(Some(frame)) = codec::next_frame(&mut input, 1024) {
                return frame.decode_upstream().ok();
            }
            match stream.read_buf(&mut input).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await;
    let ready = matches!(
        answer,
        Ok(Some(Packet::ConnAck(ack, _))) if ack.code == ConnectReturnCode::Success
    );
    let _ = stream.write_all(&[codec::kind::DISCONNECT << 4, 0]).await;
    // Let rumqttd close the link (see `Connection::finish` for why).
    let mut rest = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
    })
    .await;
    ready
}
