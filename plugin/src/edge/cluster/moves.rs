//! Sessions across nodes. Every CONNECT claims its client id in Redis; when the id was last
//! on another live node, that node is asked to end its connection there (a take-over, as
//! within one node) and, for a client that wants its session, to hand the session over:
//!
//! 1. the new node asks (`take`); the old one ends its connection of the client id and
//!    answers with the session's subscriptions (`state`);
//! 2. the new node subscribes them at its own rumqttd and advertises their routes, answers
//!    the client's CONNECT with session present, and tells the old node (`release`);
//! 3. the old node takes what its rumqttd queued for the session (everything published
//!    before step 2, and whatever came in meanwhile), drops the session there and sends it
//!    (`rest`), which the new node delivers to the client.
//!
//! Nothing published while the session moves is lost: from step 2 on it reaches the new
//! node directly, and until step 3 the old one still collects it (a QoS 1 message published
//! in between may arrive twice, as QoS 1 allows; messages queued on the old node arrive
//! after the first new ones).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use prost::Message;
use rumqttd::protocol::{Filter, QoS, RetainForwardRule};
use tokio::sync::oneshot;

use super::Cluster;
use crate::domain::{Device, Uid};
use crate::edge::codec::{self, kind, Protocol, PublishView};
use crate::edge::sink::ConnectionSink;
use crate::edge::upstream::{LinkRequest, Upstream, UpstreamEvent};
use crate::edge::{EdgeContext, KeptRoutes};
use crate::wire::{self, pb};

/// How long a new node waits for the old one's answer before it starts without the session.
const STATE_WAIT: Duration = Duration::from_secs(3);
/// How long an old node waits for the new one's release before it keeps the session.
const RELEASE_WAIT: Duration = Duration::from_secs(10);
/// The old node collects what its rumqttd queued until nothing came for this long...
const DRAIN_QUIET: Duration = Duration::from_millis(200);
/// ...or for this long at most.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Largest session move accepted from another node.
const MAX_MOVE_BYTES: usize = 64 << 20;

/// Where the rest of a session moving here stands.
#[derive(Debug)]
enum Rest {
    /// The connection waits for it.
    Awaited(Arc<ConnectionSink>),
    /// It came before the connection was ready.
    Arrived(Vec<pb::Forward>),
}

/// The moves in progress on this node, by client id.
#[derive(Debug, Default)]
pub(super) struct Moves {
    /// New node: the answer to a `take`.
    states: Mutex<HashMap<String, oneshot::Sender<pb::SessionState>>>,
    /// Old node: the new node's release.
    releases: Mutex<HashMap<String, oneshot::Sender<()>>>,
    /// New node: what the session had queued on the old one.
    rests: Mutex<HashMap<String, Rest>>,
}

/// A session taken over from another node, as the connection starts from it.
#[derive(Debug, Default)]
pub(crate) struct Moved {
    /// Plain-topic subscriptions, already in place at this node's rumqttd.
    pub(crate) plain: Vec<Filter>,
    /// Shared subscriptions to join.
    pub(crate) shared: Vec<Filter>,
    /// IM subscriptions: filter → granted QoS.
    pub(crate) im: HashMap<String, u8>,
    /// The node that had it, to tell once the subscriptions are in place.
    pub(crate) from: String,
}

