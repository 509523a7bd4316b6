//! Retained messages as one broker keeps them. A retained publish (or its clearing) on any
//! node goes to every node, each of which injects it with the retain flag into its own
//! rumqttd, and into the store, written in arrival order by one task. A node loads the
//! stored ones when it starts and whenever it follows the cluster's channels again (what
//! was broadcast while it did not, it gets from the store; a clearing it missed, it applies
//! to the topics its rumqttd still retains). Only what differs from what its rumqttd holds
//! is injected then: rumqttd delivers an injected retained message to the subscribers it
//! has, as any publish.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::Injection;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::wire::{self, pb, WireError};

/// Retained messages waiting to be written to the store; beyond that they are not stored
/// (counted), though every node still gets them.
const WRITE_QUEUE: usize = 16_384;
/// Largest stored retained message read back.
const MAX_STORED_BYTES: usize = 64 << 20;

/// A retained message for the store: `None` clears the topic's.
#[derive(Debug)]
pub(super) struct Write {
    topic: String,
    message: Option<Vec<u8>>,
}

/// Why the retained messages could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(super) enum LoadError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("stored retained message: {0}")]
    Stored(#[from] WireError),
    #[error("the injection link did not take them")]
    Injection,
}

/// The retained messages of this node's rumqttd, and the queue into the store.
#[derive(Debug)]
pub(super) struct RetainedCopies {
    writes: mpsc::Sender<Write>,
    /// Topics this node's rumqttd retains a message for, with a hash of it.
    held: Mutex<HashMap<String, u64>>,
    /// Whether the stored ones were loaded once.
    loaded: watch::Sender<bool>,
}

impl RetainedCopies {
    /// Copies with nothing held yet, and the queue [`write`] drains.
    pub(super) fn new() -> (Self, mpsc::Receiver<Write>) {
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let copies = Self {
            writes,
            held: Mutex::default(),
            loaded: watch::Sender::new(false),
        };
        (copies, queue)
    }

    /// A client of this node set (or, with an empty payload, cleared) `publish`'s retained
    /// message: this node's rumqttd has it, and the store is to keep it.
    pub(super) fn set_here(&self, publish: &pb::Forward, metrics: &Metrics) {
        self.arrived(publish);
        let write = Write {
            topic: publish.topic.clone(),
            message: (!publish.payload.is_empty()).then(|| publish.encode_to_vec()),
        };
        if self.writes.try_send(write).is_err() {
            metrics.retained_writes_failed.inc();
        }
    }

    /// Another node's retained message (or clearing) is being injected here.
    pub(super) fn arrived(&self, publish: &pb::Forward) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if publish.payload.is_empty() {
            held.remove(&publish.topic);
        } else {
            held.insert(publish.topic.clone(), fingerprint(publish));
        }
    }

    /// Once the stored ones were loaded the first time.
    pub(super) async fn loaded(&self) {
        let mut loaded = self.loaded.subscribe();
        // The sender lives as long as `self`.
        let _ = loaded.wait_for(|loaded| *loaded).await;
    }

    /// Injects the stored retained messages this node's rumqttd does not hold as they are,
    /// clears the topics it retains that the store no longer has, and waits until rumqttd
    /// took them all; counts the load into `loads`.
    pub(super) async fn load(
        &self,
        store: &dyn Store,
        inject: &mpsc::Sender<Injection>,
        loads: &Counter,
    ) -> Result<(), LoadError> {
        let stored = read(store).await?;
        self.apply(stored, inject, loads).await
    }

    /// Injects `stored` (what the store holds) as [`RetainedCopies::load`] does.
    pub(super) async fn apply(
        &self,
        stored: Vec<pb::Forward>,
        inject: &mpsc::Sender<Injection>,
        loads: &Counter,
    ) -> Result<(), LoadError> {
        let now_held: HashMap<String, u64> = stored
            .iter()
            .map(|publish| (publish.topic.clone(), fingerprint(publish)))
            .collect();
        let (changed, cleared): (Vec<pb::Forward>, Vec<String>) = {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            let changed = stored
                .into_iter()
                .filter(|publish| held.get(&publish.topic) != now_held.get(&publish.topic))
                .collect();
            let cleared = held
                .keys()
                .filter(|topic| !now_held.contains_key(*topic))
                .cloned()
                .collect();
            *held = now_held;
            (changed, cleared)
        };
        let clearings = cleared.into_iter().map(|topic| pb::Forward {
            topic,
            retain: true,
            ..Default::default()
        });
        for publish in changed.into_iter().chain(clearings) {
            inject
                .send(Injection::Publish(publish))
                .await
                .map_err(|_| LoadError::Injection)?;
        }
        let (done, taken) = oneshot::channel();
        inject
            .send(Injection::Flush(done))
            .await
            .map_err(|_| LoadError::Injection)?;
        taken.await.map_err(|_| LoadError::Injection)?;
        self.loaded.send_replace(true);
        loads.inc();
        Ok(())
    }
}

/// What tells two retained messages of a topic apart.
fn fingerprint(publish: &pb::Forward) -> u64 {
    let mut hasher = DefaultHasher::new();
    (publish.qos, &publish.properties, &publish.payload).hash(&mut hasher);
    hasher.finish()
}

/// Every retained message the store holds.
///
/// # Errors
/// The store failed, or holds one that does not decode.
pub(super) async fn read(store: &dyn Store) -> Result<Vec<pb::Forward>, LoadError> {
    store
        .retained()
        .await?
        .iter()
        .map(|retained| {
            wire::decode(&retained.message, MAX_STORED_BYTES, "Forward").map_err(LoadError::from)
        })
        .collect()
}

/// Writes retained messages to `store` in the order they were set, until `shutdown` (then
/// what is queued is written too).
pub(super) async fn write(
    store: Arc<dyn Store>,
    mut queue: mpsc::Receiver<Write>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let failures = crate::throttle::Throttle::default();
    let mut closing = false;
    loop {
        let next = if closing {
            queue.recv().await
        } else {
            tokio::select! {
                next = queue.recv() => next,
                () = shutdown.cancelled() => {
                    queue.close();
                    closing = true;
                    continue;
                }
            }
        };
        let Some(Write { topic, message }) = next else {
            return;
        };
        if let Err(e) = store.put_retained(&topic, message).await {
            metrics.retained_writes_failed.inc();
            if let Some(also) = failures.admit() {
                let logged = crate::text::LoggedId(&topic);
                tracing::warn!(error = %e, topic = %logged, also_since_last = also, "retained message not stored: nodes that start later will not have it");
            }
        }
    }
}
