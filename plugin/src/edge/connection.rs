//! One client connection: CONNECT handshake (auth, take-over), then a loop relaying packets
//! both ways (to rumqttd once the client needs it) and serving IM topics at packet
//! boundaries.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::codec::{self, kind, Version};
use super::handshake::{handshake, topic_allowed, Arrival, Established};
use super::limits::{DeviceSlot, PublishLimits};
use super::links::LinkClaim;
use super::packet_ids::{Origin, PacketIds};
use super::reply::Outcome;
use super::transport::{ClientStream, ListenerKind, Upgrade};
use super::upstream::{Upstream, UpstreamEvent};
use super::upstream_acks::UpstreamAcks;
use super::{ConnectionSink, EdgeContext, EdgeError};
use crate::auth::acl::{Access, Client as AclClient};
use crate::auth::Identity;
use crate::im::{DeviceEvent, SendOrder};
use crate::metrics::ConnectionLabels;
use crate::store::{Conversation, Device};

/// How often the link to rumqttd is pinged when idle.
const UPSTREAM_PING: Duration = Duration::from_secs(20);
/// How long a connection the server ends waits for the client to hang up first.
const LINGER: Duration = Duration::from_millis(500);
/// Spare read buffer of a quiet connection side, and of a busy one.
pub(super) const READ_SMALL: usize = 512;
const READ_LARGE: usize = 64 << 10;
/// Outgoing buffers larger than this are given back once written (after a burst).
const WRITE_KEEP: usize = 4 << 10;
/// Live deliveries queued per connection before the device counts as busy.
const EVENT_QUEUE: usize = 1024;

/// Characters of a client id or identity shown in log lines.
const LOGGED_ID: usize = 128;
/// Unacknowledged publishes towards a client beyond which live chat deliveries wait in the
/// backlog (keeps packet-id allocation cheap and memory bounded).
const MAX_LIVE_IN_FLIGHT: usize = 1024;
/// IM publishes and requests of one connection waiting for the store; beyond this the
/// connection stops reading from the client until some complete (backpressure).
const MAX_PENDING_OPS: usize = 1024;

/// A subscribe or unsubscribe split between the hook layer and rumqttd, waiting for
/// rumqttd's half of the answer.
#[derive(Debug)]
pub(super) struct PendingAck {
    /// One entry per filter: the hook layer's code, or `None` for rumqttd's.
    pub(super) codes: Vec<Option<u8>>,
}

/// A live connection after a successful CONNECT.
pub(super) struct Connection {
    pub(super) ctx: Arc<EdgeContext>,
    pub(super) id: u64,
    pub(super) version: Version,
    pub(super) device: Device,
    /// Whether the identity is an IM uid (see `Established::im`).
    im: bool,
    /// The CONNECT's username, which ACL rules name.
    username: Option<String>,
    /// What authentication granted: superuser, topic rules, expiry.
    identity: Identity,
    /// This connection's place in its user's device count (given back when it ends).
    device_slot: DeviceSlot,
    /// Publish rate and bandwidth of this connection.
    pub(super) publish_limits: PublishLimits,
    /// Reading from the client pauses until then (a client over its limits).
    pub(super) read_resume: Option<tokio::time::Instant>,
    keep_alive: Option<Duration>,
    clean_session: bool,
    /// Whether the store has recorded this device (see `Established::registered`).
    pub(super) registered: bool,
    /// The client's Maximum Packet Size (MQTT 5), which hook-layer publishes respect.
    pub(super) max_packet: Option<usize>,
    /// The listener and protocol the connection is counted under.
    labels: ConnectionLabels,
    client_rd: ReadHalf<ClientStream>,
    client_wr: WriteHalf<ClientStream>,
    client_in: BytesMut,
    /// Room the last read from the client had, and what it read.
    client_room: usize,
    client_read: usize,
    pub(super) client_out: BytesMut,
    /// The link to rumqttd, opened when the client first needs it.
    pub(super) upstream: Upstream,
    /// For rumqttd; waits here while the link opens.
    pub(super) up_out: BytesMut,
    pub(super) ids: PacketIds,
    /// Answers to rumqttd's publishes, kept in rumqttd's order.
    pub(super) upstream_acks: UpstreamAcks,
    /// Held until rumqttd has closed this connection's link.
    link: LinkClaim,
    /// IM subscriptions of this connection: filter → granted QoS.
    pub(super) im_filters: HashMap<String, u8>,
    pub(super) pending: HashMap<u16, PendingAck>,
    /// Client QoS 2 publishes the hook layer answered, awaiting PUBREL.
    pub(super) im_qos2: HashSet<u16>,
    pub(super) ops: FuturesOrdered<BoxFuture<'static, Outcome>>,
    /// Arrival order of this connection's chat publishes, which their seqs follow.
    pub(super) send_order: SendOrder,
    /// Boxed: the queue's storage is allocated in blocks of slots, and an idle
    /// connection's first block then stays small.
    events_tx: mpsc::Sender<Box<DeviceEvent>>,
    events_rx: mpsc::Receiver<Box<DeviceEvent>>,
    pub(super) online: bool,
    pub(super) digest_sent: bool,
    pub(super) client_disconnected: bool,
    /// A 3.1.1 chat publish could not be stored: the connection ends once its answers are
    /// written, because 3.1.1 clients retransmit unacknowledged publishes only on reconnect.
    pub(super) unstored: bool,
    last_seen: Instant,
    last_upstream_write: Instant,
}

