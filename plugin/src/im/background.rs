//! The IM service's background work: writing acknowledged live deliveries, batched receipt
//! updates, applying the removal and eviction logs, garbage collection, offline push and,
//! with a cluster, heartbeats and incoming hand-overs.
//! Each concern runs as its own task, so a slow backend delays only the work that needs it
//! (a Redis outage never holds up acknowledgement writes or removals, nor the reverse).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::ImService;
use crate::throttle::Throttle;

/// How often the push queue is read for notifications that came due.
const PUSH_POLL: Duration = Duration::from_millis(100);
/// How often the push queue is held to `push.max_pending`.
const PUSH_TRIM: Duration = Duration::from_secs(1);

/// Runs `work` every `period` (the first time at once) until `shutdown`, counting each round
/// in `rounds` once it is done; a round that takes longer than the period delays the next
/// instead of bunching them up.
async fn every<F, W>(period: Duration, rounds: Counter, shutdown: CancellationToken, mut work: W)
where
    W: FnMut() -> F,
    F: Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {
                work().await;
                rounds.inc();
            }
        }
    }
}

impl ImService {
    /// Background work until `shutdown`: writing acknowledged live deliveries, receipt
    /// updates, the removal log and, with a cluster, heartbeats and hand-overs both ways.
    /// Every task it starts has ended when it returns; [`ImService::close`] then writes what
    /// the last connections left.
    pub async fn run(self, heartbeat: Duration, shutdown: CancellationToken) {
        let settings = &self.inner.settings;
        let mut tasks = JoinSet::new();
        let handovers_out = self
            .inner
            .handovers_rx
            .lock()
            .ok()
            .and_then(|mut rx| rx.take());
        if let Some(queue) = handovers_out {
            tasks.spawn(self.clone().send_handovers(queue, shutdown.clone()));
        }
        let (inbox, handovers_in) = mpsc::channel(1024);
        if let Some(bus) = self.inner.cluster.clone() {
            tasks.spawn(bus.listen(inbox, shutdown.clone()));
            let (service, failures) = (self.clone(), Arc::new(Throttle::default()));
            tasks.spawn(every(
                heartbeat,
                self.rounds("heartbeat"),
                shutdown.clone(),
                move || {
                    let (service, failures) = (service.clone(), Arc::clone(&failures));
                    async move { service.heartbeat(&failures).await }
                },
            ));
        }
        tasks.spawn(
            self.clone()
                .deliver_handovers(handovers_in, shutdown.clone()),
        );
        let service = self.clone();
        let flush = settings.live_ack_flush.0;
        tasks.spawn(every(
            flush,
            self.rounds("live_acks"),
            shutdown.clone(),
            move || {
                let service = service.clone();
                async move { service.flush_live_acks().await }
            },
        ));
        let service = self.clone();
        let receipts = settings.receipt_interval.0;
        tasks.spawn(every(
            receipts,
            self.rounds("receipts"),
            shutdown.clone(),
            move || {
                let service = service.clone();
                async move { service.send_receipt_updates().await }
            },
        ));
        let (service, last_removal) = (self.clone(), Arc::new(AtomicU64::new(0)));
        let removals = settings.removal_poll.0;
        tasks.spawn(every(
            removals,
            self.rounds("removals"),
            shutdown.clone(),
            move || {
                let (service, last_removal) = (service.clone(), Arc::clone(&last_removal));
                async move { service.apply_removals(&last_removal).await }
            },
        ));
        let (service, last_eviction) = (self.clone(), Arc::new(AtomicU64::new(0)));
        let primed = Arc::new(AtomicBool::new(false));
        tasks.spawn(every(
            removals,
            self.rounds("evictions"),
            shutdown.clone(),
            move || {
                let (service, last, primed) = (
                    service.clone(),
                    Arc::clone(&last_eviction),
                    Arc::clone(&primed),
                );
                async move { service.apply_evictions(&last, &primed).await }
            },
        ));
        if self.inner.push.enabled() {
            let service = self.clone();
            let gateways = Arc::new(crate::push::gateway::Gateways::new(
                self.inner.push.timeout.0,
            ));
            let failures = Arc::new(Throttle::default());
            tasks.spawn(every(
                PUSH_POLL,
                self.rounds("push"),
                shutdown.clone(),
                move || {
                    let (service, gateways) = (service.clone(), Arc::clone(&gateways));
                    let failures = Arc::clone(&failures);
                    async move { service.push_round(&gateways, &failures).await }
                },
            ));
            let service = self.clone();
            tasks.spawn(every(
                PUSH_TRIM,
                self.rounds("push_trim"),
                shutdown.clone(),
                move || {
                    let service = service.clone();
                    async move { service.trim_pushes().await }
                },
            ));
        }
        let service = self.clone();
        let stop = shutdown.clone();
        tasks.spawn(every(
            settings.gc_interval.0,
            self.rounds("gc"),
            shutdown.clone(),
            move || {
                let (service, stop) = (service.clone(), stop.clone());
                async move { service.garbage_round(&stop).await }
            },
        ));
        while tasks.join_next().await.is_some() {}
    }

