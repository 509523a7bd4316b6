//! The IM service's background work: writing acknowledged live deliveries, batched receipt
//! updates, applying the removal log and, with a cluster, heartbeats and incoming hand-overs.
//! Each concern runs as its own task, so a slow backend delays only the work that needs it
//! (a Redis outage never holds up acknowledgement writes or removals, nor the reverse).

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::ImService;
use crate::throttle::Throttle;

/// Runs `work` every `period` (the first time at once) until `shutdown`; a round that takes
/// longer than the period delays the next instead of bunching them up.
async fn every<F, W>(period: Duration, shutdown: CancellationToken, mut work: W)
where
    W: FnMut() -> F,
    F: Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => work().await,
        }
    }
}

impl ImService {
    /// Background work until `shutdown`: writing acknowledged live deliveries and, with a
    /// cluster, heartbeats and incoming hand-overs. Flushes what is pending before returning.
    pub async fn run(self, heartbeat: Duration, shutdown: CancellationToken) {
        let sender = self
            .inner
            .handovers_rx
            .lock()
            .ok()
            .and_then(|mut rx| rx.take())
            .map(|rx| tokio::spawn(self.clone().send_handovers(rx)));
        let (inbox, handovers) = mpsc::channel(1024);
        let listener = self
            .inner
            .cluster
            .clone()
            .map(|bus| tokio::spawn(bus.listen(inbox, shutdown.clone())));
        let settings = &self.inner.settings;
        let mut tasks = JoinSet::new();
        if self.inner.cluster.is_some() {
            let (service, failures) = (self.clone(), Arc::new(Throttle::default()));
            tasks.spawn(every(heartbeat, shutdown.clone(), move || {
                let (service, failures) = (service.clone(), Arc::clone(&failures));
                async move { service.heartbeat(&failures).await }
            }));
        }
        tasks.spawn(self.clone().deliver_handovers(handovers, shutdown.clone()));
        let service = self.clone();
        let flush = Duration::from_millis(settings.live_ack_flush_ms);
        tasks.spawn(every(flush, shutdown.clone(), move || {
            let service = service.clone();
            async move { service.flush_live_acks().await }
        }));
        let service = self.clone();
        let receipts = Duration::from_millis(settings.receipt_interval_ms);
        tasks.spawn(every(receipts, shutdown.clone(), move || {
            let service = service.clone();
            async move { service.send_receipt_updates().await }
        }));
        let (service, last_removal) = (self.clone(), Arc::new(AtomicU64::new(0)));
        let removals = Duration::from_millis(settings.removal_poll_ms);
        tasks.spawn(every(removals, shutdown.clone(), move || {
            let (service, last_removal) = (service.clone(), Arc::clone(&last_removal));
            async move { service.apply_removals(&last_removal).await }
        }));
        while tasks.join_next().await.is_some() {}
        self.flush_live_acks().await;
        self.send_receipt_updates().await;
        if let Some(listener) = listener {
            let _ = listener.await;
        }
        if let Some(sender) = sender {
            sender.abort();
        }
    }

    /// Delivers what other nodes hand over to this node's devices (local work only).
    async fn deliver_handovers(
        self,
        mut handovers: mpsc::Receiver<Vec<u8>>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                handover = handovers.recv() => match handover {
                    Some(bytes) => self.deliver_handover(&bytes),
                    None => return,
                },
            }
        }
    }

    /// Keeps this node's liveness and presence in Redis; while that fails the node serves
    /// its own clients alone (degraded: `mqtt_im_redis_up` 0, one log line per interval).
    async fn heartbeat(&self, failures: &Throttle) {
        let Some(bus) = &self.inner.cluster else {
            return;
        };
        let up = &self.metrics().redis_up;
        match bus.heartbeat(&self.inner.presence.all()).await {
            Ok(()) => {
                if up.set(1) == 0 {
                    tracing::info!("redis reachable: this node is part of the cluster");
                }
            }
            Err(e) => {
                up.set(0);
                if let Some(also) = failures.admit() {
                    tracing::warn!(error = %e, also_since_last = also, "cluster heartbeat failed: serving this node's clients alone");
                }
            }
        }
    }

    /// Whether this node reaches the cluster (`None` without one).
    pub fn cluster_up(&self) -> Option<bool> {
        self.inner
            .cluster
            .as_ref()
            .map(|_| self.metrics().redis_up.get() == 1)
    }
}
