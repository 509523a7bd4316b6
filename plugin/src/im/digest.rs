//! The counter digest a device gets once per connection: per conversation with something
//! unacked, the badge increment, absolute cursors and the newest few messages — never the
//! backlog itself.

use crate::domain::Uid;
use std::sync::{Mutex, PoisonError};

use prost::Message;
use tokio::sync::oneshot;

use super::inbox::{now_ms, rehydrate};
use super::{ImError, ImService};
use crate::store::{
    ConversationState, Device, DigestRequest, DigestShape, DigestSnapshot, StoreError,
};
use crate::wire::pb;

/// Most devices whose digests one store round builds.
const MAX_DIGEST_BATCH: usize = 256;

/// One digest asked for, and where its result goes.
struct DigestJob {
    request: DigestRequest,
    reply: oneshot::Sender<Result<DigestSnapshot, StoreError>>,
}

/// Digests asked for and not built yet. One builder at a time takes everything waiting and
/// builds it in one store round: a fleet reconnecting at once costs a store round per batch,
/// not per device, and a single device waits for no one.
#[derive(Default)]
pub(super) struct DigestQueue {
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    jobs: Vec<DigestJob>,
    /// A builder is running (it takes what arrives meanwhile).
    building: bool,
}

/// Lost pushers told in one digest (a device holds a handful; the rest wait for the next).
const PUSHERS_GONE_PER_DIGEST: usize = 20;

impl std::fmt::Debug for DigestQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.lock();
        f.debug_struct("DigestQueue")
            .field("waiting", &waiting.jobs.len())
            .field("building", &waiting.building)
            .finish()
    }
}