    /// The counter of `task`'s finished rounds.
    fn rounds(&self, task: &'static str) -> Counter {
        self.metrics().rounds(task)
    }

    /// Once every connection has ended: writes the live deliveries they acknowledged last,
    /// sends the last receipt updates, and waits for the cluster joins and leaves they
    /// started (each bounded by the Redis call deadline).
    pub async fn close(&self) {
        self.flush_live_acks().await;
        self.send_receipt_updates().await;
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::config::Config;
    use crate::domain::testing::*;
    use crate::store::{Device, EmbeddedStore};

    /// Counts the rounds of an `every` loop.
    fn counting(rounds: &Arc<AtomicU64>) -> impl FnMut() -> std::future::Ready<()> {
        let rounds = Arc::clone(rounds);
        move || {
            rounds.fetch_add(1, Ordering::SeqCst);
            std::future::ready(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rounds_run_at_once_then_each_period_without_bunching_until_shutdown() {
        let rounds = Arc::new(AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let period = Duration::from_secs(10);
        let counted = Counter::default();
        let task = tokio::spawn(every(
            period,
            counted.clone(),
            shutdown.clone(),
            counting(&rounds),
        ));
        tokio::task::yield_now().await;
        assert_eq!(rounds.load(Ordering::SeqCst), 1, "the first round at once");
        tokio::time::advance(period).await;
        tokio::task::yield_now().await;
        assert_eq!(rounds.load(Ordering::SeqCst), 2);
        // Rounds missed while the runtime was busy are not made up in a burst.
        tokio::time::advance(period * 5 / 2).await;
        tokio::task::yield_now().await;
        assert_eq!(rounds.load(Ordering::SeqCst), 3);
        shutdown.cancel();
        task.await.unwrap();
        tokio::time::advance(period * 10).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 3, "nothing after shutdown");
        assert_eq!(counted.get(), 3, "each finished round counted");
    }

    #[tokio::test]
    async fn run_ends_at_shutdown_and_close_writes_what_connections_acked_last() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::default();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("im.db"), 64).unwrap());
        let policy = Arc::new(crate::policy::LuaPolicy::load(config.policy.clone()).unwrap());
        let metrics = Arc::default();
        let service = ImService::new(
            store,
            policy,
            config.im.clone(),
            config.push.clone(),
            None,
            metrics,
        );
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(
            service
                .clone()
                .run(Duration::from_secs(1), shutdown.clone()),
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .unwrap()
            .unwrap();
        // A connection that ends after the background work stopped still acknowledges.
        let device = Device {
            uid: uid("bob"),
            client_id: "phone".into(),
        };
        let chat = direct("alice", "bob");
        service.delivered(&device, &chat, 1);
        service.close().await;
        assert!(service.inner.live_acks.of_device(&device, None).is_empty());
    }
}