impl Cluster {
    /// A client connecting here claims its client id. If it was on another live node, that
    /// node ends its connection; with `resume` (clean session off) its session is asked
    /// for, and returned if it had one.
    pub(crate) async fn claim_client(
        &self,
        client_id: &str,
        uid: Option<&Uid>,
        resume: bool,
    ) -> Option<Moved> {
        let previous = match self.bus.claim_client(client_id).await {
            Ok(previous) => previous?,
            Err(e) => {
                self.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "client id not claimed in the cluster: a connection of it on another node stays");
                return None;
            }
        };
        if previous == self.node() {
            return None;
        }
        if !self.bus.node_alive(&previous).await.unwrap_or(false) {
            return self.lost(resume);
        }
        let take = pb::SessionTake {
            resume,
            uid: uid.map(ToString::to_string).unwrap_or_default(),
        };
        let answer = resume.then(|| {
            let (tx, rx) = oneshot::channel();
            lock(&self.moves.states).insert(client_id.to_owned(), tx);
            rx
        });
        let heard = self
            .send_move(&previous, client_id, pb::session_move::Step::Take(take))
            .await;
        if !heard {
            lock(&self.moves.states).remove(client_id);
            return self.lost(resume);
        }
        let state = tokio::time::timeout(STATE_WAIT, answer?).await;
        lock(&self.moves.states).remove(client_id);
        match state {
            Ok(Ok(state)) if state.found => {
                self.metrics.count_session_move("resumed");
                Some(moved(state, previous))
            }
            Ok(Ok(_)) => None,
            _ => {
                self.metrics.count_session_move("unanswered");
                tracing::warn!("the node that had this client id did not hand its session over in time; starting a new one");
                None
            }
        }
    }

    /// The node that had the client id is gone, and a session it had with it (its rumqttd
    /// kept it in memory): the client starts anew here.
    fn lost(&self, resume: bool) -> Option<Moved> {
        if resume {
            self.metrics.count_session_move("lost");
        }
        None
    }

    /// The subscriptions of a session taken over are in place here: the old node is to
    /// send what it queued.
    pub(crate) async fn release(&self, moved: &Moved, client_id: &str) {
        self.send_move(
            &moved.from,
            client_id,
            pb::session_move::Step::Release(true),
        )
        .await;
    }

    /// What the old node queued for a session taken over goes to `sink`'s connection.
    pub(crate) fn await_rest(&self, client_id: &str, sink: Arc<ConnectionSink>) {
        let mut rests = lock(&self.moves.rests);
        match rests.remove(client_id) {
            Some(Rest::Arrived(messages)) => deliver_rest(&sink, messages),
            _ => {
                rests.insert(client_id.to_owned(), Rest::Awaited(sink));
            }
        }
    }

    /// The connection of `client_id` ends: a rest still awaited has nobody to go to; a
    /// clean session gives its claim up.
    pub(crate) fn client_left(&self, client_id: &str, clean_session: bool) {
        {
            let mut rests = lock(&self.moves.rests);
            if matches!(rests.get(client_id), Some(Rest::Awaited(_))) {
                rests.remove(client_id);
            }
        }
        if clean_session {
            let (bus, client_id) = (self.bus.clone(), client_id.to_owned());
            let errors = self.metrics.redis_errors.clone();
            self.tasks.spawn(async move {
                if bus.release_client(&client_id).await.is_err() {
                    errors.inc();
                }
            });
        }
    }

    /// A step of a session move that came for this node.
    pub(super) fn on_move(&self, bytes: &[u8], mover: &Arc<SessionMover>) {
        let message: pb::SessionMove = match wire::decode(bytes, MAX_MOVE_BYTES, "SessionMove") {
            Ok(message) => message,
            Err(e) => return tracing::warn!(error = %e, "bad session move ignored"),
        };
        let pb::SessionMove {
            client_id,
            node,
            step,
        } = message;
        match step {
            Some(pb::session_move::Step::Take(take)) => {
                let mover = Arc::clone(mover);
                self.tasks
                    .spawn(async move { mover.give_away(client_id, node, take).await });
            }
            Some(pb::session_move::Step::State(state)) => {
                if let Some(waiting) = lock(&self.moves.states).remove(&client_id) {
                    let _ = waiting.send(state);
                }
            }
            Some(pb::session_move::Step::Release(_)) => {
                if let Some(waiting) = lock(&self.moves.releases).remove(&client_id) {
                    let _ = waiting.send(());
                }
            }
            Some(pb::session_move::Step::Rest(rest)) => {
                let mut rests = lock(&self.moves.rests);
                match rests.remove(&client_id) {
                    Some(Rest::Awaited(sink)) => deliver_rest(&sink, rest.messages),
                    _ => {
                        rests.insert(client_id, Rest::Arrived(rest.messages));
                    }
                }
            }
            None => {}
        }
    }

    /// Sends a step of a move to `node`; whether a node was listening there (a failed send
    /// counts as heard: the answer's deadline decides then).
    async fn send_move(&self, node: &str, client_id: &str, step: pb::session_move::Step) -> bool {
        let message = pb::SessionMove {
            client_id: client_id.to_owned(),
            node: self.node().to_owned(),
            step: Some(step),
        };
        match self
            .bus
            .send_session_move(node, &message.encode_to_vec())
            .await
        {
            Ok(true) => true,
            Ok(false) => {
                tracing::debug!(node, "session move sent to a node that is not listening");
                false
            }
            Err(e) => {
                self.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "session move not sent");
                true
            }
        }
    }
}

/// The old node's side of a move: it has the client's connection and session.
#[derive(Debug)]
pub(crate) struct SessionMover {
    ctx: Arc<EdgeContext>,
}

