//! One client's protocol state, without its sockets: the connection loop hands it decoded
//! frames, finished IM operations, device events and clock ticks, and takes back its
//! [`Effects`] — bytes for the client, bytes for rumqttd, IM operations to start (in arrival
//! order), the rumqttd link to open, the end of the session. It never touches a socket or
//! awaits, and its state is its own: every field is private to this module.
//!
//! - `client`: acknowledgements, pings and DISCONNECT from the client; `publish`: its
//!   PUBLISH, by route (pass-through, chat, request, refused).
//! - `from_rumqttd`: what rumqttd sends the client.
//! - `presence`: online and offline, live events from the IM service, leaving.
//! - `routes`: the plain-topic filters held at rumqttd as routes of the cluster, and the
//!   client's publishes forwarded to the nodes that want them.
//! - `subscribe`: SUBSCRIBE and UNSUBSCRIBE, split between the hook layer and rumqttd.
//! - `outcome`: what finished IM operations carry (plain data); `apply`: applying them in
//!   arrival order; `reply`: acknowledgements, refusals and replies in each protocol's terms.
//! - `outbox`: what goes to the client, under its Receive Maximum and Maximum Packet Size
//!   (`packet_ids`, `fit`); `upstream_acks`: answers to rumqttd in rumqttd's order.

mod apply;
mod client;
mod deliver;
mod fit;
mod from_rumqttd;
mod moved;
mod outbox;
mod outcome;
mod packet_ids;
mod presence;
mod publish;
mod reply;
mod routes;
mod shared;
mod subscribe;
mod upstream_acks;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::{BoxFuture, FutureExt, Shared};
use rumqttd::protocol::Filter;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::acl::topic_allowed;
use super::cluster::Moved;
use super::codec::Protocol;
use super::expiry::Lifetime;
use super::limits::PublishLimits;
use super::sink::ConnectionSink;
use super::topics::Topics;
use super::{EdgeContext, EdgeError, Listener};
use crate::auth::acl::{Access, Client as AclClient};
use crate::auth::Identity;
use crate::domain::{Device, Uid};
use crate::im::SendOrder;
pub(super) use outbox::ClientLimits;
use outbox::{take_bytes, Outbox};
use outcome::{Outcome, PendingAck};
use upstream_acks::UpstreamAcks;

/// IM publishes and requests of one connection waiting for the store, or publishes waiting
/// for the client's Receive Maximum; beyond this the connection stops reading from the
/// client until some complete (backpressure). A listener may bound the former lower.
const MAX_PENDING: usize = 1024;

/// The Receive Maximum the CONNACK announces on `listener`: the operations a connection
/// keeps running before it stops reading (see [`MAX_PENDING`]).
pub(super) fn receive_maximum(listener: &Listener) -> u16 {
    let pending = listener.max_pending.unwrap_or(MAX_PENDING);
    u16::try_from(pending.max(1)).unwrap_or(u16::MAX)
}

/// A device's recording in the store, awaited by whichever operation needs it first.
type Registration = Shared<oneshot::Receiver<bool>>;

/// Whether the device is recorded in the store, once `registration` has finished.
async fn recorded(registration: Option<Registration>) -> bool {
    match registration {
        Some(registration) => registration.await.unwrap_or(false),
        None => false,
    }
}

/// An IM operation of one connection, started in arrival order; what it finished with comes
/// back to [`Session::on_outcome`] in the same order.
pub(super) type Op = BoxFuture<'static, Finished>;

/// A finished IM operation, for the session to apply; the connection only hands it back.
pub(super) struct Finished(Outcome);

