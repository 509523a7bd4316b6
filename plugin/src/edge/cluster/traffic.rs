//! What a node sends and hears over Redis: batches of forwarded publishes, the other nodes'
//! route changes, and the heartbeat's full refresh of every node's routes.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Cluster, Injection, NodeRoutes, Outgoing, SessionMover};
use crate::store::{ClusterMessage, Destination};
use crate::throttle::Throttle;
use crate::wire::{self, pb};

/// Publishes sent to other nodes per round trip.
const FORWARD_BATCH: usize = 1024;
/// Largest batch or route change accepted from another node.
const MAX_BATCH_BYTES: usize = 64 << 20;

impl Cluster {
    /// Sends what is queued for other nodes, a batch per destination and round trip, until
    /// `shutdown`.
    pub(super) async fn send_forwards(
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
                    for ((destination, _), heard) in batches.iter().zip(heard) {
                        if !heard && destination != &Destination::All {
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

    /// One encoded `ForwardBatch` per destination, each in arrival order; empties `batch`.
    fn encode(&self, batch: &mut Vec<Outgoing>) -> Vec<(Destination, Vec<u8>)> {
        let mut per_destination: Vec<(Destination, Vec<pb::Forward>)> = Vec::new();
        for Outgoing {
            destination,
            publish,
        } in batch.drain(..)
        {
            match per_destination.iter_mut().find(|(d, _)| *d == destination) {
                Some((_, publishes)) => publishes.push(publish),
                None => per_destination.push((destination, vec![publish])),
            }
        }
        let origin = self.bus.node().to_owned();
        per_destination
            .into_iter()
            .map(|(destination, publishes)| {
                let batch = pb::ForwardBatch {
                    origin: origin.clone(),
                    publishes,
                };
                (destination, batch.encode_to_vec())
            })
            .collect()
    }

    /// Applies what the cluster's channels bring until `shutdown`: route changes, publishes
    /// to inject, steps of sessions moving (the old node's side through `mover`), and,
    /// whenever the node (again) follows the channels, the retained messages
    /// from the store (the broadcasts it missed meanwhile included).
    pub(super) async fn receive(
        self: Arc<Self>,
        mut arrivals: mpsc::Receiver<ClusterMessage>,
        mover: Arc<SessionMover>,
        shutdown: CancellationToken,
    ) {
        // What was read at start goes in first, even when Redis is down; the store is read
        // again each time the node follows the channels.
        let preloaded = self
            .preloaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(stored) = preloaded {
            let loads = self.metrics.rounds("retained_loads");
            if let Err(e) = self.retained.apply(stored, &self.inject, &loads).await {
                tracing::warn!(error = %e, "retained messages read at start not injected");
            }
        }
        loop {
            let arrival = tokio::select! {
                () = shutdown.cancelled() => return,
                arrival = arrivals.recv() => match arrival {
                    Some(arrival) => arrival,
                    None => return,
                },
            };
            match arrival {
                ClusterMessage::Following => self.load_retained().await,
                ClusterMessage::Routes(bytes) => self.apply_change(&bytes),
                ClusterMessage::Forwards(bytes) => self.inject_batch(&bytes),
                ClusterMessage::Session(bytes) => self.on_move(&bytes, &mover),
            }
        }
    }

    async fn load_retained(&self) {
        let loads = self.metrics.rounds("retained_loads");
        if let Err(e) = self.retained.load(&*self.store, &self.inject, &loads).await {
            tracing::warn!(error = %e, "retained messages not loaded; retrying when the cluster's channels are followed again");
        }
    }

    /// Injects a batch another node forwarded here.
    fn inject_batch(&self, bytes: &[u8]) {
        let batch: pb::ForwardBatch = match wire::decode(bytes, MAX_BATCH_BYTES, "ForwardBatch") {
            Ok(batch) => batch,
            Err(e) => return tracing::warn!(error = %e, "bad forward ignored"),
        };
        if batch.origin == self.bus.node() {
            return;
        }
        self.metrics
            .forwards_received
            .inc_by(batch.publishes.len() as u64);
        for publish in batch.publishes {
            if !publish.shared.is_empty() {
                let shared = publish.shared.clone();
                self.deliver_shared(&shared, &Arc::new(publish));
                continue;
            }
            if publish.retain {
                self.retained.arrived(&publish);
            }
            if self.inject.try_send(Injection::Publish(publish)).is_err() {
                self.metrics.count_forward_failed("inject_queue_full");
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
        let routes = remote.entry(change.node.into()).or_default();
        routes.remove(&change.removed);
        routes.add(change.added);
        self.count_remote(&remote);
    }

    /// Every `heartbeat` until `shutdown`: renews this node's routes and reads every other
    /// node's afresh.
    pub(super) async fn refresh(self: Arc<Self>, heartbeat: Duration, shutdown: CancellationToken) {
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
                    self.rotation.keep_only(|shared| {
                        self.members.holds(shared)
                            || fresh.values().any(|routes| routes.holds_shared(shared))
                    });
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
}
