//! The IM service: users, devices, conversations and seqs. It sees no MQTT packets and no
//! SQL: the edge calls it with identities and payloads, and it reaches devices only through
//! [`DeviceSink`].

mod answer;
mod background;
mod cluster;
mod deliveries;
mod digest;
mod groups;
mod inbox;
pub mod lifecycle;
mod order;
mod presence;
mod pull;
mod push;
mod pushers;
mod receipts;
pub mod settings;
mod sink;

use crate::domain::Uid;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// A device and a conversation as the IM service and its callers name them.
pub use crate::store::{Conversation, Device};
pub use answer::{ClientError, MAX_MESSAGE};
pub use inbox::Accepted;
pub use order::{SendOrder, Turn};
pub use sink::{DeviceEvent, DeviceSink};

use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::push::settings::Settings as PushSettings;
use crate::store::{RedisBus, Store, StoreError};
use crate::wire::WireError;
use presence::Presence;
use settings::Settings as ImSettings;

/// Why an IM operation was refused or failed; the edge turns it into what the client sees.
#[derive(Debug, thiserror::Error)]
pub enum ImError {
    /// The payload could not be decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A field is missing or invalid.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The policy refused the message.
    #[error("denied by policy: {0}")]
    Denied(String),
    /// The user may not touch that conversation.
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    /// The request names something that does not exist (a group).
    #[error("not found: {0}")]
    NotFound(String),
    /// The store failed; the client may retry.
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    policy: Arc<dyn Policy>,
    presence: Presence,
    /// Connections subscribed to each group on this node.
    watchers: groups::Watchers,
    /// Read cursors that moved since the last receipt updates were sent.
    read_moves: receipts::ReadMoves,
    settings: ImSettings,
    push: PushSettings,
    cluster: Option<RedisBus>,
    metrics: Arc<Metrics>,
    /// Live deliveries acknowledged and not written yet.
    live_acks: deliveries::LiveAcks,
    /// Live messages for other nodes (with a cluster).
    handovers: Option<mpsc::Sender<crate::wire::pb::Handover>>,
    /// Taken by [`ImService::run`].
    handovers_rx: Mutex<Option<mpsc::Receiver<crate::wire::pb::Handover>>>,
    /// Digests waiting to be built together.
    digests: digest::DigestQueue,
    /// Tasks started by events (cluster joins and leaves, device registrations, the digest
    /// builder), waited for by [`ImService::close`].
    tasks: tokio_util::task::TaskTracker,
}

/// Cheap-to-clone handle on the IM service.
#[derive(Debug, Clone)]
pub struct ImService {
    inner: Arc<Inner>,
}

impl ImService {
    /// A service over `store`, checking every message with `policy`, taking pushers as `push`
    /// allows; with `cluster`, one node of several sharing the store. Counts what it does in
    /// `metrics`.
    pub fn new(
        store: Arc<dyn Store>,
        policy: Arc<dyn Policy>,
        settings: ImSettings,
        push: PushSettings,
        cluster: Option<RedisBus>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (handovers, handovers_rx) = match cluster {
            Some(_) => {
                let (tx, rx) = mpsc::channel(cluster::HANDOVER_QUEUE);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        Self {
            inner: Arc::new(Inner {
                store,
                policy,
                presence: Presence::default(),
                watchers: groups::Watchers::default(),
                read_moves: receipts::ReadMoves::default(),
                settings,
                push,
                cluster,
                metrics,
                live_acks: deliveries::LiveAcks::default(),
                handovers,
                handovers_rx: Mutex::new(handovers_rx),
                digests: digest::DigestQueue::default(),
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    /// Records a device when it connects (first sight inherits its user's acks).
    ///
    /// # Errors
    /// The store failed.
    pub async fn connected(&self, device: &Device) -> Result<(), ImError> {
        let registered = self.inner.store.register_device(device);
        Ok(self
            .metrics()
            .store_call("register_device", registered)
            .await?)
    }

    /// Records a device in the background, so that its connection's CONNACK never waits
    /// for the store; the receiver says whether it worked (the digest tries again if not).
    pub fn register(&self, device: &Device) -> tokio::sync::oneshot::Receiver<bool> {
        use tracing::Instrument;
        let (done, registered) = tokio::sync::oneshot::channel();
        let (service, device) = (self.clone(), device.clone());
        let registering = async move {
            let recorded = match service.connected(&device).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record device; continuing");
                    false
                }
            };
            let _ = done.send(recorded);
        };
        self.inner
            .tasks
            .spawn(registering.instrument(tracing::Span::current()));
        registered
    }

    /// The metrics this service counts into (the edge counts its own there too).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Users and devices with an inbox subscription on this node.
    pub fn online_counts(&self) -> (usize, usize) {
        self.inner.presence.counts()
    }

    /// The device now holds an inbox subscription on `connection`: deliver live to `sink`.
    pub fn online(&self, device: &Device, connection: u64, sink: Arc<dyn DeviceSink>) {
        self.inner.presence.online(device, connection, sink);
        self.cluster_join(device);
        self.push_cancelled_by_connect(device);
    }

    /// The device's `connection` ended or dropped its inbox subscription.
    pub fn offline(&self, device: &Device, connection: u64) {
        if self.inner.presence.offline(device, connection) {
            self.cluster_leave(device);
        }
    }

    /// Client ids of a user's devices that are online on this node.
    pub fn online_devices(&self, uid: &str) -> Vec<String> {
        self.inner.presence.devices(uid)
    }
}

impl ImService {
    /// The conversation `uid` names `name`, if `uid` may use it: its own 1:1 chats, and the
    /// groups it is a member of.
    ///
    /// # Errors
    /// A malformed name, a group that does not exist, not a member, or the store failed.
    pub(crate) async fn authorized(&self, name: &str, uid: &Uid) -> Result<Conversation, ImError> {
        let conversation = Conversation::from_name(name, uid).ok_or_else(|| {
            ImError::Invalid(format!(
                "unknown conversation {name:?}: expected \"u/{{uid}}\" or \"g/{{gid}}\""
            ))
        })?;
        if let Some(gid) = conversation.gid() {
            self.require_member(uid, gid).await?;
        }
        Ok(conversation)
    }
}