/// What the handshake settled about a client, which its session starts from.
pub(super) struct Terms {
    pub(super) version: Protocol,
    /// The client as hooks see it.
    pub(super) client: Arc<crate::hook::Client>,
    /// The listener it came in on.
    pub(super) listener: Arc<Listener>,
    pub(super) client_id: String,
    /// The client as an IM device, if the identity it authenticated as is a uid something
    /// vouched for: without one, IM topics are refused and it uses pass-through topics only.
    pub(super) im: Option<Device>,
    /// The CONNECT's username, which ACL rules name.
    pub(super) username: Option<String>,
    /// What authentication granted: superuser, topic rules, expiry.
    pub(super) identity: Identity,
    /// The client's keep-alive in seconds (0: none).
    pub(super) keep_alive: u16,
    /// The session starts anew (clean start, or what was kept has expired).
    pub(super) clean_start: bool,
    /// How long the session outlives the connection.
    pub(super) lifetime: Lifetime,
    /// What the MQTT 5 client's CONNECT said it takes.
    pub(super) limits: ClientLimits,
    /// The session, when it moved here from another node.
    pub(super) moved: Option<Moved>,
}

/// Why a connection ends.
#[derive(Debug)]
pub(super) enum End {
    ClientDisconnected,
    ClientGone,
    /// A newer connection of the same client id took the session over.
    TakenOver,
    /// A 3.1.1 chat publish could not be stored (see `Outcome::Chat`).
    Unstored,
    /// An MQTT 5 client sent more unanswered QoS 1/2 publishes than the CONNACK's Receive
    /// Maximum allowed.
    ReceiveMaximumExceeded,
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

/// What the session asks its connection to carry out, taken after each input.
#[derive(Default)]
pub(super) struct Effects {
    /// Bytes for the client.
    pub(super) to_client: BytesMut,
    /// Bytes for rumqttd (they wait with the connection while the link opens).
    pub(super) to_rumqttd: BytesMut,
    /// IM operations to start, in arrival order.
    pub(super) started: Vec<Op>,
    /// The client now needs the rumqttd link.
    pub(super) open_link: bool,
    /// The session is over (a DISCONNECT, or a 3.1.1 chat message that could not be stored).
    pub(super) end: Option<End>,
}

/// A client's session with the hook layer, for as long as its connection lasts.
pub(super) struct Session {
    ctx: Arc<EdgeContext>,
    id: u64,
    version: Protocol,
    client_id: String,
    /// The client id as publishes carry it across rumqttd (see `carry`): no-local.
    publisher: u64,
    /// The client as hooks see it.
    client: Arc<crate::hook::Client>,
    /// The listener it came in on (its limits).
    listener: Arc<Listener>,
    /// The hooks' `connected`, `delivered` and `disconnected` (when the session ends), if
    /// any hook wants them.
    notifier: Option<crate::hook::Notifier>,
    /// The client as an IM device, when it is one.
    im: Option<Device>,
    username: Option<String>,
    identity: Identity,
    /// Publish rate and bandwidth of this connection.
    publish_limits: PublishLimits,
    keep_alive: Option<Duration>,
    clean_start: bool,
    /// How long the session outlives the connection (a DISCONNECT may change it).
    lifetime: Lifetime,
    /// The store recording this device, started at CONNECT and not awaited there: IM
    /// requests and the digest wait for it (the digest records the device itself if it
    /// failed); nothing else does.
    registration: Option<Registration>,
    /// What goes to the client.
    outbox: Outbox,
    /// Bytes for rumqttd.
    to_rumqttd: BytesMut,
    /// IM operations to start, in arrival order.
    started: Vec<Op>,
    /// The client needs the rumqttd link opened.
    open_link: bool,
    /// Whether rumqttd has, or is about to have, this client.
    linked: bool,
    /// Reading from the client pauses until then (a client over its limits).
    read_resume: Option<Instant>,
    /// Operations started and not yet applied.
    running: usize,
    /// Answers to rumqttd's publishes, kept in rumqttd's order.
    upstream_acks: UpstreamAcks,
    /// IM subscriptions of this connection: filter → granted QoS.
    im_filters: HashMap<String, u8>,
    /// SUBSCRIBEs and UNSUBSCRIBEs waiting for rumqttd's half of the answer.
    pending: HashMap<u16, PendingAck>,
    /// Client QoS 2 publishes the hook layer answered, awaiting PUBREL.
    im_qos2: HashSet<u16>,
    /// Plain-topic filters this client holds at rumqttd, and its shared subscriptions in a
    /// cluster (routes of the cluster).
    routes: HashMap<String, Filter>,
    /// Plain subscriptions relayed to rumqttd, with the options the hook layer applies to
    /// what rumqttd delivers (from the SUBSCRIBE on, before rumqttd's SUBACK).
    subscriptions: HashMap<String, deliver::Subscribed>,
    /// Live messages delivered lately (one copy for overlapping subscriptions).
    recent: deliver::Recent,
    /// Shared subscriptions the hook layer holds for this client (in a cluster): filter →
    /// granted QoS.
    shared: HashMap<String, u8>,
    /// Client QoS 2 publishes forwarded to other nodes, awaiting PUBREL (a retransmission
    /// is not forwarded again).
    forwarded_qos2: HashSet<u16>,
    /// Arrival order of this connection's chat publishes, which their seqs follow.
    send_order: SendOrder,
    /// How the IM service reaches this connection.
    sink: Arc<ConnectionSink>,
    online: bool,
    digest_sent: bool,
    /// The client said DISCONNECT: nothing more is read.
    disconnected: bool,
    /// Why the session is over, once it is (taken with the effects).
    end: Option<End>,
    last_seen: Instant,
}

impl Session {
    /// The session of a client the handshake admitted; `linked` says whether the rumqttd
    /// link was opened at CONNECT.
    pub(super) fn new(
        ctx: Arc<EdgeContext>,
        id: u64,
        terms: Terms,
        linked: bool,
        sink: Arc<ConnectionSink>,
    ) -> Self {
        let moved = terms.moved;
        let im_filters = match &terms.im {
            Some(device) if terms.clean_start => {
                ctx.drop_session(device);
                HashMap::new()
            }
            Some(_) if moved.as_ref().is_some_and(|m| !m.im.is_empty()) => {
                moved.as_ref().map(|m| m.im.clone()).unwrap_or_default()
            }
            Some(device) => ctx.restore_session(device),
            None => HashMap::new(),
        };
        let publish_limits = PublishLimits::new(&ctx.limits);
        let notifier = ctx.hooks.notifier(Arc::clone(&terms.client));
        let outbox = Outbox::new(terms.version, terms.limits);
        let registration = terms
            .im
            .as_ref()
            .map(|device| ctx.im.register(device).shared());
        let keep_alive = (terms.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(terms.keep_alive) * 1500));
        let mut session = Self {
            ctx,
            id,
            version: terms.version,
            publisher: crate::edge::carry::publisher(&terms.client_id),
            client_id: terms.client_id,
            client: terms.client,
            listener: terms.listener,
            notifier,
            im: terms.im,
            username: terms.username,
            identity: terms.identity,
            publish_limits,
            keep_alive,
            clean_start: terms.clean_start,
            lifetime: terms.lifetime,
            registration,
            outbox,
            to_rumqttd: BytesMut::new(),
            started: Vec::new(),
            open_link: false,
            linked,
            read_resume: None,
            running: 0,
            upstream_acks: UpstreamAcks::default(),
            im_filters,
            pending: HashMap::new(),
            im_qos2: HashSet::new(),
            routes: HashMap::new(),
            subscriptions: HashMap::new(),
            recent: deliver::Recent::default(),
            shared: HashMap::new(),
            forwarded_qos2: HashSet::new(),
            send_order: SendOrder::default(),
            sink,
            online: false,
            digest_sent: false,
            disconnected: false,
            end: None,
            last_seen: Instant::now(),
        };
        session.take_kept_routes();
        if let Some(moved) = moved {
            session.start_moved(moved);
        }
        if !session.im_filters.is_empty() {
            // A resumed persistent session: groups it still belongs to, online again, and a
            // fresh digest.
            session.resume_subscriptions();
        }
        session
    }

