//! The counter digest a device gets once per connection: per conversation with something
//! unacked, the badge increment, absolute cursors and the newest few messages — never the
//! backlog itself.

use prost::Message;

use super::inbox::{now_ms, rehydrate};
use super::{ImError, ImService};
use crate::store::{ConversationState, Device};
use crate::wire::pb;

impl ImService {
    /// Builds and records the next digest of `device`, within `budget` encoded bytes (what
    /// the client's Maximum Packet Size leaves for the payload): previews go first, then the
    /// conversations with the oldest news, and what is left out is not recorded, so the
    /// device's `ClearCounters` clears only what it was shown (the rest comes back in its
    /// next digest).
    ///
    /// # Errors
    /// The store failed.
    #[tracing::instrument(skip(self), fields(uid = %device.uid, client_id = %device.client_id))]
    pub async fn digest(&self, device: &Device, budget: usize) -> Result<pb::Digest, ImError> {
        let last_n = self.inner.settings.digest_last_n;
        self.commit_live_acks(device, None).await;
        let uid = device.uid.clone();
        let fit = move |states: &mut Vec<ConversationState>| fit(states, &uid, budget);
        let snapshot = self.inner.store.fitted_digest(device, last_n, &fit);
        let snapshot = self.metrics().store_call("digest", snapshot).await?;
        self.metrics().digests.inc();
        tracing::debug!(version = snapshot.version, "digest built");
        Ok(digest_message(
            &snapshot.conversations,
            &device.uid,
            snapshot.version,
            now_ms(),
        ))
    }
}

/// The `Digest` that `uid` gets for `states`.
fn digest_message(
    states: &[ConversationState],
    uid: &str,
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
            };
            (state.conversation.name_for(uid), session)
        })
        .collect();
    pb::Digest {
        version,
        sessions,
        server_time,
    }
}

/// Keeps what fits `budget` bytes: previews go first, then the conversations with the
/// oldest news.
fn fit(states: &mut Vec<ConversationState>, uid: &str, budget: usize) {
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
    use super::*;
    use crate::store::{Conversation, StoredMessage};

    fn state(peer: &str, last_time: i64) -> ConversationState {
        ConversationState {
            conversation: Conversation::direct("me", peer),
            count: 1,
            unacked: 1,
            max_seq: 1,
            last_time,
            acked_seq: 0,
            read_seq: 0,
            peer_read_seq: 0,
            last: vec![StoredMessage {
                seq: 1,
                sender: peer.into(),
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
        fit(&mut states, "me", 2000);
        assert_eq!(states.len(), 2);
        assert!(states.iter().all(|s| s.last.len() == 1), "everything fits");
        fit(&mut states, "me", 100);
        assert_eq!(states.len(), 2);
        assert!(
            states.iter().all(|s| s.last.is_empty()),
            "previews go first"
        );
        let one = digest_message(&states[..1], "me", u64::MAX, i64::MAX).encoded_len();
        fit(&mut states, "me", one);
        let kept: Vec<String> = states.iter().map(|s| s.conversation.key()).collect();
        assert_eq!(kept, vec!["dm:b:me"], "the newest news stays");
        let exact = digest_message(&states, "me", u64::MAX, i64::MAX).encoded_len();
        assert!(exact <= one);
        fit(&mut states, "me", 5);
        assert!(states.is_empty());
    }
}
