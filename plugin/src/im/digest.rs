//! The counter digest a device gets once per connection: per conversation with something
//! unacked, the badge increment, absolute cursors and the newest few messages — never the
//! backlog itself.

use super::inbox::rehydrate;
use super::{conversation_name, ImError, ImService};
use crate::store::Device;
use crate::wire::pb;

impl ImService {
    /// Builds and records the next digest of `device`.
    ///
    /// # Errors
    /// The store failed.
    #[tracing::instrument(skip(self), fields(uid = %device.uid, client_id = %device.client_id))]
    pub async fn digest(&self, device: &Device) -> Result<pb::Digest, ImError> {
        let last_n = self.inner.settings.digest_last_n;
        self.commit_live_acks(device, None).await;
        let snapshot = self.inner.store.digest(device, last_n);
        let snapshot = self.metrics().store_call("digest", snapshot).await?;
        self.metrics().digests.inc();
        let sessions = snapshot
            .conversations
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
                (conversation_name(&state.conversation, &device.uid), session)
            })
            .collect();
        tracing::debug!(version = snapshot.version, "digest built");
        Ok(pb::Digest {
            version: snapshot.version,
            sessions,
            server_time: super::inbox::now_ms(),
        })
    }
}
