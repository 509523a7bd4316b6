//! Several nodes as one broker for plain (non-IM) topics. Each node advertises the filters
//! its clients hold (its routes, in Redis, renewed by its heartbeat and gone with it) and
//! follows every other node's. A client's publish goes to the node's own rumqttd as before,
//! and, when another node holds a matching route, to that node too: queued in arrival order,
//! sent in batches through Redis, and injected there into that node's rumqttd by a link of
//! the hook layer's own, which delivers it to its subscribers. A retained message goes to
//! every node and into the store, from which a starting node loads them all.
//!
//! What crosses nodes is at most once: a publisher's PUBACK comes from its own node, and a
//! forward that Redis or the receiving node loses is counted, not retried.

mod inject;
mod moves;
mod retained;
mod routes;
pub(crate) mod shared;
mod traffic;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::codec::PublishView;
use super::sink::ConnectionSink;
use crate::metrics::Metrics;
use crate::store::{Destination, RedisBus, Store};
use crate::wire::pb;
use inject::Injection;
pub(crate) use inject::Injector;
pub(crate) use moves::{Moved, SessionMover};
use retained::RetainedCopies;
use routes::{LocalRoutes, NodeRoutes};
use shared::{LocalMembers, Rotation};

/// Publishes waiting to be forwarded to other nodes; beyond that they are dropped (and
/// counted): a node's own traffic never waits for the cluster.
const FORWARD_QUEUE: usize = 65_536;

/// The nodes holding members of a shared subscription (`None`: this one).
type Holders = Vec<Option<Arc<str>>>;

/// A publish for other nodes.
#[derive(Debug)]
struct Outgoing {
    destination: Destination,
    publish: pb::Forward,
}

/// The receiving ends of the cluster's queues, taken by [`Cluster::run`].
#[derive(Debug)]
struct Queues {
    outgoing: mpsc::Receiver<Outgoing>,
    inject: mpsc::Receiver<Injection>,
    retained_writes: mpsc::Receiver<retained::Write>,
}

/// Plain-topic routing across nodes, for one node.
#[derive(Debug)]
pub(crate) struct Cluster {
    bus: RedisBus,
    store: Arc<dyn Store>,
    local: Mutex<LocalRoutes>,
    remote: RwLock<HashMap<Arc<str>, NodeRoutes>>,
    outgoing: mpsc::Sender<Outgoing>,
    /// What goes into this node's rumqttd.
    inject: mpsc::Sender<Injection>,
    retained: RetainedCopies,
    /// The retained messages read at start, until injected.
    preloaded: Mutex<Option<Vec<pb::Forward>>>,
    /// This node's members of shared subscriptions.
    members: LocalMembers,
    rotation: Rotation,
    /// Sessions moving to or from this node.
    moves: moves::Moves,
    queues: Mutex<Option<Queues>>,
    metrics: Arc<Metrics>,
    /// Route changes being written in the background.
    tasks: TaskTracker,
}

impl Cluster {
    /// This node's routing through `bus`, keeping retained messages in `store`, counting
    /// into `metrics`.
    pub(crate) fn new(bus: RedisBus, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        let (outgoing, outgoing_rx) = mpsc::channel(FORWARD_QUEUE);
        let (inject, inject_rx) = mpsc::channel(FORWARD_QUEUE);
        let (retained, retained_writes) = RetainedCopies::new();
        Self {
            bus,
            store,
            local: Mutex::default(),
            remote: RwLock::default(),
            outgoing,
            inject,
            retained,
            preloaded: Mutex::default(),
            members: LocalMembers::default(),
            rotation: Rotation::default(),
            moves: moves::Moves::default(),
            queues: Mutex::new(Some(Queues {
                outgoing: outgoing_rx,
                inject: inject_rx,
                retained_writes,
            })),
            metrics,
            tasks: TaskTracker::new(),
        }
    }

    /// This node's name in the cluster.
    pub(crate) fn node(&self) -> &str {
        self.bus.node()
    }

