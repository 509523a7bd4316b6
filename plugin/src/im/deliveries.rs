//! Live deliveries acknowledged by devices, merged per device and conversation and written
//! in the background: a busy chat costs one store write per device and conversation per
//! interval, not one per message. An acknowledgement lost in a crash only means the message
//! comes back in that device's next pull (clients deduplicate by msg_id).

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;

use super::ImService;
use crate::store::ranges::{self, SeqRange};
use crate::store::Device;

/// How often merged acknowledgements are written.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Acknowledgements waiting to be merged; beyond this they are dropped (see module docs).
pub(super) const QUEUE: usize = 65_536;

/// One acknowledged live delivery.
#[derive(Debug)]
pub(super) struct Delivered {
    pub(super) device: Device,
    pub(super) conversation: String,
    pub(super) seq: u64,
}

/// Acknowledgements merged into ranges, waiting for the next flush.
#[derive(Debug, Default)]
pub(super) struct Pending {
    ranges: HashMap<(Device, String), Vec<SeqRange>>,
}

impl Pending {
    pub(super) fn add(&mut self, delivered: Delivered) {
        let Some(range) = SeqRange::new(delivered.seq, delivered.seq) else {
            return;
        };
        let merged = self
            .ranges
            .entry((delivered.device, delivered.conversation))
            .or_default();
        *merged = ranges::insert(merged, range);
    }

    fn take(&mut self) -> HashMap<(Device, String), Vec<SeqRange>> {
        std::mem::take(&mut self.ranges)
    }
}

impl ImService {
    /// A device acknowledged a live message: it will not come back in its pulls.
    pub fn delivered(&self, device: &Device, conversation: &str, seq: u64) {
        let delivered = Delivered {
            device: device.clone(),
            conversation: conversation.to_owned(),
            seq,
        };
        if self.inner.deliveries.try_send(delivered).is_err() {
            tracing::debug!(
                conversation,
                seq,
                "delivery ack dropped; left in the backlog"
            );
        }
    }

    /// Drains `incoming` into `pending` without waiting.
    pub(super) fn collect(incoming: &mut mpsc::Receiver<Delivered>, pending: &mut Pending) {
        while let Ok(delivered) = incoming.try_recv() {
            pending.add(delivered);
        }
    }

    /// Writes every merged acknowledgement.
    pub(super) async fn flush(&self, pending: &mut Pending) {
        for ((device, conversation), merged) in pending.take() {
            for range in merged {
                let acked = self.inner.store.ack(&device, &conversation, range);
                if let Err(e) = self.metrics().store_call("ack", acked).await {
                    tracing::warn!(error = %e, conversation, "recording live deliveries failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_acks_merge_into_one_range() {
        let device = Device {
            uid: "b".into(),
            client_id: "p".into(),
        };
        let mut pending = Pending::default();
        for seq in [3, 1, 2, 7] {
            pending.add(Delivered {
                device: device.clone(),
                conversation: "dm:a:b".into(),
                seq,
            });
        }
        let merged = pending.take();
        assert_eq!(
            merged[&(device, "dm:a:b".to_string())],
            vec![SeqRange { lo: 1, hi: 3 }, SeqRange { lo: 7, hi: 7 }]
        );
    }
}
