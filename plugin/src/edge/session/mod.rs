//! One client's protocol state, without its sockets: the connection loop hands it decoded
//! frames, finished IM operations, device events and clock ticks; it answers with effects —
//! bytes for the client, bytes for rumqttd, a request to open the rumqttd link, IM operations
//! to start (in arrival order), a pause of reading — and never touches a socket or awaits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::codec::{self, Frame, PublishView, Version};
use super::handshake::topic_allowed;
use super::limits::PublishLimits;
use super::packet_ids::{Origin, PacketIds};
use super::reply::Outcome;
use super::upstream_acks::UpstreamAcks;
use super::{ConnectionSink, EdgeContext, EdgeError};
use crate::auth::acl::{Access, Client as AclClient};
use crate::auth::Identity;
use crate::im::{Conversation, Device};
use crate::im::{DeviceEvent, SendOrder};

/// Unacknowledged publishes towards a client beyond which live chat deliveries wait in the
/// backlog (keeps packet-id allocation cheap and memory bounded).
const MAX_LIVE_IN_FLIGHT: usize = 1024;
/// IM publishes and requests of one connection waiting for the store, or publishes waiting
/// for the client's Receive Maximum; beyond this the connection stops reading from the
/// client until some complete (backpressure). A listener may bound the former lower.
const MAX_PENDING: usize = 1024;

/// A device's recording in the store, awaited by whichever operation needs it first.
pub(super) type Registration = Shared<oneshot::Receiver<bool>>;

/// Whether the device is recorded in the store, once `registration` has finished.
pub(super) async fn recorded(registration: Option<Registration>) -> bool {
    match registration {
        Some(registration) => registration.await.unwrap_or(false),
        None => false,
    }
}

/// An IM operation of one connection, started in arrival order; its outcome comes back to
/// [`Session::on_outcome`] in the same order.
pub(super) type Op = BoxFuture<'static, Outcome>;

/// What the handshake settled about a client, which its session starts from.
pub(super) struct Terms {
    pub(super) version: Version,
    /// The client as hooks see it.
    pub(super) client: Arc<crate::hook::Client>,
    /// The listener it came in on.
    pub(super) listener: Arc<super::Listener>,
    /// The client id and the identity the client authenticated as.
    pub(super) device: Device,
    /// Whether that identity is a valid IM uid: without one, IM topics are refused and the
    /// client uses pass-through topics only.
    pub(super) im: bool,
    /// The CONNECT's username, which ACL rules name.
    pub(super) username: Option<String>,
    /// What authentication granted: superuser, topic rules, expiry.
    pub(super) identity: Identity,
    /// The client's keep-alive in seconds (0: none).
    pub(super) keep_alive: u16,
    pub(super) clean_session: bool,
    /// The MQTT 5 client's Maximum Packet Size, if it set one.
    pub(super) max_packet: Option<usize>,
    /// The MQTT 5 client's Receive Maximum, if it set one.
    pub(super) receive_max: Option<u16>,
}

/// Why a connection ends.
#[derive(Debug)]
pub(super) enum End {
    ClientDisconnected,
    ClientGone,
    /// A newer connection of the same client id took the session over.
    TakenOver,
    /// A 3.1.1 chat publish could not be stored (see `Session::unstored`).
    Unstored,
    UpstreamGone,
    KeepAliveExpired,
    /// The credentials (a JWT) expired.
    CredentialsExpired,
    /// A newer device of the user took this one's place (`limits.max_devices_per_user`).
    TooManyDevices,
    /// An operator forgot the device or erased its user.
    Evicted,
    Shutdown,
    Failed(EdgeError),
}

/// A subscribe or unsubscribe split between the hook layer and rumqttd, waiting for
/// rumqttd's half of the answer.
#[derive(Debug)]
pub(super) struct PendingAck {
    /// One entry per filter: the hook layer's code, or `None` for rumqttd's.
    pub(super) codes: Vec<Option<u8>>,
}

/// A QoS 1/2 publish for the client that waits for a free place under its Receive Maximum.
#[derive(Debug)]
enum Held {
    /// A digest or reply of the hook layer's own.
    Own {
        topic: String,
        properties: Vec<u8>,
        payload: Vec<u8>,
    },
    /// A publish from rumqttd, as rumqttd sent it.
    Upstream(Frame),
}

