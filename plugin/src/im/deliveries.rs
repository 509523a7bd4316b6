//! Live deliveries acknowledged by devices, merged per device and conversation and written
//! in the background: a busy chat costs one store write per device and conversation per
//! interval, not one per message. Until written they are still this device's
//! acknowledgements: a Pull or digest of the device writes its own first, so a message it
//! acknowledged live never comes back in its Pull. An acknowledgement lost in a crash only
//! means the message comes back in that device's next pull (clients deduplicate by msg_id).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::ImService;
use crate::store::ranges::{self, SeqRange};
use crate::store::{Conversation, Device};

type Acks = HashMap<(Device, Conversation), Vec<SeqRange>>;

/// Acknowledged live deliveries not yet known to be committed.
#[derive(Debug, Default)]
pub(super) struct LiveAcks(Mutex<Waiting>);

#[derive(Debug, Default)]
struct Waiting {
    /// Merged since the last flush started.
    pending: Acks,
    /// Taken by the flush under way, until it has committed them.
    writing: Acks,
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
        let key = (device.clone(), conversation.clone());
        let merged = waiting.pending.entry(key).or_default();
        *merged = ranges::insert(merged, range);
    }

    /// Moves everything pending to the flush that starts now.
    fn start_flush(&self) -> Acks {
        let mut waiting = self.lock();
        let taken = std::mem::take(&mut waiting.pending);
        waiting.writing = taken.clone();
        taken
    }

    fn end_flush(&self) {
        self.lock().writing.clear();
    }

    /// The uncommitted acknowledgements of `device` (in `conversation`, or in all).
    fn of_device(&self, device: &Device, conversation: Option<&Conversation>) -> Acks {
        let waiting = self.lock();
        let mut found = Acks::new();
        for acks in [&waiting.pending, &waiting.writing] {
            let theirs = acks
                .iter()
                .filter(|((d, c), _)| d == device && conversation.is_none_or(|wanted| wanted == c));
            for (key, list) in theirs {
                let merged = found.entry(key.clone()).or_default();
                for range in list {
                    *merged = ranges::insert(merged, *range);
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

    /// Writes every acknowledgement merged so far.
    pub(super) async fn flush_live_acks(&self) {
        let acks = self.inner.live_acks.start_flush();
        self.write_acks(acks).await;
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
        self.write_acks(acks).await;
    }

    async fn write_acks(&self, acks: Acks) {
        for ((device, conversation), merged) in acks {
            for range in merged {
                let acked = self.inner.store.ack(&device, &conversation, range);
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

    fn device(client_id: &str) -> Device {
        Device {
            uid: "b".into(),
            client_id: client_id.into(),
        }
    }

    fn chat() -> Conversation {
        Conversation::direct("a", "b")
    }

    #[test]
    fn consecutive_acks_merge_into_one_range() {
        let acks = LiveAcks::default();
        for seq in [3, 1, 2, 7] {
            acks.add(&device("p"), &chat(), seq);
        }
        let merged = acks.start_flush();
        assert_eq!(
            merged[&(device("p"), chat())],
            vec![SeqRange { lo: 1, hi: 3 }, SeqRange { lo: 7, hi: 7 }]
        );
    }

    #[test]
    fn a_device_sees_its_acks_until_the_flush_has_committed_them() {
        let acks = LiveAcks::default();
        acks.add(&device("p"), &chat(), 1);
        acks.add(&device("p"), &Conversation::group("team"), 4);
        acks.add(&device("laptop"), &chat(), 2);
        let _writing = acks.start_flush();
        acks.add(&device("p"), &chat(), 2);
        let mine = acks.of_device(&device("p"), Some(&chat()));
        assert_eq!(mine.len(), 1);
        assert_eq!(
            mine[&(device("p"), chat())],
            vec![SeqRange { lo: 1, hi: 2 }]
        );
        assert_eq!(acks.of_device(&device("p"), None).len(), 2);
        acks.end_flush();
        let left = acks.of_device(&device("p"), None);
        assert_eq!(left.len(), 1, "only what arrived after the flush started");
    }
}
