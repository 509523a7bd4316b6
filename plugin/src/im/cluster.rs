//! Several nodes as one service: device presence is mirrored into Redis with this node's id,
//! live messages for devices on other nodes are handed over through Redis, and a background
//! task keeps this node's liveness and presence fresh. A hand-over that fails leaves the
//! message in the device's backlog (counted in its next digest), never lost.

use std::collections::BTreeSet;

use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{DeviceEvent, ImService};
use crate::domain::{Conversation, Device, Gid, Uid};
use crate::metrics::{DirectionLabels, Metrics};
use crate::store::{RedisBus, StoreError};
use crate::throttle::Throttle;
use crate::wire::{self, pb};

/// Largest hand-over accepted from Redis.
const MAX_HANDOVER: usize = 4 << 20;
/// Live messages waiting to be handed over; beyond that they stay in the backlog.
pub(super) const HANDOVER_QUEUE: usize = 65_536;
/// Hand-overs sent per round trip.
const HANDOVER_BATCH: usize = 1024;
const SENT: DirectionLabels = DirectionLabels { direction: "sent" };
const RECEIVED: DirectionLabels = DirectionLabels {
    direction: "received",
};

impl ImService {
    /// Mirrors a device joining this node into Redis; a node that held the same client id
    /// before is told to close its connection of it (take-over across nodes).
    pub(super) fn cluster_join(&self, device: &Device) {
        if let Some(bus) = self.inner.cluster.clone() {
            let device = device.clone();
            let errors = self.metrics().redis_errors.clone();
            self.inner.tasks.spawn(async move {
                let previous = match bus.join(&device.uid, &device.client_id).await {
                    Ok(previous) => previous,
                    Err(e) => {
                        errors.inc();
                        tracing::warn!(error = %e, "presence not recorded in redis");
                        return;
                    }
                };
                let Some(node) = previous else {
                    return;
                };
                let take_over = pb::Handover {
                    uid: device.uid.to_string(),
                    client_id: device.client_id.clone(),
                    take_over: true,
                    origin: bus.node().to_owned(),
                    ..pb::Handover::default()
                };
                let message = [(node, take_over.encode_to_vec())];
                if let Err(e) = bus.send_many(&message).await {
                    errors.inc();
                    tracing::warn!(error = %e, "take-over not sent to the previous node");
                }
            });
        }
    }

    /// Mirrors a device leaving this node into Redis.
    pub(super) fn cluster_leave(&self, device: &Device) {
        if let Some(bus) = self.inner.cluster.clone() {
            let device = device.clone();
            let errors = self.metrics().redis_errors.clone();
            self.inner.tasks.spawn(async move {
                if let Err(e) = bus.leave(&device.uid, &device.client_id).await {
                    errors.inc();
                    tracing::warn!(error = %e, "presence not cleared in redis");
                }
            });
        }
    }

    /// Queues a live message for the other nodes holding devices of `uid`; a full queue
    /// leaves it in the backlog.
    pub(super) fn hand_over(
        &self,
        uid: &Uid,
        conversation: &Conversation,
        seq: u64,
        payload: &Bytes,
    ) {
        self.queue_handover(pb::Handover {
            uid: uid.to_string(),
            conversation: conversation.key(),
            seq,
            payload: payload.to_vec(),
            ..pb::Handover::default()
        });
    }

    /// Queues a group message for every other node's subscribers of the group.
    pub(super) fn hand_over_group(
        &self,
        gid: &Gid,
        conversation: &Conversation,
        seq: u64,
        payload: &Bytes,
    ) {
        self.queue_handover(pb::Handover {
            conversation: conversation.key(),
            seq,
            payload: payload.to_vec(),
            group: gid.to_string(),
            ..pb::Handover::default()
        });
    }

    /// Queues a `Response` for the `resp` topic of `uid`'s devices on other nodes.
    pub(super) fn hand_over_notice(&self, uid: &Uid, payload: &Bytes) {
        self.queue_handover(pb::Handover {
            uid: uid.to_string(),
            payload: payload.to_vec(),
            notice: true,
            ..pb::Handover::default()
        });
    }

    fn queue_handover(&self, mut handover: pb::Handover) {
        let (Some(queue), Some(bus)) = (&self.inner.handovers, &self.inner.cluster) else {
            return;
        };
        handover.origin = bus.node().to_owned();
        if queue.try_send(handover).is_err() {
            tracing::debug!("hand-over queue full; left in the backlog");
        }
    }