/// A client's session with the hook layer, for as long as its connection lasts.
pub(super) struct Session {
    pub(super) ctx: Arc<EdgeContext>,
    pub(super) id: u64,
    pub(super) version: Version,
    pub(super) device: Device,
    /// The client as hooks see it.
    pub(super) client: Arc<crate::hook::Client>,
    /// The listener it came in on (its packet size limit).
    pub(super) listener: Arc<super::Listener>,
    /// The hooks' `connected`, `delivered` and `disconnected` (when the session ends), if
    /// any hook wants them.
    pub(super) notifier: Option<crate::hook::Notifier>,
    im: bool,
    username: Option<String>,
    identity: Identity,
    /// Publish rate and bandwidth of this connection.
    pub(super) publish_limits: PublishLimits,
    keep_alive: Option<Duration>,
    pub(super) clean_session: bool,
    /// The store recording this device, started at CONNECT and not awaited there: IM
    /// requests and the digest wait for it (the digest records the device itself if it
    /// failed); nothing else does.
    registration: Option<Registration>,
    /// The client's Maximum Packet Size (MQTT 5), which hook-layer publishes respect.
    pub(super) max_packet: Option<usize>,
    /// Publishes in flight towards the client at most (its Receive Maximum).
    receive_max: usize,
    /// Effect: bytes for the client.
    pub(super) client_out: BytesMut,
    /// Effect: bytes for rumqttd (they wait here while the link opens).
    pub(super) up_out: BytesMut,
    /// Effect: IM operations to start, in arrival order.
    started: Vec<Op>,
    /// Effect: the client now needs the rumqttd link.
    open_link: bool,
    /// Whether rumqttd has, or is about to have, this client.
    linked: bool,
    /// Effect: reading from the client pauses until then (a client over its limits).
    pub(super) read_resume: Option<Instant>,
    /// Operations started and not yet applied.
    running: usize,
    pub(super) ids: PacketIds,
    /// Publishes waiting for the client's Receive Maximum, in order.
    held: VecDeque<Held>,
    /// Answers to rumqttd's publishes, kept in rumqttd's order.
    pub(super) upstream_acks: UpstreamAcks,
    /// IM subscriptions of this connection: filter → granted QoS.
    pub(super) im_filters: HashMap<String, u8>,
    pub(super) pending: HashMap<u16, PendingAck>,
    /// Client QoS 2 publishes the hook layer answered, awaiting PUBREL.
    pub(super) im_qos2: HashSet<u16>,
    /// Arrival order of this connection's chat publishes, which their seqs follow.
    pub(super) send_order: SendOrder,
    /// How the IM service reaches this connection.
    sink: Arc<ConnectionSink>,
    online: bool,
    pub(super) digest_sent: bool,
    pub(super) client_disconnected: bool,
    /// A 3.1.1 chat publish could not be stored: the connection ends once its answers are
    /// written, because 3.1.1 clients retransmit unacknowledged publishes only on reconnect.
    pub(super) unstored: bool,
    last_seen: Instant,
}

impl Session {
    /// The session of a client the handshake admitted; `client_out` holds its CONNACK,
    /// `linked` says whether the rumqttd link was opened at CONNECT.
    pub(super) fn new(
        ctx: Arc<EdgeContext>,
        id: u64,
        terms: Terms,
        client_out: BytesMut,
        linked: bool,
        sink: Arc<ConnectionSink>,
    ) -> Self {
        let Terms {
            version,
            client,
            listener,
            device,
            im,
            username,
            identity,
            keep_alive,
            clean_session,
            max_packet,
            receive_max,
        } = terms;
        let im_filters = if clean_session {
            ctx.drop_session(&device);
            HashMap::new()
        } else {
            ctx.restore_session(&device)
        };
        let publish_limits = PublishLimits::new(&ctx.limits);
        let notifier = ctx.hooks.notifier(Arc::clone(&client));
        let mut session = Self {
            ctx,
            id,
            version,
            device,
            client,
            listener,
            notifier,
            im,
            username,
            identity,
            publish_limits,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            clean_session,
            registration: None,
            max_packet,
            receive_max: receive_max.map_or(usize::MAX, |max| usize::from(max.max(1))),
            client_out,
            up_out: BytesMut::new(),
            started: Vec::new(),
            open_link: false,
            linked,
            read_resume: None,
            running: 0,
            ids: PacketIds::default(),
            held: VecDeque::new(),
            upstream_acks: UpstreamAcks::default(),
            im_filters,
            pending: HashMap::new(),
            im_qos2: HashSet::new(),
            send_order: SendOrder::default(),
            sink,
            online: false,
            digest_sent: false,
            client_disconnected: false,
            unstored: false,
            last_seen: Instant::now(),
        };
        if session.im {
            let registration = session.ctx.im.register(&session.device);
            session.registration = Some(registration.shared());
        }
        if !session.im_filters.is_empty() {
            // A resumed persistent session: groups it still belongs to, online again, and a
            // fresh digest.
            session.resume_subscriptions();
        }
        session
    }

