//! The IM service's background work: writing acknowledged live deliveries, batched receipt
//! updates, applying the removal log and, with a cluster, heartbeats and incoming hand-overs.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ImService;

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
        let (inbox, mut handovers) = mpsc::channel(1024);
        let listener = self
            .inner
            .cluster
            .clone()
            .map(|bus| tokio::spawn(bus.listen(inbox, shutdown.clone())));
        let mut beat = tokio::time::interval(heartbeat);
        let settings = &self.inner.settings;
        let mut flush = tokio::time::interval(Duration::from_millis(settings.live_ack_flush_ms));
        let mut receipts =
            tokio::time::interval(Duration::from_millis(settings.receipt_interval_ms));
        let mut removals = tokio::time::interval(Duration::from_millis(settings.removal_poll_ms));
        // Only removals from now on matter: nobody is connected yet.
        let mut last_removal = 0;
        self.apply_removals(&mut last_removal).await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = beat.tick(), if self.inner.cluster.is_some() => self.heartbeat().await,
                _ = flush.tick() => self.flush_live_acks().await,
                Some(bytes) = handovers.recv() => self.deliver_handover(&bytes),
                _ = receipts.tick() => self.send_receipt_updates().await,
                _ = removals.tick() => self.apply_removals(&mut last_removal).await,
            }
        }
        self.flush_live_acks().await;
        self.send_receipt_updates().await;
        if let Some(listener) = listener {
            let _ = listener.await;
        }
        if let Some(sender) = sender {
            sender.abort();
        }
    }

    async fn heartbeat(&self) {
        if let Some(bus) = &self.inner.cluster {
            if let Err(e) = bus.heartbeat(&self.inner.presence.all()).await {
                tracing::warn!(error = %e, "cluster heartbeat failed");
            }
        }
    }
}