    /// A client of this node now holds `filters`: a route change to advertise if some are
    /// new to the node (the SUBACK waits for it, so that publishes on other nodes that
    /// follow it reach the client).
    pub(crate) fn subscribed(&self, filters: &[String]) -> Option<pb::RouteChange> {
        let added = self.lock_local().add(filters);
        self.count_local();
        (!added.is_empty()).then(|| self.change(added, Vec::new()))
    }

    /// A client of this node no longer holds `filters`; the routes no subscription needs
    /// any more are withdrawn in the background.
    pub(crate) fn unsubscribed(&self, filters: &[String]) {
        let removed = self.lock_local().remove(filters);
        self.count_local();
        if removed.is_empty() {
            return;
        }
        self.advertise_later(self.change(Vec::new(), removed));
    }

    /// A client of this node holds `filters` again (a resumed session): advertised in the
    /// background.
    pub(crate) fn subscribed_soon(&self, filters: &[String]) {
        if let Some(change) = self.subscribed(filters) {
            self.advertise_later(change);
        }
    }

    /// Writes a route change in the background; the heartbeat writes what fails.
    fn advertise_later(&self, change: pb::RouteChange) {
        let bus = self.bus.clone();
        let errors = self.metrics.redis_errors.clone();
        self.tasks.spawn(async move {
            if let Err(e) = advertise_on(&bus, &change).await {
                errors.inc();
                tracing::debug!(error = %e, "route change not written; the heartbeat will");
            }
        });
    }

    /// Writes a route change to Redis and tells the other nodes of it.
    pub(crate) async fn advertise(&self, change: &pb::RouteChange) {
        if let Err(e) = advertise_on(&self.bus, change).await {
            self.metrics.redis_errors.inc();
            tracing::warn!(error = %e, "route not advertised; the heartbeat will retry");
        }
    }

