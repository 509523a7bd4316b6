//! Several nodes as one broker for plain (non-IM) topics. Each node advertises the filters
//! its clients hold (its routes, in Redis, renewed by its heartbeat and gone with it) and
//! follows every other node's. A client's publish goes to the node's own rumqttd as before,
//! and, when another node holds a matching route, to that node too: queued per node in
//! arrival order, sent in batches through Redis, and injected there into that node's
//! rumqttd by a link of the hook layer's own, which delivers it to its subscribers.
//!
//! What crosses nodes is at most once: a publisher's PUBACK comes from its own node, and a
//! forward that Redis or the receiving node loses is counted, not retried.

mod inject;
mod routes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::codec::PublishView;
use crate::metrics::Metrics;
use crate::store::{ClusterMessage, RedisBus};
use crate::throttle::Throttle;
use crate::wire::{self, pb};
use routes::{LocalRoutes, NodeRoutes};

/// Publishes waiting to be forwarded to other nodes; beyond that they are dropped (and
/// counted): a node's own traffic never waits for the cluster.
const FORWARD_QUEUE: usize = 65_536;
/// Publishes sent to other nodes per round trip.
const FORWARD_BATCH: usize = 1024;
/// Largest batch accepted from another node.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// A publish for another node.
#[derive(Debug)]
struct Outgoing {
    node: Arc<str>,
    publish: pb::Forward,
}

/// Plain-topic routing across nodes, for one node.
#[derive(Debug)]
pub(crate) struct Cluster {
    bus: RedisBus,
    local: Mutex<LocalRoutes>,
    remote: RwLock<HashMap<Arc<str>, NodeRoutes>>,
    outgoing: mpsc::Sender<Outgoing>,
    /// Taken by [`Cluster::run`].
    outgoing_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    metrics: Arc<Metrics>,
    /// Route changes being written in the background.
    tasks: TaskTracker,
}