impl SessionMover {
    /// The mover of the node behind `ctx`.
    pub(crate) fn new(ctx: Arc<EdgeContext>) -> Self {
        Self { ctx }
    }

    fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.ctx.cluster.as_ref()
    }

    /// Ends this node's connection of `client_id` for node `to`, and hands its session over
    /// or drops it.
    async fn give_away(self: Arc<Self>, client_id: String, to: String, take: pb::SessionTake) {
        let Some(cluster) = self.cluster().cloned() else {
            return;
        };
        let owner = self.ctx.next_connection();
        // Ends the connection here (if any) and waits until it has kept its session.
        let claim = match self.ctx.links.claim(&client_id, owner).await {
            Ok(claim) => claim,
            Err(e) => return tracing::debug!(error = %e, "session not given away"),
        };
        let kept = self.ctx.take_routes(&client_id);
        let im = Uid::parse(&take.uid)
            .ok()
            .map(|uid| {
                self.ctx.restore_session(&Device {
                    uid,
                    client_id: client_id.clone(),
                })
            })
            .unwrap_or_default();
        let at_rumqttd = self.ctx.take_upstream_session(&client_id);
        let plain: Vec<String> = kept.plain.iter().map(|f| f.path.clone()).collect();
        if !take.resume {
            if at_rumqttd {
                self.drop_at_rumqttd(&client_id, owner).await;
            }
            cluster.unsubscribed(&plain);
            cluster.metrics.count_session_move("dropped");
            return;
        }
        let (released_tx, released) = oneshot::channel();
        lock(&cluster.moves.releases).insert(client_id.clone(), released_tx);
        let state = state_of(&kept, &im, at_rumqttd);
        cluster
            .send_move(&to, &client_id, pb::session_move::Step::State(state))
            .await;
        let released = tokio::time::timeout(RELEASE_WAIT, released).await;
        lock(&cluster.moves.releases).remove(&client_id);
        if !matches!(released, Ok(Ok(()))) {
            // The new node never took it: the session stays here for the client's return.
            tracing::warn!("session handed over but never released by the new node; kept");
            self.keep(&client_id, kept, at_rumqttd);
            return;
        }
        let messages = if at_rumqttd {
            self.drain(&client_id, owner).await
        } else {
            Vec::new()
        };
        cluster.unsubscribed(&plain);
        let rest = pb::SessionRest { messages };
        cluster
            .send_move(&to, &client_id, pb::session_move::Step::Rest(rest))
            .await;
        cluster.metrics.count_session_move("given");
        drop(claim);
    }

    /// Puts a session back as it was kept.
    fn keep(&self, client_id: &str, kept: KeptRoutes, at_rumqttd: bool) {
        self.ctx.keep_routes(client_id, kept);
        if at_rumqttd {
            self.ctx.keep_upstream_session(client_id);
        }
    }

    /// Takes what rumqttd queued for the session (acknowledging it there), until nothing
    /// more comes, then drops the session at rumqttd.
    async fn drain(&self, client_id: &str, owner: u64) -> Vec<pb::Forward> {
        let request = LinkRequest::as_client(client_id, false);
        let mut upstream = match Upstream::open_now(&self.ctx, owner, request).await {
            Ok((upstream, _)) => upstream,
            Err(e) => {
                tracing::warn!(error = %e, "queued messages of a moving session not taken");
                return Vec::new();
            }
        };
        let mut messages = Vec::new();
        let mut acks = BytesMut::new();
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        loop {
            // What came with the CONNACK is read already: frames first, then the socket.
            while let Ok(Some(frame)) = upstream.next_frame() {
                take_queued(&frame, &mut messages, &mut acks);
            }
            if upstream.write(&mut acks).await.is_err() {
                break;
            }
            upstream.make_room();
            let event = tokio::select! {
                event = upstream.next() => event,
                () = tokio::time::sleep(DRAIN_QUIET) => break,
                () = tokio::time::sleep_until(deadline) => break,
            };
            if !matches!(event, UpstreamEvent::Bytes | UpstreamEvent::Opened) {
                break;
            }
        }
        close(&mut upstream, acks).await;
        self.drop_at_rumqttd(client_id, owner).await;
        messages
    }

    /// Makes rumqttd forget its session of `client_id` (a clean link opened and closed).
    async fn drop_at_rumqttd(&self, client_id: &str, owner: u64) {
        Upstream::discard_session(&self.ctx, owner, client_id).await;
    }
}