/// Serves one accepted socket to its end: transport upgrade (TLS, WebSocket), CONNECT, loop.
pub(super) async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    upgrade: Upgrade,
    ctx: Arc<EdgeContext>,
    id: u64,
    shutdown: CancellationToken,
) {
    let listener = upgrade.kind();
    let span = tracing::info_span!("connection", id, %peer, %listener, client_id = tracing::field::Empty, uid = tracing::field::Empty);
    async move {
        // Each stage in a box of its own: a connection's task then holds only the stage it
        // is in (an idle connection does not keep room for the handshake's futures).
        let upgrading = Box::pin(upgrade.upgrade(tcp));
        let upgraded = match timeout(ctx.connect_timeout, upgrading).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(e)) => return tracing::debug!(error = %e, "transport handshake failed"),
            Err(_) => return tracing::debug!("transport handshake timed out"),
        };
        let arrival = Arrival { id, peer, listener };
        match Box::pin(handshake(upgraded, Arc::clone(&ctx), &arrival)).await {
            Ok(established) => {
                let connection = Connection::new(ctx, id, listener, established);
                let span = tracing::Span::current();
                // Any UTF-8 up to 64 KiB: log lines get a short, clean form.
                let client_id = crate::text::clean(&connection.device.client_id, LOGGED_ID);
                span.record("client_id", client_id.as_str());
                span.record(
                    "uid",
                    crate::text::clean(&connection.device.uid, LOGGED_ID).as_str(),
                );
                let run = Box::pin(connection.run(shutdown));
                run.await;
            }
            Err(e) => tracing::debug!(error = %e, "connect failed"),
        }
    }
    .instrument(span)
    .await
}

impl Connection {
    /// The connection loop's state for an established client.
    fn new(
        ctx: Arc<EdgeContext>,
        id: u64,
        listener: ListenerKind,
        established: Established,
    ) -> Self {
        let Established {
            version,
            device,
            im,
            username,
            identity,
            device_slot,
            keep_alive,
            clean_session,
            registered,
            max_packet,
            client,
            client_in,
            client_out,
            upstream,
            link,
        } = established;
        let (client_rd, client_wr) = tokio::io::split(client);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let im_filters = if clean_session {
            ctx.drop_session(&device);
            HashMap::new()
        } else {
            ctx.restore_session(&device)
        };
        tracing::debug!(?version, keep_alive, "connected");
        let labels = connection_labels(listener, version);
        let publish_limits = PublishLimits::new(&ctx.limits);
        ctx.im.metrics().connects.get_or_create(&labels).inc();
        ctx.im.metrics().connections.get_or_create(&labels).inc();
        Self {
            ctx,
            id,
            version,
            device,
            im,
            username,
            identity,
            device_slot,
            publish_limits,
            read_resume: None,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            clean_session,
            registered,
            max_packet,
            labels,
            client_rd,
            client_wr,
            client_in,
            client_room: 0,
            client_read: 0,
            client_out,
            upstream,
            up_out: BytesMut::new(),
            ids: PacketIds::default(),
            upstream_acks: UpstreamAcks::default(),
            link,
            im_filters,
            pending: HashMap::new(),
            im_qos2: HashSet::new(),
            ops: FuturesOrdered::new(),
            send_order: SendOrder::default(),
            events_tx,
            events_rx,
            online: false,
            digest_sent: false,
            client_disconnected: false,
            unstored: false,
            last_seen: Instant::now(),
            last_upstream_write: Instant::now(),
        }
    }
}