impl DigestQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`; true if no builder runs, so the caller must start one.
    fn push(&self, job: DigestJob) -> bool {
        let mut waiting = self.lock();
        waiting.jobs.push(job);
        !std::mem::replace(&mut waiting.building, true)
    }

    /// The next batch, or `None` (and the builder stops) once nothing waits.
    fn next_batch(&self) -> Option<Vec<DigestJob>> {
        let mut waiting = self.lock();
        if waiting.jobs.is_empty() {
            waiting.building = false;
            return None;
        }
        let take = waiting.jobs.len().min(MAX_DIGEST_BATCH);
        Some(waiting.jobs.drain(..take).collect())
    }
}

/// Marks the builder stopped if it panics, so the next digest asked for starts a new one
/// (a builder that ends normally has marked it in [`DigestQueue::next_batch`], and a newer
/// builder may already be running by then).
struct Builder<'a>(&'a DigestQueue);

impl Drop for Builder<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().building = false;
        }
    }
}

impl ImService {
    /// Builds and records the next digest of `device`, within `budget` encoded bytes (what
    /// the client's Maximum Packet Size leaves for the payload): previews go first, then the
    /// conversations with the oldest news, and what is left out is not recorded, so the
    /// device's `ClearCounters` clears only what it was shown (the rest comes back in its
    /// next digest). Built together with the digests other devices asked for meanwhile.
    ///
    /// # Errors
    /// The store failed.
    #[tracing::instrument(skip(self), fields(uid = %device.uid, client_id = %crate::text::LoggedId(&device.client_id)))]
    pub async fn digest(&self, device: &Device, budget: usize) -> Result<pb::Digest, ImError> {
        self.commit_live_acks(device, None).await;
        let uid = device.uid.clone();
        let request = DigestRequest {
            device: device.clone(),
            fit: Box::new(move |states: &mut Vec<ConversationState>| fit(states, &uid, budget)),
        };
        let (reply, built) = oneshot::channel();
        if self.inner.digests.push(DigestJob { request, reply }) {
            // Its own task: a caller that goes away never strands the others' digests.
            let service = self.clone();
            self.inner
                .tasks
                .spawn(async move { service.build_digests().await });
        }
        let snapshot = built
            .await
            .map_err(|_| StoreError::Unavailable("the digest builder stopped".into()))??;
        self.note_skipped(&snapshot);
        self.metrics().digests.inc();
        tracing::debug!(version = snapshot.version, "digest built");
        let mut digest = digest_message(
            &snapshot.conversations,
            &device.uid,
            snapshot.version,
            now_ms(),
        );
        digest.pushers_gone = self.pushers_gone(device).await;
        Ok(digest)
    }

    /// The device's pushers that are gone since its last digest (so the app registers
    /// again); a store that cannot say leaves them for the next digest.
    async fn pushers_gone(&self, device: &Device) -> Vec<pb::PusherGone> {
        if !self.inner.push.enabled() {
            return Vec::new();
        }
        let taking = self
            .inner
            .store
            .take_pushers_gone(device, PUSHERS_GONE_PER_DIGEST);
        match self.metrics().store_call("take_pushers_gone", taking).await {
            Ok(gone) => gone
                .into_iter()
                .map(|gone| pb::PusherGone {
                    app_id: gone.app_id,
                    pushkey: gone.pushkey,
                    reason: gone.reason,
                })
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "pushers gone not read");
                Vec::new()
            }
        }
    }

    /// Logs and counts what backlog caps skipped in a digest just recorded.
    fn note_skipped(&self, snapshot: &DigestSnapshot) {
        for state in &snapshot.conversations {
            if let Some(skipped) = state.skipped {
                tracing::info!(
                    conversation = %state.conversation,
                    skipped = skipped.count,
                    cap = self.inner.settings.max_backlog,
                    "backlog cap passed: the oldest unacknowledged messages are skipped for this device"
                );
                self.metrics().backlog_skipped.inc_by(skipped.count);
            }
        }
    }

    /// Builds batches of waiting digests until none is left.
    async fn build_digests(self) {
        let queue = &self.inner.digests;
        let _builder = Builder(queue);
        let shape = DigestShape {
            last_n: self.inner.settings.digest_last_n,
            max_backlog: self.inner.settings.max_backlog,
        };
        while let Some(batch) = queue.next_batch() {
            self.metrics().digest_batch.observe(batch.len() as f64);
            let (requests, replies): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|job| (job.request, job.reply))
                .unzip();
            let built = self.inner.store.fitted_digests(&requests, shape);
            let results = self.metrics().store_batch("digest", built).await;
            for (reply, result) in replies.into_iter().zip(results) {
                // The device may have gone meanwhile; its digest stays recorded.
                let _ = reply.send(result);
            }
        }
    }
}

/// The `Digest` that `uid` gets for `states`.
fn digest_message(
    states: &[ConversationState],
    uid: &Uid,
    version: u64,
    server_time: i64,
) -> pb::Digest {
    let sessions = states
        .iter()
        .map(|state| {
            let session = pb::Session {
                count: state.count,
                last_msgs: state.last.iter().map(rehydrate).collect(),
                timestamp: state.last_time,
                max_seq: state.max_seq,
                acked_seq: state.acked_seq,
                read_seq: state.read_seq,
                peer_read_seq: state.peer_read_seq,
                unacked: state.unacked,
                missed: state.missed,
            };
            (state.conversation.name_for(uid), session)
        })
        .collect();
    pb::Digest {
        version,
        sessions,
        server_time,
        pushers_gone: Vec::new(),
    }
}

/// Keeps what fits `budget` bytes: previews go first, then the conversations with the
/// oldest news.
fn fit(states: &mut Vec<ConversationState>, uid: &Uid, budget: usize) {
    // The largest version and time, so that the real ones fit wherever these do.
    let encoded = |states: &[ConversationState]| {
        digest_message(states, uid, u64::MAX, i64::MAX).encoded_len()
    };
    if encoded(states) <= budget {
        return;
    }
    for state in states.iter_mut() {
        state.last.clear();
    }
    // Map entries add up independently: each conversation costs its own entry.
    let empty = encoded(&[]);
    let mut total = encoded(states);
    states.sort_by_key(|state| std::cmp::Reverse(state.last_time));
    while total > budget {
        let Some(oldest) = states.pop() else {
            return;
        };
        total -= encoded(std::slice::from_ref(&oldest)) - empty;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::testing::*;
    use crate::metrics::Metrics;
    use crate::store::{Conversation, EmbeddedStore, NewMessage, Store, StoredMessage};

    /// The value of a sample line `name value` in the metrics text.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    #[tokio::test]
    async fn devices_asking_at_once_get_their_digests_from_one_store_round() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::default();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("im.db"), 64).unwrap());
        let policy = Arc::new(crate::policy::LuaPolicy::load(config.policy.clone()).unwrap());
        let metrics = Arc::new(Metrics::default());
        let devices: Vec<Device> = (0..40)
            .map(|i| Device {
                uid: uid(&format!("user{i}")),
                client_id: "phone".into(),
            })
            .collect();
        for (i, device) in devices.iter().enumerate() {
            store.register_device(device).await.unwrap();
            let body = pb::ChatMessage::default().encode_to_vec();
            let message = NewMessage {
                conversation: Conversation::direct(&uid("sender"), &device.uid),
                sender: uid("sender"),
                sender_device: "laptop".into(),
                msg_id: format!("m{i}"),
                server_time: 1,
                body,
            };
            store.append(message).await.unwrap();
        }
        let store: Arc<dyn Store> = store;
        let im = ImService::new(
            store,
            policy,
            config.im.clone(),
            config.push.clone(),
            None,
            Arc::clone(&metrics),
        );
        let digests = devices.iter().map(|device| im.digest(device, usize::MAX));
        let digests = futures::future::join_all(digests).await;
        for (device, digest) in devices.iter().zip(digests) {
            let digest = digest.unwrap();
            assert_eq!(digest.sessions.len(), 1, "{}", device.uid);
            assert_eq!(digest.sessions["u/sender"].count, 1);
        }
        let text = metrics.render();
        let rounds = sample(&text, "mqtt_im_digest_batch_devices_count");
        assert!(rounds < 40.0, "{rounds} store rounds for 40 digests");
        assert_eq!(sample(&text, "mqtt_im_digest_batch_devices_sum"), 40.0);
        im.close().await;
    }

    fn state(peer: &str, last_time: i64) -> ConversationState {
        ConversationState {
            conversation: direct("me", peer),
            count: 1,
            unacked: 1,
            max_seq: 1,
            last_time,
            acked_seq: 0,
            read_seq: 0,
            peer_read_seq: 0,
            missed: 0,
            skipped: None,
            missed_total: 0,
            last: vec![StoredMessage {
                seq: 1,
                sender: uid(peer),
                server_time: last_time,
                body: pb::ChatMessage {
                    msg: Some(pb::Content {
                        kind: Some(pb::content::Kind::Text("x".repeat(500))),
                    }),
                    ..Default::default()
                }
                .encode_to_vec(),
            }],
        }
    }

    #[test]
    fn digests_drop_previews_then_old_conversations() {
        let mut states = vec![state("a", 1), state("b", 2)];
        fit(&mut states, &uid("me"), 2000);
        assert_eq!(states.len(), 2);
        assert!(states.iter().all(|s| s.last.len() == 1), "everything fits");
        fit(&mut states, &uid("me"), 100);
        assert_eq!(states.len(), 2);
        assert!(
            states.iter().all(|s| s.last.is_empty()),
            "previews go first"
        );
        let one = digest_message(&states[..1], &uid("me"), u64::MAX, i64::MAX).encoded_len();
        fit(&mut states, &uid("me"), one);
        let kept: Vec<String> = states.iter().map(|s| s.conversation.key()).collect();
        assert_eq!(kept, vec!["dm:b:me"], "the newest news stays");
        let exact = digest_message(&states, &uid("me"), u64::MAX, i64::MAX).encoded_len();
        assert!(exact <= one);
        fit(&mut states, &uid("me"), 5);
        assert!(states.is_empty());
    }
}