/// Ends a link of the mover's own with a DISCONNECT after `pending`, and waits until
/// rumqttd has closed it.
async fn close(upstream: &mut Upstream, mut pending: BytesMut) {
    pending.extend_from_slice(&[kind::DISCONNECT << 4, 0]);
    upstream.close(&mut pending, true).await;
}

/// One frame rumqttd sent a draining session: a publish is kept and acknowledged.
fn take_queued(frame: &codec::Frame, messages: &mut Vec<pb::Forward>, acks: &mut BytesMut) {
    match frame.kind() {
        kind::PUBLISH => {
            let Ok(publish) = PublishView::parse(frame, Protocol::V5) else {
                return;
            };
            match publish.qos() {
                1 => codec::write_ack(acks, kind::PUBACK, publish.pkid),
                2 => codec::write_ack(acks, kind::PUBREC, publish.pkid),
                _ => {}
            }
            messages.push(pb::Forward {
                topic: publish.topic_str().to_owned(),
                qos: u32::from(publish.qos()),
                retain: false,
                properties: publish.properties.to_vec(),
                payload: publish.payload.to_vec(),
                shared: String::new(),
            });
        }
        kind::PUBREL => {
            if let Ok(pkid) = frame.ack_pkid() {
                codec::write_ack(acks, kind::PUBCOMP, pkid);
            }
        }
        _ => {}
    }
}

fn deliver_rest(sink: &ConnectionSink, messages: Vec<pb::Forward>) {
    if !messages.is_empty() && !sink.restored(messages) {
        tracing::warn!("queued messages of a moved session dropped: the connection is saturated");
    }
}

/// What the new node needs of a session.
fn state_of(kept: &KeptRoutes, im: &HashMap<String, u8>, at_rumqttd: bool) -> pb::SessionState {
    let im_filters = im.iter().map(|(filter, qos)| pb::SessionFilter {
        filter: filter.clone(),
        qos: u32::from(*qos),
        ..Default::default()
    });
    pb::SessionState {
        found: at_rumqttd || !kept.plain.is_empty() || !kept.shared.is_empty() || !im.is_empty(),
        plain: kept.plain.iter().map(session_filter).collect(),
        shared: kept.shared.iter().map(session_filter).collect(),
        im: im_filters.collect(),
    }
}

/// A session's state as the new node starts from it.
fn moved(state: pb::SessionState, from: String) -> Moved {
    Moved {
        plain: state.plain.into_iter().filter_map(filter_of).collect(),
        shared: state.shared.into_iter().filter_map(filter_of).collect(),
        im: state
            .im
            .into_iter()
            .map(|f| (f.filter, u8::try_from(f.qos.min(1)).unwrap_or(1)))
            .collect(),
        from,
    }
}

fn session_filter(filter: &Filter) -> pb::SessionFilter {
    pb::SessionFilter {
        filter: filter.path.clone(),
        qos: filter.qos as u32,
        no_local: filter.nolocal,
        retain_as_published: filter.preserve_retain,
        retain_handling: match filter.retain_forward_rule {
            RetainForwardRule::OnEverySubscribe => 0,
            RetainForwardRule::OnNewSubscribe => 1,
            RetainForwardRule::Never => 2,
        },
    }
}

/// A filter another node sent; `None` if it is not one.
fn filter_of(filter: pb::SessionFilter) -> Option<Filter> {
    let qos = match filter.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return None,
    };
    let valid = rumqttd::protocol::valid_filter(&filter.filter)
        || super::shared::split(&filter.filter).is_some();
    valid.then_some(Filter {
        path: filter.filter,
        qos,
        nolocal: filter.no_local,
        preserve_retain: filter.retain_as_published,
        retain_forward_rule: match filter.retain_handling {
            1 => RetainForwardRule::OnNewSubscribe,
            2 => RetainForwardRule::Never,
            _ => RetainForwardRule::OnEverySubscribe,
        },
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_cross_nodes_with_their_options() {
        let filter = Filter {
            path: "plant/+/temp".into(),
            qos: QoS::ExactlyOnce,
            nolocal: true,
            preserve_retain: true,
            retain_forward_rule: RetainForwardRule::Never,
        };
        assert_eq!(filter_of(session_filter(&filter)), Some(filter));
        let bad = pb::SessionFilter {
            filter: "a/#/b".into(),
            ..Default::default()
        };
        assert_eq!(filter_of(bad), None);
        let bad_qos = pb::SessionFilter {
            filter: "a".into(),
            qos: 3,
            ..Default::default()
        };
        assert_eq!(filter_of(bad_qos), None);
    }
}