fn connection_labels(listener: ListenerKind, version: Version) -> ConnectionLabels {
    ConnectionLabels {
        listener: listener.as_str(),
        protocol: version.name(),
    }
}

/// Makes room for the next read into `buf` and returns it, given what the last read got
/// (`read`) of the room it had (`room`): large after a read filled all the room (a burst gets
/// its bytes in few system calls), small again once a small read finds it drained (an idle
/// connection stays small), else as it is with at least a little room.
pub(super) fn make_room(buf: &mut BytesMut, read: usize, room: usize) -> usize {
    if read > 0 && read >= room {
        buf.reserve(READ_LARGE);
    } else if read < READ_SMALL && buf.is_empty() && buf.capacity() > 2 * READ_SMALL {
        *buf = BytesMut::with_capacity(READ_SMALL);
    } else {
        buf.reserve(READ_SMALL);
    }
    buf.capacity() - buf.len()
}

/// Completes at `at`, never without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why the loop stopped.
#[derive(Debug)]
enum End {
    ClientDisconnected,
    ClientGone,
    /// A newer connection of the same client id took the session over.
    TakenOver,
    /// A 3.1.1 chat publish could not be stored (see `Connection::unstored`).
    Unstored,
    UpstreamGone,
    KeepAliveExpired,
    /// The credentials (a JWT) expired.
    CredentialsExpired,
    /// A newer device of the user took this one's place (`limits.max_devices_per_user`).
    TooManyDevices,
    Shutdown,
    Failed(EdgeError),
}

impl Connection {
    async fn run(mut self, shutdown: CancellationToken) {
        let tick = self.keep_alive.map_or(UPSTREAM_PING, |k| {
            (k / 3).clamp(Duration::from_millis(250), UPSTREAM_PING)
        });
        let mut ticker = tokio::time::interval(tick);
        let expiry = self.identity.expires.map(|at| {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::Instant::now() + left
        });
        if !self.im_filters.is_empty() {
            // A resumed persistent session: groups it still belongs to, online again, and a
            // fresh digest.
            self.resume_subscriptions();
        }
        // Packets that arrived together with the CONNECT, and with rumqttd's CONNACK (a
        // resumed session's queued messages).
        let mut end = self.on_upstream_bytes().err().map(End::Failed);
        if end.is_none() {
            end = self.on_client_bytes().err().map(End::Failed);
        }
        while end.is_none() {
            self.reserve_reads();
            let step = tokio::select! {
                read = self.client_rd.read_buf(&mut self.client_in),
                    if self.ops.len() < MAX_PENDING_OPS && self.read_resume.is_none() => match read {
                    Ok(0) | Err(_) => Err(End::ClientGone),
                    Ok(read) => {
                        self.client_read = read;
                        self.last_seen = Instant::now();
                        self.on_client_bytes().map_err(End::Failed)
                    }
                },
                event = self.upstream.next() => match event {
                    UpstreamEvent::Opened | UpstreamEvent::Bytes => {
                        self.on_upstream_bytes().map_err(End::Failed)
                    }
                    UpstreamEvent::Closed => Err(End::UpstreamGone),
                    UpstreamEvent::Failed(e) => Err(End::Failed(e)),
                },
                Some(outcome) = self.ops.next(), if !self.ops.is_empty() => {
                    self.on_outcome(outcome).map_err(End::Failed)
                }
                Some(event) = self.events_rx.recv() => self.on_event(*event).map_err(End::Failed),
                _ = ticker.tick() => self.on_tick(),
                () = shutdown.cancelled() => Err(End::Shutdown),
                () = self.link.kick.cancelled() => Err(End::TakenOver),
                () = until(expiry) => Err(End::CredentialsExpired),
                () = until(self.read_resume) => {
                    self.read_resume = None;
                    self.on_client_bytes().map_err(End::Failed)
                }
                () = self.device_slot.close.cancelled() => Err(End::TooManyDevices),
            };
            if let Err(stop) = step {
                end = Some(stop);
            }
            if let Err(e) = self.flush().await {
                end.get_or_insert(End::Failed(e));
            }
            if self.client_disconnected {
                end.get_or_insert(End::ClientDisconnected);
            }
            if self.unstored {
                end.get_or_insert(End::Unstored);
            }
        }
        // Boxed: only an ending connection needs room for the goodbye.
        Box::pin(self.finish(end.unwrap_or(End::ClientGone))).await;
    }

