//! A deadline on every call of a store whose server can stall (PostgreSQL): a call that gets
//! no answer in time fails as unavailable, like an outage, so a client hears within the
//! deadline instead of when the kernel gives up on a dead link. An append abandoned this way
//! may still commit; its retransmission is then recognized as a duplicate.

use crate::domain::Uid;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Collected, Conversation, Cutoffs, Device, DeviceInfo, DigestFit, DigestShape, DigestSnapshot,
    Erased, Eviction, GroupErasure, Member, NewMessage, OnCommit, Page, PushDue, PushTiming,
    Pusher, PusherGone, PusherSaved, QueuedAppend, Receipt, Removal, Retained, Role, SeqRange,
    Store, StoreError, StoreSizes,
};

/// A call that went unanswered.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0} ms")]
pub(crate) struct TimedOut(pub(crate) u128);

/// A call that went unanswered within `limit`, as the store reports it: an outage.
pub(crate) fn timed_out(limit: Duration) -> StoreError {
    StoreError::Unavailable(Box::new(TimedOut(limit.as_millis())))
}

tokio::task_local! {
    /// Set for the call [`bounded`] runs: true once that call was abandoned at its deadline.
    static ABANDONED: Arc<AtomicBool>;
}

/// The abandonment flag of the bounded call running now, if any: a backend connection used
/// by an abandoned call may be mid-exchange with a stalled server and must not be reused.
pub(crate) fn abandonment() -> Option<Arc<AtomicBool>> {
    ABANDONED.try_with(Arc::clone).ok()
}

/// Runs `call`, failing as unavailable once `limit` has passed; what the call held is
/// dropped after its flag says it was abandoned.
pub(crate) async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let abandoned = Arc::new(AtomicBool::new(false));
    let call = ABANDONED.scope(Arc::clone(&abandoned), call);
    tokio::pin!(call);
    match tokio::time::timeout(limit, call.as_mut()).await {
        Ok(result) => result,
        Err(_) => {
            abandoned.store(true, Ordering::Relaxed);
            Err(timed_out(limit))
        }
    }
}

/// `inner` with a deadline on every call.
#[derive(Debug)]
pub struct Bounded {
    inner: Arc<dyn Store>,
    limit: Duration,
}

impl Bounded {
    /// Wraps `inner`; each call fails after `limit`.
    pub fn new(inner: Arc<dyn Store>, limit: Duration) -> Self {
        Self { inner, limit }
    }

    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        bounded(self.limit, call).await
    }
}

#[async_trait]
impl Store for Bounded {
    async fn queue_append(
        &self,
        message: NewMessage,
        on_commit: Option<OnCommit>,
    ) -> Result<QueuedAppend, StoreError> {
        let queued = self
            .call(self.inner.queue_append(message, on_commit))
            .await?;
        Ok(queued.within(self.limit))
    }

    async fn register_device(&self, device: &Device) -> Result<(), StoreError> {
        self.call(self.inner.register_device(device)).await
    }

    async fn fitted_digest(
        &self,
        device: &Device,
        shape: DigestShape,
        fit: &DigestFit,
    ) -> Result<DigestSnapshot, StoreError> {
        self.call(self.inner.fitted_digest(device, shape, fit))
            .await
    }

    async fn clear_counters(&self, device: &Device, version: u64) -> Result<(), StoreError> {
        self.call(self.inner.clear_counters(device, version)).await
    }

    async fn pull(
        &self,
        device: &Device,
        conversation: &Conversation,
        ack: Option<SeqRange>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.call(self.inner.pull(device, conversation, ack, limit))
            .await
    }

    async fn ack(
        &self,
        device: &Device,
        conversation: &Conversation,
        range: SeqRange,
    ) -> Result<u64, StoreError> {
        self.call(self.inner.ack(device, conversation, range)).await
    }

    async fn history(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.call(self.inner.history(conversation, before, limit))
            .await
    }

    async fn mark_read(
        &self,
        uid: &Uid,
        conversation: &Conversation,
        seq: u64,
    ) -> Result<(u64, u64), StoreError> {
        self.call(self.inner.mark_read(uid, conversation, seq))
            .await
    }

    async fn create_group(
        &self,
        conversation: &Conversation,
        owner: &Uid,
        members: &[Uid],
    ) -> Result<(), StoreError> {
        self.call(self.inner.create_group(conversation, owner, members))
            .await
    }

    async fn add_members(
        &self,
        conversation: &Conversation,
        uids: &[Uid],
        role: Role,
    ) -> Result<Vec<Uid>, StoreError> {
        self.call(self.inner.add_members(conversation, uids, role))
            .await
    }

    async fn remove_members(
        &self,
        conversation: &Conversation,
        uids: &[Uid],
    ) -> Result<Vec<Uid>, StoreError> {
        self.call(self.inner.remove_members(conversation, uids))
            .await
    }

