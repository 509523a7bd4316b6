//! Live deliveries acknowledged by devices, merged per device and conversation and written
//! in the background: a busy chat costs one store write per device and conversation per
//! interval, not one per message. Until written they are still this device's
//! acknowledgements: a Pull or digest of the device writes its own first, so a message it
//! acknowledged live never comes back in its Pull. An acknowledgement lost in a crash only
//! means the message comes back in that device's next pull (clients deduplicate by msg_id).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::ImService;
use crate::store::ranges::{self, SeqRange};
use crate::store::{Conversation, Device};

/// Merged ranges per conversation of one device.
type DeviceAcks = HashMap<Conversation, Vec<SeqRange>>;
/// Per device, so a Pull or digest finds its device's acknowledgements without a scan.
type Acks = HashMap<Device, DeviceAcks>;

/// Acknowledged live deliveries not yet known to be committed.
#[derive(Debug, Default)]
pub(super) struct LiveAcks(Mutex<Waiting>);

#[derive(Debug, Default)]
struct Waiting {
    /// Merged since the last flush started.
    pending: Acks,
    /// Taken by the flush under way, until it has committed them (shared, not copied).
    writing: Arc<Acks>,
}

fn merge(into: &mut Vec<SeqRange>, range: SeqRange) {
    *into = ranges::insert(into, range);
}

impl LiveAcks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Nothing panics under this lock; a poisoned one is still consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, device: &Device, conversation: &Conversation, seq: u64) {
        let Some(range) = SeqRange::new(seq, seq) else {
            return;
        };
        let mut waiting = self.lock();
        let of_device = waiting.pending.entry(device.clone()).or_default();
        merge(of_device.entry(conversation.clone()).or_default(), range);
    }

    /// Moves everything pending to the flush that starts now.
    fn start_flush(&self) -> Arc<Acks> {
        let mut waiting = self.lock();
        let taken = Arc::new(std::mem::take(&mut waiting.pending));
        waiting.writing = Arc::clone(&taken);
        taken
    }

    fn end_flush(&self) {
        self.lock().writing = Arc::default();
    }

    /// The uncommitted acknowledgements of `device` (in `conversation`, or in all).
    pub(super) fn of_device(
        &self,
        device: &Device,
        conversation: Option<&Conversation>,
    ) -> DeviceAcks {
        let waiting = self.lock();
        let mut found = DeviceAcks::new();
        for acks in [&waiting.pending, waiting.writing.as_ref()] {
            let Some(theirs) = acks.get(device) else {
                continue;
            };
            for (key, list) in theirs {
                if conversation.is_some_and(|wanted| wanted != key) {
                    continue;
                }
                let merged = found.entry(key.clone()).or_default();
                for range in list {
                    merge(merged, *range);
                }
            }
        }
        found
    }
}

impl ImService {
    /// A device acknowledged a live message: it will not come back in its pulls.
    pub fn delivered(&self, device: &Device, conversation: &Conversation, seq: u64) {
        self.inner.live_acks.add(device, conversation, seq);
    }

    /// A connection of `device` ended: writes the live deliveries it acknowledged before it
    /// goes, so that its next connection, on this node or another, starts past them.
    pub async fn left(&self, device: &Device) {
        self.commit_live_acks(device, None).await;
    }

    /// Writes every acknowledgement merged so far.
    pub(super) async fn flush_live_acks(&self) {
        let acks = self.inner.live_acks.start_flush();
        for (device, of_device) in acks.iter() {
            self.write_acks(device, of_device).await;
        }
        self.inner.live_acks.end_flush();
    }

    /// Writes `device`'s acknowledgements that are not committed yet (in `conversation`, or
    /// in all), before something of that device reads its acknowledgements.
    pub(super) async fn commit_live_acks(
        &self,
        device: &Device,
        conversation: Option<&Conversation>,
    ) {
        let acks = self.inner.live_acks.of_device(device, conversation);
        self.write_acks(device, &acks).await;
    }

    async fn write_acks(&self, device: &Device, acks: &DeviceAcks) {
        for (conversation, merged) in acks {
            for range in merged {
                let acked = self.inner.store.ack(device, conversation, *range);
                if let Err(e) = self.metrics().store_call("ack", acked).await {
                    tracing::warn!(error = %e, %conversation, "recording live deliveries failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::*;

    fn device(client_id: &str) -> Device {
        Device {
            uid: uid("b"),
            client_id: client_id.into(),
        }
    }

    fn chat() -> Conversation {
        direct("a", "b")
    }

    #[test]
    fn consecutive_acks_merge_into_one_range() {
        let acks = LiveAcks::default();
        for seq in [3, 1, 2, 7] {
            acks.add(&device("p"), &chat(), seq);
        }
        let merged = acks.start_flush();
        assert_eq!(
            merged[&device("p")][&chat()],
            vec![SeqRange { lo: 1, hi: 3 }, SeqRange { lo: 7, hi: 7 }]
        );
    }

    #[test]
    fn a_device_sees_its_acks_until_the_flush_has_committed_them() {
        let acks = LiveAcks::default();
        acks.add(&device("p"), &chat(), 1);
        acks.add(&device("p"), &group("team"), 4);
        acks.add(&device("laptop"), &chat(), 2);
        let _writing = acks.start_flush();
        acks.add(&device("p"), &chat(), 2);
        let mine = acks.of_device(&device("p"), Some(&chat()));
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[&chat()], vec![SeqRange { lo: 1, hi: 2 }]);
        assert_eq!(acks.of_device(&device("p"), None).len(), 2);
        acks.end_flush();
        let left = acks.of_device(&device("p"), None);
        assert_eq!(left.len(), 1, "only what arrived after the flush started");
    }
}