    /// Room for the next reads (see [`make_room`]).
    fn reserve_reads(&mut self) {
        self.client_room = make_room(&mut self.client_in, self.client_read, self.client_room);
        self.upstream.make_room();
    }

    fn on_tick(&mut self) -> Result<(), End> {
        // Quiet since the last tick: a buffer left large by a burst is given back (a client
        // without keep-alive may never send the small read that would do it).
        if self.last_seen.elapsed() >= UPSTREAM_PING && self.client_in.is_empty() {
            self.client_read = 0;
        }
        if let Some(keep_alive) = self.keep_alive {
            if self.last_seen.elapsed() > keep_alive {
                return Err(End::KeepAliveExpired);
            }
        }
        if self.upstream.is_open() && self.last_upstream_write.elapsed() >= UPSTREAM_PING {
            self.up_out.extend_from_slice(&[kind::PINGREQ << 4, 0]);
        }
        Ok(())
    }

    fn on_client_bytes(&mut self) -> Result<(), EdgeError> {
        while let Some(frame) = codec::next_frame(&mut self.client_in, self.ctx.max_packet)? {
            self.on_client_frame(frame)?;
            // A client over its limits waits, even for what it already sent.
            if self.client_disconnected || self.read_resume.is_some() {
                break;
            }
        }
        Ok(())
    }

