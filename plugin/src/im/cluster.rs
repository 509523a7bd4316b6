//! Several nodes as one service: device presence is mirrored into Redis with this node's id,
//! live messages for devices on other nodes are handed over through Redis, and a background
//! task keeps this node's liveness and presence fresh. A hand-over that fails leaves the
//! message in the device's backlog (counted in its next digest), never lost.

use std::collections::BTreeSet;

use bytes::Bytes;
use prost::Message;

use super::{DeviceEvent, ImService};
use crate::store::Device;
use crate::wire::{self, pb};

/// Largest hand-over accepted from Redis.
const MAX_HANDOVER: usize = 4 << 20;

impl ImService {
    /// Mirrors a device joining this node into Redis.
    pub(super) fn cluster_join(&self, device: &Device) {
        if let Some(bus) = self.inner.cluster.clone() {
            let device = device.clone();
            tokio::spawn(async move {
                if let Err(e) = bus.join(&device.uid, &device.client_id).await {
                    tracing::warn!(error = %e, "presence not recorded in redis");
                }
            });
        }
    }

    /// Mirrors a device leaving this node into Redis.
    pub(super) fn cluster_leave(&self, device: &Device) {
        if let Some(bus) = self.inner.cluster.clone() {
            let device = device.clone();
            tokio::spawn(async move {
                if let Err(e) = bus.leave(&device.uid, &device.client_id).await {
                    tracing::warn!(error = %e, "presence not cleared in redis");
                }
            });
        }
    }

    /// Hands a live message over to the other nodes holding devices of `uid`.
    pub(super) fn hand_over(&self, uid: &str, conversation: &str, seq: u64, payload: &Bytes) {
        let Some(bus) = self.inner.cluster.clone() else {
            return;
        };
        let handover = pb::Handover {
            uid: uid.to_owned(),
            conversation: conversation.to_owned(),
            seq,
            payload: payload.to_vec(),
        }
        .encode_to_vec();
        let uid = uid.to_owned();
        tokio::spawn(async move {
            let nodes: BTreeSet<String> = match bus.locate(&uid).await {
                Ok(devices) => devices.into_values().filter(|n| n != bus.node()).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "hand-over lookup failed; left in the backlog");
                    return;
                }
            };
            for node in nodes {
                match bus.send(&node, handover.clone()).await {
                    Ok(true) => {}
                    Ok(false) => tracing::debug!(node, "no listener; left in the backlog"),
                    Err(e) => tracing::warn!(node, error = %e, "hand-over failed"),
                }
            }
        });
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
        let payload = Bytes::from(handover.payload);
        for sink in self.inner.presence.sinks(&handover.uid) {
            sink.push(DeviceEvent::Chat {
                conversation: handover.conversation.clone(),
                seq: handover.seq,
                payload: payload.clone(),
            });
        }
    }
}