    async fn members(&self, conversation: &Conversation) -> Result<Vec<Member>, StoreError> {
        self.call(self.inner.members(conversation)).await
    }

    async fn role(
        &self,
        uid: &Uid,
        conversation: &Conversation,
    ) -> Result<Option<Role>, StoreError> {
        self.call(self.inner.role(uid, conversation)).await
    }

    async fn group_memberships(&self, uid: &Uid) -> Result<Vec<(Conversation, Role)>, StoreError> {
        self.call(self.inner.group_memberships(uid)).await
    }

    async fn receipts(
        &self,
        conversation: &Conversation,
        seqs: &[u64],
        max_readers: usize,
    ) -> Result<Vec<Receipt>, StoreError> {
        self.call(self.inner.receipts(conversation, seqs, max_readers))
            .await
    }

    async fn senders(
        &self,
        conversation: &Conversation,
        range: SeqRange,
    ) -> Result<Vec<Uid>, StoreError> {
        self.call(self.inner.senders(conversation, range)).await
    }

    async fn removals_since(&self, after: u64, limit: usize) -> Result<Vec<Removal>, StoreError> {
        self.call(self.inner.removals_since(after, limit)).await
    }

    async fn sizes(&self) -> Result<StoreSizes, StoreError> {
        self.call(self.inner.sizes()).await
    }

    async fn collect_garbage(
        &self,
        cutoffs: Cutoffs,
        batch: usize,
    ) -> Result<Collected, StoreError> {
        self.call(self.inner.collect_garbage(cutoffs, batch)).await
    }

    async fn touch_devices(&self, devices: &[Device], now_ms: i64) -> Result<(), StoreError> {
        self.call(self.inner.touch_devices(devices, now_ms)).await
    }

    async fn devices(&self, uid: &Uid) -> Result<Vec<DeviceInfo>, StoreError> {
        self.call(self.inner.devices(uid)).await
    }

    async fn forget_device(&self, device: &Device) -> Result<bool, StoreError> {
        self.call(self.inner.forget_device(device)).await
    }

    async fn evict(&self, uid: &Uid, client_id: Option<&str>) -> Result<(), StoreError> {
        self.call(self.inner.evict(uid, client_id)).await
    }

    async fn evictions_since(&self, after: u64, limit: usize) -> Result<Vec<Eviction>, StoreError> {
        self.call(self.inner.evictions_since(after, limit)).await
    }

    /// Not bounded: erasing a prolific user takes as long as it takes, and an operator
    /// waits for it.
    async fn erase_user(&self, uid: &Uid, groups: GroupErasure) -> Result<Erased, StoreError> {
        self.inner.erase_user(uid, groups).await
    }

    async fn put_retained(&self, topic: &str, message: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.call(self.inner.put_retained(topic, message)).await
    }

    async fn retained(&self) -> Result<Vec<Retained>, StoreError> {
        self.call(self.inner.retained()).await
    }

    async fn set_pusher(
        &self,
        pusher: &Pusher,
        per_device: usize,
    ) -> Result<PusherSaved, StoreError> {
        self.call(self.inner.set_pusher(pusher, per_device)).await
    }

    async fn remove_pusher(
        &self,
        uid: &Uid,
        app_id: &str,
        pushkey: &str,
        reason: &str,
    ) -> Result<Option<Pusher>, StoreError> {
        self.call(self.inner.remove_pusher(uid, app_id, pushkey, reason))
            .await
    }

    async fn take_pushers_gone(
        &self,
        device: &Device,
        limit: usize,
    ) -> Result<Vec<PusherGone>, StoreError> {
        self.call(self.inner.take_pushers_gone(device, limit)).await
    }

    async fn pushers(&self, uid: &Uid) -> Result<Vec<Pusher>, StoreError> {
        self.call(self.inner.pushers(uid)).await
    }

    async fn claim_pushes(
        &self,
        node: &str,
        timing: PushTiming,
        limit: usize,
    ) -> Result<Vec<PushDue>, StoreError> {
        self.call(self.inner.claim_pushes(node, timing, limit))
            .await
    }

    async fn push_done(&self, due: &PushDue, now_ms: i64, sent: bool) -> Result<(), StoreError> {
        self.call(self.inner.push_done(due, now_ms, sent)).await
    }

    async fn push_failed(&self, due: &PushDue, retry_at_ms: i64) -> Result<(), StoreError> {
        self.call(self.inner.push_failed(due, retry_at_ms)).await
    }

    async fn push_handled(
        &self,
        uid: &Uid,
        read: Option<(&Conversation, u64)>,
    ) -> Result<(), StoreError> {
        self.call(self.inner.push_handled(uid, read)).await
    }

    async fn trim_push_queue(&self, keep: usize, now_ms: i64) -> Result<u64, StoreError> {
        self.call(self.inner.trim_push_queue(keep, now_ms)).await
    }

    async fn unread_total(&self, uid: &Uid) -> Result<u64, StoreError> {
        self.call(self.inner.unread_total(uid)).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}