    fn on_upstream_bytes(&mut self) -> Result<(), EdgeError> {
        while let Some(frame) = self.upstream.next_frame()? {
            self.on_upstream_frame(frame)?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), EdgeError> {
        if !self.up_out.is_empty() && self.upstream.write(&mut self.up_out).await? {
            self.last_upstream_write = Instant::now();
        }
        if !self.client_out.is_empty() {
            self.client_wr.write_all(&self.client_out).await?;
            // TLS and WebSocket buffer what is written.
            self.client_wr.flush().await?;
            self.client_out.clear();
            if self.client_out.capacity() > WRITE_KEEP {
                self.client_out = BytesMut::new();
            }
        }
        if self.up_out.is_empty() && self.up_out.capacity() > WRITE_KEEP {
            self.up_out = BytesMut::new();
        }
        Ok(())
    }

    /// Bytes for rumqttd: the link opens on the client's first need of it (they wait in
    /// `up_out` meanwhile).
    pub(super) fn rumqttd_out(&mut self) -> &mut BytesMut {
        self.upstream.open(&self.ctx, self.id);
        &mut self.up_out
    }

    /// Whether the topic ACL lets this client have `access` to a non-IM `topic` (a filter,
    /// when `subscribing`); refusals are counted under `action`.
    pub(super) fn acl_allows(
        &self,
        topic: &str,
        access: Access,
        subscribing: bool,
        action: &'static str,
    ) -> bool {
        let client = AclClient {
            username: self.username.as_deref(),
            client_id: &self.device.client_id,
        };
        let allowed = topic_allowed(
            &self.ctx,
            &self.identity,
            &client,
            topic,
            access,
            subscribing,
        );
        if !allowed {
            self.ctx.im.metrics().count_acl_denial(action);
        }
        allowed
    }

    /// Stops reading from the client for `wait` (it is over its publish limits).
    pub(super) fn pause_reads(&mut self, wait: std::time::Duration) {
        let until = tokio::time::Instant::now() + wait;
        self.read_resume = Some(self.read_resume.map_or(until, |at| at.max(until)));
    }

    /// The IM uid, if the client's identity is one.
    pub(super) fn im_uid(&self) -> Option<&str> {
        self.im.then_some(self.device.uid.as_str())
    }

    /// Marks the device online for live delivery.
    pub(super) fn go_online(&mut self) {
        if !self.online {
            self.online = true;
            self.ctx.im.online(&self.device, self.id, self.sink());
        }
    }

    /// How the IM service reaches this connection.
    pub(super) fn sink(&self) -> Arc<ConnectionSink> {
        Arc::new(ConnectionSink {
            events: self.events_tx.clone(),
            kick: self.link.kick.clone(),
        })
    }

    /// Marks the device offline (unsubscribed or gone).
    pub(super) fn go_offline(&mut self) {
        if self.online {
            self.online = false;
            self.ctx.im.offline(&self.device, self.id);
        }
    }

    async fn finish(mut self, end: End) {
        let connections = &self.ctx.im.metrics().connections;
        connections.get_or_create(&self.labels).dec();
        self.go_offline();
        for (_, gid) in self.group_filters() {
            self.ctx.im.unwatch_group(&gid, self.id);
        }
        if !self.clean_session {
            let filters = std::mem::take(&mut self.im_filters);
            self.ctx.keep_session(&self.device, filters);
        }
        // Answer what was already accepted before the socket goes (e.g. on shutdown).
        while let Some(outcome) = self.ops.next().await {
            if self.on_outcome(outcome).is_err() {
                break;
            }
        }
        self.say_why(&end);
        let _ = self.flush().await;
        match &end {
            End::Failed(e) => tracing::info!(error = %e, "connection closed on error"),
            other => tracing::debug!(reason = ?other, "connection closed"),
        }
        // rumqttd 0.20 frees the connection id when it handles DISCONNECT and again when
        // the socket closes, and mishandles a new link of a client id whose old link is not
        // gone yet; so the link is closed (without DISCONNECT, rumqttd publishes the will)
        // and this waits until rumqttd has closed it too, before the client id is released.
        let graceful = matches!(end, End::ClientDisconnected);
        let linked = self.upstream.close(&mut self.up_out, graceful).await;
        if linked && !self.clean_session {
            self.ctx.keep_upstream_session(&self.device.client_id);
        }
        let Self {
            mut client_rd,
            mut client_wr,
            link,
            ..
        } = self;
        // The client id is free for a newer connection from here.
        drop(link);
        if !matches!(end, End::ClientDisconnected | End::ClientGone) {
            // Closed by the server: the client gets a moment to read the last answers (and
            // a DISCONNECT) and to hang up itself; some clients drop what they read together
            // with the end of the stream.
            let mut rest = [0u8; 256];
            let _ = timeout(LINGER, async {
                while matches!(client_rd.read(&mut rest).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        let _ = client_wr.shutdown().await;
    }

    /// Tells an MQTT 5 client why the server closes its connection (3.1.1 has no way to).
    fn say_why(&mut self, end: &End) {
        use rumqttd::protocol::{
            Disconnect, DisconnectProperties, DisconnectReasonCode as Reason, Packet,
        };
        let (reason_code, why) = match end {
            End::Shutdown => (Reason::ServerShuttingDown, "server shutting down"),
            End::TakenOver => (
                Reason::SessionTakenOver,
                "another connection took the session",
            ),
            End::KeepAliveExpired => (Reason::KeepAliveTimeout, "keep-alive expired"),
            End::CredentialsExpired => (Reason::MaximumConnectTime, "credentials expired"),
            End::TooManyDevices => (
                Reason::QuotaExceeded,
                "a newer device of this user took this connection's place",
            ),
            _ => return,
        };
        if self.version == Version::V5 {
            // With properties: rumqttd 0.20 miscounts the length of a DISCONNECT without them.
            let properties = DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(why.to_owned()),
                user_properties: Vec::new(),
                server_reference: None,
            };
            let packet = Packet::Disconnect(Disconnect { reason_code }, Some(properties));
            if let Err(e) = codec::write_packet(&mut self.client_out, self.version, packet) {
                tracing::debug!(error = %e, "cannot write DISCONNECT");
            }
        }
    }

    /// Writes a hook-layer publish (digest, reply, live delivery) into the client connection.
    pub(super) fn write_own_publish(
        &mut self,
        topic: &str,
        qos: u8,
        origin: super::packet_ids::Origin,
        properties: &[u8],
        payload: &[u8],
    ) {
        let size = super::fit::overhead(topic, properties.len()) + payload.len();
        if self.max_packet.is_some_and(|max| size > max) {
            // MQTT 5 forbids sending it; a chat message stays in the device's backlog.
            tracing::debug!(
                topic,
                size,
                "publish exceeds the client's maximum packet size"
            );
            return;
        }
        let pkid = if qos > 0 {
            match self.ids.allocate(origin) {
                Some(pkid) => pkid,
                None => {
                    tracing::warn!(topic, "no free packet id; message left in the backlog");
                    return;
                }
            }
        } else {
            0
        };
        codec::write_publish(
            &mut self.client_out,
            self.version,
            qos << 1,
            topic.as_bytes(),
            pkid,
            properties,
            payload,
        );
    }

    fn on_event(&mut self, event: DeviceEvent) -> Result<(), EdgeError> {
        match event {
            DeviceEvent::Chat {
                conversation,
                seq,
                payload,
                group,
            } => {
                let topic = match &group {
                    Some(gid) => self.ctx.topics.group(gid),
                    None => self.ctx.topics.inbox(&self.device.uid),
                };
                self.deliver(&topic, conversation, seq, &payload);
            }
            DeviceEvent::Notice(payload) => {
                let resp = self.ctx.topics.response(&self.device.uid);
                if let Some(qos) = self.granted_qos(&resp) {
                    self.write_own_publish(&resp, qos.min(1), Origin::Own, &[], &payload);
                }
            }
            DeviceEvent::Revoked { group } => {
                let topic = self.ctx.topics.group(&group);
                self.im_filters.remove(&topic);
                self.ctx.im.unwatch_group(&group, self.id);
                tracing::debug!(group, "removed from the group: subscription dropped");
            }
            // Never queued: the sink cancels the link's kick, which ends the connection.
            DeviceEvent::TakenOver => {}
        }
        Ok(())
    }

    /// Writes a live chat message to `topic` if this connection subscribed to it.
    fn deliver(&mut self, topic: &str, conversation: Conversation, seq: u64, payload: &[u8]) {
        let Some(qos) = self.granted_qos(topic) else {
            return;
        };
        if self.ids.in_flight() >= MAX_LIVE_IN_FLIGHT {
            // A device that stops acknowledging gets the rest through its digest and pulls.
            tracing::debug!(
                seq,
                "too many unacknowledged deliveries; left in the backlog"
            );
            return;
        }
        let origin = Origin::Chat { conversation, seq };
        self.write_own_publish(topic, qos.min(1), origin, &[], payload);
    }

    /// Highest QoS among this connection's IM filters matching `topic`.
    pub(super) fn granted_qos(&self, topic: &str) -> Option<u8> {
        self.im_filters
            .iter()
            .filter(|(filter, _)| rumqttd::protocol::matches(topic, filter))
            .map(|(_, qos)| *qos)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffers_grow_for_bursts_and_shrink_back_when_quiet() {
        let mut buf = BytesMut::new();
        let room = make_room(&mut buf, 0, 0);
        assert!((READ_SMALL..2 * READ_SMALL).contains(&room), "{room}");
        // A read that filled the room: the next one gets a large buffer.
        let room = make_room(&mut buf, room, room);
        assert!(room >= READ_LARGE);
        // A busy stream (reads larger than small, not filling) keeps it.
        let kept = make_room(&mut buf, 4 * READ_SMALL, room);
        assert!(kept >= READ_LARGE);
        // A small read that leaves nothing pending: back to small.
        let room = make_room(&mut buf, 2, kept);
        assert!(buf.capacity() < 2 * READ_SMALL && room >= READ_SMALL);
        // Not while a partial frame waits in it.
        buf.extend_from_slice(&[0x30; 10]);
        let _ = make_room(&mut buf, room, room);
        let room = make_room(&mut buf, 2, READ_LARGE);
        assert!(room >= READ_LARGE - 10);
    }
}