    /// Effects: everything the session asked for since the last call.
    pub(super) fn take_effects(&mut self) -> Effects {
        Effects {
            to_client: self.outbox.take(),
            to_rumqttd: take_bytes(&mut self.to_rumqttd),
            started: std::mem::take(&mut self.started),
            open_link: std::mem::take(&mut self.open_link),
            end: self.end.take(),
        }
    }

    /// Applies a finished operation; outcomes come in the order the operations started.
    pub(super) fn on_outcome(&mut self, Finished(outcome): Finished) -> Result<(), EdgeError> {
        self.running = self.running.saturating_sub(1);
        self.apply(outcome)
    }

    /// Whether the connection may read more from the client: not while too much waits, nor
    /// while its reads are paused.
    pub(super) fn accepts_input(&self) -> bool {
        let max_running = self.listener.max_pending.unwrap_or(MAX_PENDING);
        self.running < max_running && self.outbox.held() < MAX_PENDING && !self.reading_stopped()
    }

    /// Whether frames already read must wait: the client is over its limits, or it said
    /// DISCONNECT.
    pub(super) fn reading_stopped(&self) -> bool {
        self.read_resume.is_some() || self.disconnected
    }

    /// Until when reading from the client is paused, if it is.
    pub(super) fn reads_paused_until(&self) -> Option<Instant> {
        self.read_resume
    }