    /// A client's publish: to one member of each shared subscription it matches (on this
    /// node or another), and queued for the other nodes it concerns, in arrival order (a
    /// full queue drops it, counted). A retained one goes to every node and into the store.
    pub(crate) fn forward(&self, publish: &PublishView) {
        let topic = publish.topic_str();
        let forward = || pb::Forward {
            topic: topic.to_owned(),
            qos: u32::from(publish.qos()),
            retain: publish.flags & 1 == 1,
            properties: publish.properties.to_vec(),
            payload: publish.payload.to_vec(),
            shared: String::new(),
        };
        self.dispatch_shared(topic, &forward);
        if publish.flags & 1 == 1 {
            let retained = forward();
            self.retained.set_here(&retained, &self.metrics);
            return self.send(Destination::All, retained);
        }
        let nodes: Vec<Arc<str>> = self
            .remote
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, routes)| routes.matches(topic))
            .map(|(node, _)| Arc::clone(node))
            .collect();
        for node in nodes {
            self.send(Destination::Node(node), forward());
        }
    }

    /// Session `session` of this node (reached through `sink`) joins the shared
    /// subscription `shared`.
    pub(crate) fn join_shared(&self, shared: &str, session: u64, sink: Arc<ConnectionSink>) {
        self.members.join(shared, session, sink);
    }

    /// Session `session` leaves the shared subscription `shared`.
    pub(crate) fn leave_shared(&self, shared: &str, session: u64) {
        self.members.leave(shared, session);
    }

    /// Sends a publish on `topic` to one node of each shared subscription it matches, in
    /// turn: this node's members get it directly, another node's through the queue.
    fn dispatch_shared(&self, topic: &str, forward: &impl Fn() -> pb::Forward) {
        let mut targets: Vec<(Arc<str>, Holders)> = self
            .members
            .matching(topic)
            .into_iter()
            .map(|shared| (shared, vec![None]))
            .collect();
        for (node, routes) in self
            .remote
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            for shared in routes.shared_matching(topic) {
                match targets.iter_mut().find(|(held, _)| &**held == shared) {
                    Some((_, nodes)) => nodes.push(Some(Arc::clone(node))),
                    None => targets.push((shared.into(), vec![Some(Arc::clone(node))])),
                }
            }
        }
        for (shared, nodes) in targets {
            match self.rotation.pick(&shared, &nodes) {
                None => self.deliver_shared(&shared, &Arc::new(forward())),
                Some(node) => {
                    let publish = pb::Forward {
                        shared: shared.to_string(),
                        ..forward()
                    };
                    self.send(Destination::Node(Arc::clone(node)), publish);
                }
            }
        }
    }

    /// Hands a publish to one of this node's members of `shared`; counted if none took it.
    fn deliver_shared(&self, shared: &str, publish: &Arc<pb::Forward>) {
        if !self.members.deliver(shared, publish) {
            self.metrics.shared_undelivered.inc();
        }
    }

    /// Reads the cluster's retained messages from the store as the node starts (as
    /// reliable as opening the store was), for [`Cluster::run`] to inject before anyone
    /// is served.
    pub(crate) async fn read_retained(&self) {
        match retained::read(&*self.store).await {
            Ok(stored) => {
                *self
                    .preloaded
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(stored);
            }
            Err(e) => {
                tracing::warn!(error = %e, "retained messages not read at start; loading them once the cluster's channels are followed")
            }
        }
    }

    /// Waits until the retained messages of the cluster are in this node's rumqttd (or
    /// `limit` passed), so that the first subscribers get them.
    pub(crate) async fn retained_loaded(&self, limit: Duration) {
        if tokio::time::timeout(limit, self.retained.loaded())
            .await
            .is_err()
        {
            tracing::warn!("retained messages not loaded in time; serving without them");
        }
    }

    fn send(&self, destination: Destination, publish: pb::Forward) {
        let outgoing = Outgoing {
            destination,
            publish,
        };
        if self.outgoing.try_send(outgoing).is_err() {
            self.metrics.count_forward_failed("queue_full");
        }
    }

    fn change(&self, added: Vec<String>, removed: Vec<String>) -> pb::RouteChange {
        pb::RouteChange {
            node: self.bus.node().to_owned(),
            added,
            removed,
        }
    }

    fn lock_local(&self) -> std::sync::MutexGuard<'_, LocalRoutes> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_local(&self) {
        let held = self.lock_local().len();
        self.metrics.cluster_routes_local.set(held as i64);
    }

    fn count_remote(&self, remote: &HashMap<Arc<str>, NodeRoutes>) {
        let held: usize = remote.values().map(NodeRoutes::len).sum();
        self.metrics.cluster_routes_remote.set(held as i64);
    }

    /// Routing until `shutdown`: sends the queued forwards, follows the other nodes' routes,
    /// injects what they forward here through `injector`, keeps the retained messages in the
    /// store, and every `heartbeat` renews this node's routes and reads everyone else's
    /// afresh (healing a lost change or a flushed Redis, and forgetting dead nodes).
    pub(crate) async fn run(
        self: Arc<Self>,
        injector: Injector,
        mover: SessionMover,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) {
        let taken = self
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(queues) = taken else {
            return;
        };
        let tasks = TaskTracker::new();
        tasks.spawn(Arc::clone(&self).send_forwards(queues.outgoing, shutdown.clone()));
        let (inbox, arrivals) = mpsc::channel(1024);
        tasks.spawn(self.bus.clone().listen_routes(inbox, shutdown.clone()));
        tasks.spawn(injector.run(queues.inject, shutdown.clone()));
        tasks.spawn(retained::write(
            Arc::clone(&self.store),
            queues.retained_writes,
            Arc::clone(&self.metrics),
            shutdown.clone(),
        ));
        let mover = Arc::new(mover);
        tasks.spawn(Arc::clone(&self).receive(arrivals, mover, shutdown.clone()));
        tasks.spawn(Arc::clone(&self).refresh(heartbeat, shutdown.clone()));
        tasks.close();
        tasks.wait().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Writes `change` to Redis and announces it.
async fn advertise_on(
    bus: &RedisBus,
    change: &pb::RouteChange,
) -> Result<(), crate::store::StoreError> {
    bus.change_routes(&change.added, &change.removed, &change.encode_to_vec())
        .await
}