impl Cluster {
    /// This node's routing through `bus`, counting into `metrics`.
    pub(crate) fn new(bus: RedisBus, metrics: Arc<Metrics>) -> Self {
        let (outgoing, outgoing_rx) = mpsc::channel(FORWARD_QUEUE);
        Self {
            bus,
            local: Mutex::default(),
            remote: RwLock::default(),
            outgoing,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
            metrics,
            tasks: TaskTracker::new(),
        }
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
        let change = self.change(Vec::new(), removed);
        let bus = self.bus.clone();
        let errors = self.metrics.redis_errors.clone();
        self.tasks.spawn(async move {
            if let Err(e) = advertise_on(&bus, &change).await {
                errors.inc();
                tracing::debug!(error = %e, "route withdrawal not written; the heartbeat will");
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

    /// Whether another node holds a route matching `topic`.
    pub(crate) fn wanted_elsewhere(&self, topic: &str) -> bool {
        self.remote
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|routes| routes.matches(topic))
    }

    /// Queues a client's publish for every other node with a matching route, in arrival
    /// order; a full queue drops it (counted).
    pub(crate) fn forward(&self, publish: &PublishView) {
        let topic = publish.topic_str();
        let nodes: Vec<Arc<str>> = self
            .remote
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, routes)| routes.matches(topic))
            .map(|(node, _)| Arc::clone(node))
            .collect();
        for node in nodes {
            let publish = pb::Forward {
                topic: topic.to_owned(),
                qos: u32::from(publish.qos()),
                retain: publish.flags & 1 == 1,
                properties: publish.properties.to_vec(),
                payload: publish.payload.to_vec(),
            };
            if self.outgoing.try_send(Outgoing { node, publish }).is_err() {
                self.metrics.count_forward_failed("queue_full");
            }
        }
    }

    /// This node's name in the cluster.
    pub(crate) fn node(&self) -> &str {
        self.bus.node()
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

    /// Routing until `shutdown`: sends the queued forwards, follows the other nodes' routes,
    /// injects what they forward here through `injector`, and every `heartbeat` renews this
    /// node's routes and reads everyone else's afresh (healing a lost change or a flushed
    /// Redis, and forgetting dead nodes).
    pub(crate) async fn run(
        self: Arc<Self>,
        injector: inject::Injector,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) {
        let tasks = TaskTracker::new();
        let taken = self
            .outgoing_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(queue) = taken {
            tasks.spawn(Arc::clone(&self).send_forwards(queue, shutdown.clone()));
        }
        let (inbox, arrivals) = mpsc::channel(1024);
        tasks.spawn(self.bus.clone().listen_routes(inbox, shutdown.clone()));
        let (inject, injections) = mpsc::channel(FORWARD_QUEUE);
        tasks.spawn(injector.run(injections, shutdown.clone()));
        tasks.spawn(Arc::clone(&self).receive(arrivals, inject, shutdown.clone()));
        tasks.spawn(Arc::clone(&self).refresh(heartbeat, shutdown.clone()));
        tasks.close();
        tasks.wait().await;
        self.tasks.close();
        self.tasks.wait().await;
    }

    async fn send_forwards(
        self: Arc<Self>,
        mut queue: mpsc::Receiver<Outgoing>,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(FORWARD_BATCH);
        let failures = Throttle::default();
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = queue.recv_many(&mut batch, FORWARD_BATCH) => received,
            };
            if received == 0 {
                return;
            }
            let batches = self.encode(&mut batch);
            match self.bus.forward(&batches).await {
                Ok(heard) => {
                    for ((_, _), heard) in batches.iter().zip(heard) {
                        if !heard {
                            // A dead node whose routes have not expired yet.
                            self.metrics.count_forward_failed("no_listener");
                        }
                    }
                    self.metrics.forwards_sent.inc_by(received as u64);
                }
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    for _ in 0..received {
                        self.metrics.count_forward_failed("redis");
                    }
                    if let Some(also) = failures.admit() {
                        tracing::warn!(error = %e, publishes = received, also_since_last = also, "forward to other nodes failed; publishes lost there");
                    }
                }
            }
        }
    }

    /// One encoded `ForwardBatch` per node, each in arrival order; empties `batch`.
    fn encode(&self, batch: &mut Vec<Outgoing>) -> Vec<(String, Vec<u8>)> {
        let mut per_node: Vec<(Arc<str>, Vec<pb::Forward>)> = Vec::new();
        for Outgoing { node, publish } in batch.drain(..) {
            match per_node.iter_mut().find(|(n, _)| *n == node) {
                Some((_, publishes)) => publishes.push(publish),
                None => per_node.push((node, vec![publish])),
            }
        }
        let origin = self.bus.node().to_owned();
        per_node
            .into_iter()
            .map(|(node, publishes)| {
                let batch = pb::ForwardBatch {
                    origin: origin.clone(),
                    publishes,
                };
                (node.to_string(), batch.encode_to_vec())
            })
            .collect()
    }

    async fn receive(
        self: Arc<Self>,
        mut arrivals: mpsc::Receiver<ClusterMessage>,
        inject: mpsc::Sender<pb::Forward>,
        shutdown: CancellationToken,
    ) {
        loop {
            let arrival = tokio::select! {
                () = shutdown.cancelled() => return,
                arrival = arrivals.recv() => match arrival {
                    Some(arrival) => arrival,
                    None => return,
                },
            };
            match arrival {
                ClusterMessage::Routes(bytes) => self.apply_change(&bytes),
                ClusterMessage::Forwards(bytes) => {
                    let batch: pb::ForwardBatch =
                        match wire::decode(&bytes, MAX_BATCH_BYTES, "ForwardBatch") {
                            Ok(batch) => batch,
                            Err(e) => {
                                tracing::warn!(error = %e, "bad forward ignored");
                                continue;
                            }
                        };
                    if batch.origin == self.bus.node() {
                        continue;
                    }
                    let received = batch.publishes.len() as u64;
                    self.metrics.forwards_received.inc_by(received);
                    for publish in batch.publishes {
                        if inject.try_send(publish).is_err() {
                            self.metrics.count_forward_failed("inject_queue_full");
                        }
                    }
                }
            }
        }
    }

    /// Follows another node's route change as it is announced.
    fn apply_change(&self, bytes: &[u8]) {
        let change: pb::RouteChange = match wire::decode(bytes, MAX_BATCH_BYTES, "RouteChange") {
            Ok(change) => change,
            Err(e) => return tracing::warn!(error = %e, "bad route change ignored"),
        };
        if change.node == self.bus.node() {
            return;
        }
        let mut remote = self.remote.write().unwrap_or_else(PoisonError::into_inner);
        let node: Arc<str> = change.node.into();
        let routes = remote.entry(Arc::clone(&node)).or_default();
        routes.remove(&change.removed);
        routes.add(change.added);
        if routes.is_empty() {
            remote.remove(&node);
        }
        self.count_remote(&remote);
    }

    async fn refresh(self: Arc<Self>, heartbeat: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(heartbeat);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let failures = Throttle::default();
        let rounds = self.metrics.rounds("routes");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let all = self.lock_local().all();
            let refreshed = async {
                self.bus.refresh_routes(&all).await?;
                self.bus.remote_routes().await
            };
            match refreshed.await {
                Ok(routes) => {
                    let fresh: HashMap<Arc<str>, NodeRoutes> = routes
                        .into_iter()
                        .map(|(node, filters)| (node.into(), NodeRoutes::of(filters)))
                        .collect();
                    self.count_remote(&fresh);
                    *self.remote.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                    rounds.inc();
                }
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    if let Some(also) = failures.admit() {
                        tracing::warn!(error = %e, also_since_last = also, "routes not refreshed: plain topics reach only this node's clients meanwhile");
                    }
                }
            }
        }
    }

    fn count_remote(&self, remote: &HashMap<Arc<str>, NodeRoutes>) {
        let held: usize = remote.values().map(NodeRoutes::len).sum();
        self.metrics.cluster_routes_remote.set(held as i64);
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

pub(crate) use inject::Injector;