    /// The pause is over: reading goes on.
    pub(super) fn resume_reads(&mut self) {
        self.read_resume = None;
    }

    /// The client sent something at `now` (keep-alive).
    pub(super) fn seen(&mut self, now: Instant) {
        self.last_seen = now;
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

    /// The device, if it uses IM topics (its acknowledgements are written as it leaves).
    pub(super) fn im_device(&self) -> Option<&Device> {
        self.im.as_ref()
    }

    /// Starts `op` behind the connection's earlier operations.
    fn start(&mut self, op: impl std::future::Future<Output = Outcome> + Send + 'static) {
        self.running += 1;
        self.started.push(Box::pin(op.map(Finished)));
    }

    /// Whether operations started earlier are still to be applied (later pass-through must
    /// wait behind them).
    fn busy(&self) -> bool {
        self.running > 0
    }

    /// Bytes for rumqttd: the link opens on the client's first need of it.
    fn rumqttd_out(&mut self) -> &mut BytesMut {
        if !self.linked {
            self.linked = true;
            self.open_link = true;
        }
        &mut self.to_rumqttd
    }

    /// Whether the topic ACL lets this client have `access` to a non-IM `topic` (a filter,
    /// when `subscribing`); refusals are counted under `action`.
    fn acl_allows(
        &self,
        topic: &str,
        access: Access,
        subscribing: bool,
        action: &'static str,
    ) -> bool {
        let client = AclClient {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        };
        let file = self.ctx.auth.acl().map(AsRef::as_ref);
        let allowed = topic_allowed(&self.identity, &client, topic, access, subscribing, file);
        if !allowed {
            self.ctx.im.metrics().count_acl_denial(action);
        }
        allowed
    }

    /// Stops reading from the client for `wait` from `now` (it is over its publish limits).
    fn pause_reads(&mut self, now: Instant, wait: Duration) {
        let until = now + wait;
        self.read_resume = Some(self.read_resume.map_or(until, |at| at.max(until)));
    }

    /// The IM uid, if the client's identity is one.
    fn im_uid(&self) -> Option<&Uid> {
        self.im.as_ref().map(|device| &device.uid)
    }

    /// One of the client's own IM topics (its inbox, digest or `resp`), if it has any.
    fn own_topic(&self, topic: fn(&Topics, &Uid) -> String) -> Option<String> {
        self.im_uid().map(|uid| topic(&self.ctx.topics, uid))
    }
}

#[cfg(test)]
mod tests;