    /// Starts `op` behind the connection's earlier operations.
    pub(super) fn start(
        &mut self,
        op: impl std::future::Future<Output = Outcome> + Send + 'static,
    ) {
        self.running += 1;
        self.started.push(Box::pin(op));
    }

    /// Effect: the operations started since the last call, in order.
    pub(super) fn take_started(&mut self) -> std::vec::Drain<'_, Op> {
        self.started.drain(..)
    }

    /// Applies a finished operation; outcomes come in the order the operations started.
    pub(super) fn on_outcome(&mut self, outcome: Outcome) -> Result<(), EdgeError> {
        self.running = self.running.saturating_sub(1);
        self.apply(outcome)
    }

    /// Whether operations started earlier are still to be applied (later pass-through must
    /// wait behind them).
    pub(super) fn busy(&self) -> bool {
        self.running > 0
    }

    /// Whether the connection may read more from the client: not while too much waits.
    pub(super) fn accepts_input(&self) -> bool {
        let max_running = self.listener.max_pending.unwrap_or(MAX_PENDING);
        self.running < max_running && self.held.len() < MAX_PENDING && self.read_resume.is_none()
    }

    /// Effect: whether the rumqttd link is to be opened now (asked once).
    pub(super) fn take_open_link(&mut self) -> bool {
        std::mem::take(&mut self.open_link)
    }

    /// The device's recording in the store, for an operation that needs it done first.
    pub(super) fn registration(&self) -> Option<Registration> {
        self.registration.clone()
    }

    /// Whether rumqttd has, or is about to have, this client.
    pub(super) fn linked(&self) -> bool {
        self.linked
    }

    /// Bytes for rumqttd: the link opens on the client's first need of it.
    pub(super) fn rumqttd_out(&mut self) -> &mut BytesMut {
        if !self.linked {
            self.linked = true;
            self.open_link = true;
        }
        &mut self.up_out
    }

    /// The client sent something at `now` (keep-alive).
    pub(super) fn seen(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// When the client last sent something.
    pub(super) fn last_seen(&self) -> Instant {
        self.last_seen
    }

    /// The clock's tick: ends a connection whose client stayed silent past 1.5 × keep-alive.
    pub(super) fn on_tick(&mut self, now: Instant) -> Result<(), End> {
        match self.keep_alive {
            Some(keep_alive) if now.saturating_duration_since(self.last_seen) > keep_alive => {
                Err(End::KeepAliveExpired)
            }
            _ => Ok(()),
        }
    }

    /// The keep-alive the client asked for, stretched by half (MQTT's grace).
    pub(super) fn keep_alive(&self) -> Option<Duration> {
        self.keep_alive
    }

    /// When the client's credentials (a JWT) expire.
    pub(super) fn expiry(&self) -> Option<std::time::SystemTime> {
        self.identity.expires
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

    /// Stops reading from the client for `wait` from `now` (it is over its publish limits).
    pub(super) fn pause_reads(&mut self, now: Instant, wait: Duration) {
        let until = now + wait;
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
        Arc::clone(&self.sink)
    }

    /// Marks the device offline (unsubscribed or gone).
    pub(super) fn go_offline(&mut self) {
        if self.online {
            self.online = false;
            self.ctx.im.offline(&self.device, self.id);
        }
    }

    /// The connection ends for `end`: presence and group watches end, a persistent session
    /// keeps its IM subscriptions, and an MQTT 5 client is told why the server closes.
    /// Called once every started operation has been applied.
    pub(super) fn leave(&mut self, end: &End) {
        self.go_offline();
        for (_, gid) in self.group_filters() {
            self.ctx.im.unwatch_group(&gid, self.id);
        }
        if !self.clean_session {
            let filters = std::mem::take(&mut self.im_filters);
            self.ctx.keep_session(&self.device, filters);
        }
        self.say_why(end);
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
            End::Evicted => (
                Reason::AdministrativeAction,
                "an operator forgot this device or erased its user",
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

    /// Whether a QoS 1/2 publish towards the client must wait now: the client's Receive
    /// Maximum is reached, or others wait before it.
    fn must_hold(&self) -> bool {
        !self.held.is_empty() || self.ids.in_flight() >= self.receive_max
    }

    /// Writes a hook-layer publish (digest, reply) into the client connection, or holds it
    /// until the client's Receive Maximum lets it go.
    pub(super) fn write_own_publish(
        &mut self,
        topic: &str,
        qos: u8,
        properties: &[u8],
        payload: &[u8],
    ) {
        if !self.fits(topic, properties.len() + payload.len()) {
            return;
        }
        if qos > 0 && self.must_hold() {
            self.held.push_back(Held::Own {
                topic: topic.to_owned(),
                properties: properties.to_vec(),
                payload: payload.to_vec(),
            });
            return;
        }
        self.write_publish_now(topic, qos, Origin::Own, properties, payload);
    }

    /// Whether a publish on `topic` with `rest` bytes of properties and payload fits the
    /// client's Maximum Packet Size (MQTT 5 forbids sending it otherwise).
    fn fits(&self, topic: &str, rest: usize) -> bool {
        let fits = rest <= self.payload_budget(topic, 0);
        if !fits {
            tracing::debug!(
                topic,
                rest,
                "publish exceeds the client's maximum packet size"
            );
        }
        fits
    }

    fn write_publish_now(
        &mut self,
        topic: &str,
        qos: u8,
        origin: Origin,
        properties: &[u8],
        payload: &[u8],
    ) {
        let pkid = if qos > 0 {
            match self.ids.allocate(origin) {
                Some(pkid) => pkid,
                None => {
                    tracing::warn!(topic, "no free packet id; publish dropped");
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

    /// Writes rumqttd's publish to the client under a client-side packet id, or holds it
    /// until the client's Receive Maximum lets it go (a retransmission goes at once).
    pub(super) fn forward_upstream_publish(&mut self, frame: Frame) -> Result<(), EdgeError> {
        let publish = PublishView::parse(&frame, Version::V5)?;
        if publish.qos() == 0 {
            publish.write(self.version, 0, &mut self.client_out);
            return Ok(());
        }
        let pkid = match self.ids.mapped(publish.pkid) {
            Some(pkid) => pkid,
            None if self.must_hold() => {
                self.held.push_back(Held::Upstream(frame));
                return Ok(());
            }
            None => return self.write_upstream_now(&publish),
        };
        publish.write(self.version, pkid, &mut self.client_out);
        Ok(())
    }

    /// Writes rumqttd's publish to the client under a newly allocated client-side id.
    fn write_upstream_now(&mut self, publish: &PublishView) -> Result<(), EdgeError> {
        let pkid = self
            .ids
            .for_upstream(publish.pkid)
            .ok_or(EdgeError::Protocol("client packet ids exhausted"))?;
        publish.write(self.version, pkid, &mut self.client_out);
        Ok(())
    }

    /// A packet id came free: publishes that waited for it go, in order.
    pub(super) fn release_held(&mut self) -> Result<(), EdgeError> {
        while self.ids.in_flight() < self.receive_max {
            let Some(held) = self.held.pop_front() else {
                break;
            };
            match held {
                Held::Own {
                    topic,
                    properties,
                    payload,
                } => self.write_publish_now(&topic, 1, Origin::Own, &properties, &payload),
                Held::Upstream(frame) => {
                    self.write_upstream_now(&PublishView::parse(&frame, Version::V5)?)?;
                }
            }
        }
        Ok(())
    }

    /// Applies what the IM service pushed to this connection.
    pub(super) fn on_event(&mut self, event: DeviceEvent) {
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
                    self.write_own_publish(&resp, qos.min(1), &[], &payload);
                }
            }
            DeviceEvent::Revoked { group } => {
                let topic = self.ctx.topics.group(&group);
                self.im_filters.remove(&topic);
                self.ctx.im.unwatch_group(&group, self.id);
                tracing::debug!(group, "removed from the group: subscription dropped");
            }
            // Never queued: the sink cancels a token that ends the connection.
            DeviceEvent::TakenOver | DeviceEvent::Evicted => {}
        }
    }

    /// Writes a live chat message to `topic` if this connection subscribed to it; one that
    /// would have to wait (the client is slow to acknowledge) stays in the backlog, which the
    /// digest and pulls serve.
    fn deliver(&mut self, topic: &str, conversation: Conversation, seq: u64, payload: &Bytes) {
        let Some(qos) = self.granted_qos(topic) else {
            return;
        };
        let qos = qos.min(1);
        if qos > 0 && (self.must_hold() || self.ids.in_flight() >= MAX_LIVE_IN_FLIGHT) {
            tracing::debug!(
                seq,
                "too many unacknowledged deliveries; left in the backlog"
            );
            return;
        }
        if self.fits(topic, payload.len()) {
            let origin = Origin::Chat { conversation, seq };
            self.write_publish_now(topic, qos, origin, &[], payload);
        }
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
mod tests;