    /// Sends queued hand-overs until the queue closes or `shutdown`: whatever waits at that moment costs
    /// one presence lookup round trip and one publish round trip, however many messages.
    pub(super) async fn send_handovers(
        self,
        mut queue: mpsc::Receiver<pb::Handover>,
        shutdown: CancellationToken,
    ) {
        let Some(bus) = self.inner.cluster.clone() else {
            return;
        };
        let mut batch = Vec::with_capacity(HANDOVER_BATCH);
        let failures = Throttle::default();
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = queue.recv_many(&mut batch, HANDOVER_BATCH) => received,
            };
            if received == 0 {
                return;
            }
            if let Err(e) = send_batch(&bus, &batch, self.metrics()).await {
                let metrics = self.metrics();
                metrics.redis_errors.inc();
                metrics.handovers_failed.inc_by(batch.len() as u64);
                if let Some(also) = failures.admit() {
                    tracing::warn!(error = %e, messages = batch.len(), also_since_last = also, "hand-over failed; left in the backlog");
                }
            }
            batch.clear();
        }
    }

    /// The devices of `uid` on any live node: (client id, node id). Without a cluster, this
    /// node's devices.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn locate(&self, uid: &str) -> Result<Vec<(String, String)>, super::ImError> {
        match &self.inner.cluster {
            Some(bus) => Ok(bus.locate(uid).await?.into_iter().collect()),
            None => Ok(self
                .online_devices(uid)
                .into_iter()
                .map(|client_id| (client_id, String::new()))
                .collect()),
        }
    }

    pub(super) fn deliver_handover(&self, bytes: &[u8]) {
        let handover: pb::Handover = match wire::decode(bytes, MAX_HANDOVER, "Handover") {
            Ok(handover) => handover,
            Err(e) => {
                tracing::warn!(error = %e, "bad hand-over ignored");
                return;
            }
        };
        self.metrics().handovers.get_or_create(&RECEIVED).inc();
        if handover.take_over {
            let Ok(uid) = Uid::parse(&handover.uid) else {
                tracing::warn!("take-over names no user; ignored");
                return;
            };
            let device = Device {
                uid,
                client_id: handover.client_id,
            };
            tracing::debug!(node = handover.origin, "device taken over by another node");
            for sink in self.inner.presence.device_sinks(&device) {
                sink.push(DeviceEvent::TakenOver);
            }
            return;
        }
        let payload = Bytes::from(handover.payload);
        if handover.notice {
            for sink in self.inner.presence.sinks(&handover.uid) {
                sink.push(DeviceEvent::Notice(payload.clone()));
            }
            return;
        }
        let Some(conversation) = Conversation::from_key(&handover.conversation) else {
            tracing::warn!("hand-over names no conversation; dropped");
            return;
        };
        let sinks = if handover.group.is_empty() {
            self.inner.presence.sinks(&handover.uid)
        } else {
            let own = self
                .inner
                .cluster
                .as_ref()
                .is_some_and(|bus| bus.node() == handover.origin);
            if own {
                return;
            }
            let Some(gid) = conversation.gid() else {
                tracing::warn!("group hand-over names no group; dropped");
                return;
            };
            self.inner.watchers.sinks(gid, None)
        };
        let event = DeviceEvent::Chat {
            conversation,
            seq: handover.seq,
            payload,
        };
        self.push_live(&sinks, &event);
    }
}

async fn send_batch(
    bus: &RedisBus,
    batch: &[pb::Handover],
    metrics: &Metrics,
) -> Result<(), StoreError> {
    let (groups, direct): (Vec<&pb::Handover>, Vec<&pb::Handover>) =
        batch.iter().partition(|h| !h.group.is_empty());
    if !groups.is_empty() {
        let payloads: Vec<Vec<u8>> = groups.iter().map(|h| h.encode_to_vec()).collect();
        bus.broadcast(&payloads).await?;
        let sent = payloads.len() as u64;
        metrics.handovers.get_or_create(&SENT).inc_by(sent);
    }
    let mut uids: Vec<&str> = direct.iter().map(|h| h.uid.as_str()).collect();
    uids.sort_unstable();
    uids.dedup();
    if uids.is_empty() {
        return Ok(());
    }
    let located = bus.locate_many(&uids).await?;
    let mut messages = Vec::new();
    for handover in direct {
        let Ok(at) = uids.binary_search(&handover.uid.as_str()) else {
            continue;
        };
        if located[at].is_empty() && !handover.notice {
            metrics.counted_offline.inc();
        }
        let nodes: BTreeSet<&String> = located[at]
            .values()
            .filter(|node| *node != bus.node())
            .collect();
        let bytes = handover.encode_to_vec();
        messages.extend(nodes.into_iter().map(|node| (node.clone(), bytes.clone())));
    }
    if messages.is_empty() {
        return Ok(());
    }
    let heard = bus.send_many(&messages).await?;
    let sent = heard.iter().filter(|heard| **heard).count();
    metrics.handovers.get_or_create(&SENT).inc_by(sent as u64);
    for ((node, _), heard) in messages.iter().zip(heard) {
        if !heard {
            // A dead node whose presence has not expired yet.
            metrics.handovers_failed.inc();
            tracing::debug!(node, "no listener; left in the backlog");
        }
    }
    Ok(())
}
