//! Keeping storage bounded from the service's side: running retention and device expiry in
//! bounded steps, keeping connected devices from expiring, and closing the connections that
//! an operator's `device forget` or `user erase` (on any node) evicted.

use crate::domain::Uid;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

use super::settings::Settings as ImSettings;
use super::sink::DeviceEvent;
use super::{ImError, ImService};
use crate::metrics::{GcLabels, Metrics};
use crate::store::{now_ms, Collected, Cutoffs, Device, Store, StoreError};
use crate::text::LoggedId;
use crate::wire::pb;

/// Longest client id a `DeviceForget` may name (MQTT's own limit is a 16-bit length).
const MAX_CLIENT_ID_BYTES: usize = 65_535;

/// How long removal and eviction log entries are kept: every node reads them within
/// `im.removal_poll`.
const LOG_TTL_MS: i64 = 24 * 3600 * 1000;

/// Evictions read per store call.
const EVICTIONS_PER_POLL: usize = 256;

/// Where retention and device expiry cut at `now_ms`, from the settings.
pub fn cutoffs(settings: &ImSettings, now_ms: i64) -> Cutoffs {
    let before = |period: crate::settings::Period| {
        period
            .get()
            .map(|age| now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX)))
    };
    Cutoffs {
        direct: before(settings.retention.direct),
        group: before(settings.retention.group),
        devices: before(settings.device_ttl),
        logs: Some(now_ms.saturating_sub(LOG_TTL_MS)),
    }
}

/// Runs garbage-collection steps of `batch` rows until nothing is due (or `stop`), counting
/// each in `metrics`; returns the total.
///
/// # Errors
/// A step failed; what earlier steps deleted stays deleted.
pub async fn collect_garbage(
    store: &dyn Store,
    cutoffs: Cutoffs,
    batch: usize,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<Collected, StoreError> {
    let mut total = Collected::default();
    loop {
        let step = store.collect_garbage(cutoffs, batch).await?;
        let deleted = |what| metrics.gc_deleted.get_or_create(&GcLabels { what });
        deleted("messages").inc_by(step.messages);
        deleted("devices").inc_by(step.devices);
        let behind_s = if step.more { step.behind_ms / 1000 } else { 0 };
        metrics.gc_lag.set(behind_s);
        total = Collected {
            // Only the last step says whether more is due.
            more: step.more,
            ..total.plus(step)
        };
        if !step.more || stop.is_cancelled() {
            return Ok(total);
        }
    }
}

impl ImService {
    /// One garbage-collection round: with device expiry on, the devices connected here are
    /// marked as seen (so they never expire while connected); then retention and expiry run
    /// until caught up.
    pub(super) async fn garbage_round(&self, stop: &CancellationToken) {
        let settings = &self.inner.settings;
        let store = self.inner.store.as_ref();
        let now = now_ms();
        if settings.device_ttl.get().is_some() {
            let online: Vec<Device> = self.inner.presence.all();
            if let Err(e) = store.touch_devices(&online, now).await {
                // Expiry would take connected devices: skip the round.
                tracing::warn!(error = %e, "garbage collection skipped: connected devices could not be marked");
                return;
            }
        }
        let cutoffs = cutoffs(settings, now);
        match collect_garbage(store, cutoffs, settings.gc_batch, self.metrics(), stop).await {
            Ok(done) if done.messages + done.devices > 0 => tracing::info!(
                messages = done.messages,
                devices = done.devices,
                "garbage collection: deleted what retention and device expiry no longer keep"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "garbage collection failed; next round retries"),
        }
    }

    /// Closes this node's connections that evictions logged after `cursor` name, and
    /// advances `cursor`. Until `primed`, a call only finds the end of the log: evictions
    /// made before this node started have no connection here to close.
    pub(super) async fn apply_evictions(&self, cursor: &AtomicU64, primed: &AtomicBool) {
        let skip = !primed.load(Ordering::Relaxed);
        let mut last = cursor.load(Ordering::Relaxed);
        loop {
            let evictions = match self
                .inner
                .store
                .evictions_since(last, EVICTIONS_PER_POLL)
                .await
            {
                Ok(evictions) => evictions,
                Err(e) => {
                    tracing::debug!(error = %e, "eviction log not readable now");
                    cursor.store(last, Ordering::Relaxed);
                    return;
                }
            };
            for eviction in &evictions {
                if !skip {
                    self.evict_here(&eviction.uid, eviction.client_id.as_deref());
                }
                last = eviction.id;
            }
            if evictions.len() < EVICTIONS_PER_POLL {
                break;
            }
        }
        cursor.store(last, Ordering::Relaxed);
        primed.store(true, Ordering::Relaxed);
    }

    /// `DeviceForget`: one of the user's own devices loses its offline state and its
    /// connections (here at once, on other nodes through the eviction log).
    pub(super) async fn forget_device(
        &self,
        uid: &Uid,
        forget: pb::DeviceForget,
    ) -> Result<pb::response::Result, ImError> {
        if forget.client_id.is_empty() || forget.client_id.len() > MAX_CLIENT_ID_BYTES {
            return Err(ImError::Invalid(format!(
                "client_id must be 1 to {MAX_CLIENT_ID_BYTES} bytes"
            )));
        }
        let device = Device {
            uid: uid.clone(),
            client_id: forget.client_id,
        };
        let known = self
            .metrics()
            .store_call("forget_device", self.inner.store.forget_device(&device))
            .await?;
        if !known {
            return Err(ImError::NotFound("no such device of this user".into()));
        }
        tracing::info!(
            client_id = %LoggedId(&device.client_id),
            "device forgotten at its user's request"
        );
        self.evict_here(uid, Some(&device.client_id));
        Ok(pb::response::Result::Forgotten(pb::Forgotten {
            client_id: device.client_id,
        }))
    }

    /// Closes the connections of `uid` (of one device, with `client_id`) on this node.
    fn evict_here(&self, uid: &Uid, client_id: Option<&str>) {
        let presence = &self.inner.presence;
        let sinks = match client_id {
            Some(client_id) => presence.device_sinks(&Device {
                uid: uid.to_owned(),
                client_id: client_id.to_owned(),
            }),
            None => presence.sinks(uid),
        };
        if !sinks.is_empty() {
            let device = LoggedId(client_id.unwrap_or("(every device)"));
            tracing::info!(%uid, client_id = %device, connections = sinks.len(), "closing evicted connections");
        }
        for sink in sinks {
            sink.push(DeviceEvent::Evicted);
        }
    }
}
