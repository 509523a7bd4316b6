//! The hook layer: owns the public listeners, authenticates, relays each client to a private
//! rumqttd listener in MQTT 5, and serves IM topics itself. The only code that sees packets.
//!
//! # Layout
//! Files import one way, from the accept loop down to the leaves:
//! - `connection`: a connection's I/O loop (sockets, timers, the ordered IM operations); it
//!   feeds the [`session`](session) and carries out the effects it returns.
//! - `handshake`: CONNECT and take-over, after `admit` (the listener's auth, the hooks'
//!   `admit`, the device count).
//! - `session/`: the protocol state machine of one client, without sockets: publishes by
//!   route, subscriptions, rumqttd's frames, answers, and what goes to the client.
//! - `upstream`: the private MQTT 5 link to rumqttd.
//! - `context`, `sink`: what connections share, and how the IM service reaches one.
//! - leaves: `codec` (framing and read buffers), `acl`, `topics`, `limits`, `links`,
//!   `transport`, `error`.

mod acl;
mod admit;
mod carry;
mod cluster;
mod codec;
mod connection;
mod context;
mod error;
mod expiry;
mod handshake;
mod limits;
mod links;
mod session;
mod sink;
mod topics;
mod transport;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::accept_until;

pub(crate) use carry::GROWTH as CARRIED_GROWTH;
pub(crate) use cluster::{Cluster, Injector, SessionMover};
pub(crate) use context::{EdgeContext, KeptRoutes, PrivateBroker, EDGE_USER};
pub(crate) use error::EdgeError;
pub use limits::{DeviceOverflow, LimitSettings};
pub(crate) use transport::{tls_acceptor, Admission, Listener, Transport};

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
        let id = context.next_connection();
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

/// How often sessions past their expiry are looked for.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

/// Ends, until `shutdown`, the sessions whose MQTT 5 expiry passed while their client stayed
/// away: rumqttd forgets its half, the IM subscriptions go, and so do the session's routes in
/// a cluster (a CONNECT before the sweep finds its session expired by itself).
pub(crate) async fn expire_sessions(ctx: Arc<EdgeContext>, shutdown: CancellationToken) {
    let mut sweep = tokio::time::interval(EXPIRY_SWEEP);
    loop {
        tokio::select! {
            _ = sweep.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        for client_id in ctx.expiring.due(now) {
            end_expired(&ctx, &client_id, now).await;
        }
    }
}

/// Ends the expired session of `client_id`, unless a connection of that client id is
/// around: that one finds it expired itself.
async fn end_expired(ctx: &Arc<EdgeContext>, client_id: &str, now: tokio::time::Instant) {
    let owner = ctx.next_connection();
    let Some(_claim) = ctx.links.try_claim(client_id, owner) else {
        return;
    };
    let Some(device) = ctx.expiring.expired(client_id, now) else {
        return;
    };
    if let Some(device) = &device {
        ctx.drop_session(device);
    }
    let kept = ctx.take_routes(client_id);
    if let Some(cluster) = &ctx.cluster {
        let paths: Vec<String> = kept.plain.iter().map(|f| f.path.clone()).collect();
        cluster.unsubscribed(&paths);
        cluster.client_left(client_id, true);
    }
    if ctx.take_upstream_session(client_id) {
        upstream::Upstream::discard_session(ctx, owner, client_id).await;
    }
    ctx.im.metrics().sessions_expired.inc();
    tracing::debug!(client_id = %crate::text::LoggedId(client_id), "session expired");
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
    if codec::write_packet(&mut out, codec::Protocol::V5, packet).is_err()
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
