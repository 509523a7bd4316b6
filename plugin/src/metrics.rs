//! What an operator watches, as Prometheus metrics: one registry per server (so several
//! servers in one process, as in the tests, never mix their figures). Every name starts with
//! `mqtt_im_`; the README lists them.

use std::collections::BTreeMap;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// A public listener and the MQTT version of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ConnectionLabels {
    pub(crate) listener: &'static str,
    pub(crate) protocol: &'static str,
}

/// `direct` or `group`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ChatLabels {
    pub(crate) chat: &'static str,
}

/// Why an IM publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub(crate) reason: &'static str,
}

/// What a topic ACL refused: `publish`, `subscribe`, `deliver` or `will`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct AclLabels {
    pub(crate) action: &'static str,
}

/// Which limit held a client back: `rate`, `bytes`, `devices` or `connections`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct LimitLabels {
    pub(crate) limit: &'static str,
}

/// Why a publish did not go to a subscriber: `too_large` (over its Maximum Packet Size).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct UndeliveredLabels {
    pub(crate) reason: &'static str,
}

/// A policy hook and what it decided.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct VerdictLabels {
    pub(crate) hook: &'static str,
    pub(crate) verdict: &'static str,
}

/// A hook (its name) and the point at which a call of it failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct HookFailureLabels {
    pub(crate) hook: String,
    pub(crate) point: &'static str,
}

/// A policy script (its file name) and what went wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct PolicyErrorLabels {
    pub(crate) script: String,
    pub(crate) kind: &'static str,
}

/// A store operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct OperationLabels {
    pub(crate) op: &'static str,
}

/// What garbage collection deleted: `messages` or `devices`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct GcLabels {
    pub(crate) what: &'static str,
}

/// What became of an owed notification: `sent`, `retried` (a gateway failed; tried
/// again later), `failed` (a gateway refused it for good), `skipped` (a device of the user
/// was online, no pusher is left, or the policy skipped it), `dropped` (beyond
/// `push.max_pending`) or `rejected` (pushkeys a gateway rejected, removed).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct PushLabels {
    pub(crate) outcome: &'static str,
}

/// A background task of the IM service: `live_acks`, `receipts`, `removals`, `evictions`,
/// `gc`, `push`, `push_trim` or `heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct TaskLabels {
    pub(crate) task: &'static str,
}

/// How a session move went.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct MoveLabels {
    pub(crate) outcome: &'static str,
}

/// Files re-read while running (`policy`, `password_file`, `acl_file`, `jwks_file`) and
/// how it went: `loaded`, or `kept` (the new version failed; the last good one stays).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ReloadLabels {
    pub(crate) file: &'static str,
    pub(crate) result: &'static str,
}

/// Why a publish for another node did not get there: `queue_full`, `redis`, `no_listener`,
/// `inject_queue_full` or `injector`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ForwardFailureLabels {
    pub(crate) reason: &'static str,
}

/// `sent` or `received`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub(crate) direction: &'static str,
}

/// Values of the `listener` and `protocol` labels.
const LISTENERS: [&str; 4] = ["mqtt", "tls", "ws", "wss"];
const PROTOCOLS: [&str; 2] = ["3.1.1", "5"];

type StoreHistograms = Family<OperationLabels, Histogram, fn() -> Histogram>;

/// The server's metrics. Cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) connections: Family<ConnectionLabels, Gauge>,
    pub(crate) connects: Family<ConnectionLabels, Counter>,
    pub(crate) messages_received: Family<ChatLabels, Counter>,
    pub(crate) messages_stored: Family<ChatLabels, Counter>,
    pub(crate) messages_duplicate: Counter,
    pub(crate) messages_refused: Family<RefusalLabels, Counter>,
    pub(crate) auth_failures: Family<RefusalLabels, Counter>,
    pub(crate) acl_denied: Family<AclLabels, Counter>,
    pub(crate) limited: Family<LimitLabels, Counter>,
    pub(crate) undelivered: Family<UndeliveredLabels, Counter>,
    pub(crate) sessions_expired: Counter,
    pub(crate) delivered_live: Counter,
    pub(crate) counted_offline: Counter,
    pub(crate) digests: Counter,
    pub(crate) digest_batch: Histogram,
    pub(crate) pulls: Counter,
    pub(crate) pull_page: Histogram,
    pub(crate) verdicts: Family<VerdictLabels, Counter>,
    pub(crate) policy_errors: Family<PolicyErrorLabels, Counter>,
    pub(crate) hook_failures: Family<HookFailureLabels, Counter>,
    pub(crate) store_seconds: StoreHistograms,
    pub(crate) store_errors: Family<OperationLabels, Counter>,
    pub(crate) redis_errors: Counter,
    pub(crate) handovers: Family<DirectionLabels, Counter>,
    pub(crate) handovers_failed: Counter,
    pub(crate) redis_up: Gauge,
    pub(crate) online_users: Gauge,
    pub(crate) online_devices: Gauge,
    pub(crate) upstream_links: Gauge,
    pub(crate) backlog_skipped: Counter,
    pub(crate) gc_deleted: Family<GcLabels, Counter>,
    pub(crate) gc_lag: Gauge,
    pub(crate) pushes: Family<PushLabels, Counter>,
    pub(crate) push_gateway_seconds: Histogram,
    pub(crate) background_rounds: Family<TaskLabels, Counter>,
    pub(crate) reloads: Family<ReloadLabels, Counter>,
    pub(crate) forwards_sent: Counter,
    pub(crate) forwards_received: Counter,
    pub(crate) forwards_injected: Counter,
    pub(crate) forwards_failed: Family<ForwardFailureLabels, Counter>,
    pub(crate) cluster_routes_local: Gauge,
    pub(crate) cluster_routes_remote: Gauge,
    pub(crate) retained_writes_failed: Counter,
    pub(crate) shared_undelivered: Counter,
    pub(crate) session_moves: Family<MoveLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let page_buckets = [0.0, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0];
        let store_seconds: StoreHistograms = Family::new_with_constructor(|| {
            // 100 µs .. ~13 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        let mut metrics = Self {
            registry: Registry::with_prefix("mqtt_im"),
            connections: Family::default(),
            connects: Family::default(),
            messages_received: Family::default(),
            messages_stored: Family::default(),
            messages_duplicate: Counter::default(),
            messages_refused: Family::default(),
            auth_failures: Family::default(),
            acl_denied: Family::default(),
            limited: Family::default(),
            undelivered: Family::default(),
            sessions_expired: Counter::default(),
            delivered_live: Counter::default(),
            counted_offline: Counter::default(),
            digests: Counter::default(),
            digest_batch: Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]),
            pulls: Counter::default(),
            pull_page: Histogram::new(page_buckets),
            verdicts: Family::default(),
            policy_errors: Family::default(),
            hook_failures: Family::default(),
            store_seconds,
            store_errors: Family::default(),
            redis_errors: Counter::default(),
            handovers: Family::default(),
            handovers_failed: Counter::default(),
            redis_up: Gauge::default(),
            online_users: Gauge::default(),
            online_devices: Gauge::default(),
            upstream_links: Gauge::default(),
            backlog_skipped: Counter::default(),
            gc_deleted: Family::default(),
            gc_lag: Gauge::default(),
            pushes: Family::default(),
            // 1 ms .. ~16 s.
            push_gateway_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            background_rounds: Family::default(),
            reloads: Family::default(),
            forwards_sent: Counter::default(),
            forwards_received: Counter::default(),
            forwards_injected: Counter::default(),
            forwards_failed: Family::default(),
            cluster_routes_local: Gauge::default(),
            cluster_routes_remote: Gauge::default(),
            retained_writes_failed: Counter::default(),
            shared_undelivered: Counter::default(),
            session_moves: Family::default(),
        };
        metrics.register();
        metrics
    }
}

impl Metrics {
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "connections",
            "Open client connections by listener and MQTT version",
            self.connections.clone(),
        );
        r.register(
            "connects",
            "Accepted CONNECTs by listener and MQTT version",
            self.connects.clone(),
        );
        r.register(
            "messages_received",
            "Chat publishes received on IM topics, before any check",
            self.messages_received.clone(),
        );
        r.register(
            "messages_stored",
            "New chat messages stored (PUBACKed after commit)",
            self.messages_stored.clone(),
        );
        r.register(
            "messages_duplicate",
            "Retransmits of an already stored msg_id (acknowledged, not stored again)",
            self.messages_duplicate.clone(),
        );
        r.register(
            "messages_refused",
            "Chat publishes refused: invalid, denied by policy, not authorized, store failed",
            self.messages_refused.clone(),
        );
        r.register(
            "auth_failures",
            "Refused CONNECTs by reason (bad_credentials, not_authorized, unavailable)",
            self.auth_failures.clone(),
        );
        r.register(
            "acl_denied",
            "Non-IM topic actions refused by the ACL file (publish, subscribe, deliver, will)",
            self.acl_denied.clone(),
        );
        r.register(
            "limited",
            "Clients held back by a limit: rate, bytes (publishes slowed or refused), devices, connections (refused)",
            self.limited.clone(),
        );
        r.register(
            "publishes_undelivered",
            "Pass-through publishes a subscriber did not get: too_large (over its Maximum Packet Size)",
            self.undelivered.clone(),
        );
        r.register(
            "sessions_expired",
            "MQTT 5 sessions ended by their Session Expiry Interval while their client stayed away",
            self.sessions_expired.clone(),
        );
        r.register(
            "deliveries_live",
            "Chat messages pushed live to a device connection on this node",
            self.delivered_live.clone(),
        );
        r.register(
            "messages_offline",
            "Direct messages stored while no device of the receiver was online anywhere",
            self.counted_offline.clone(),
        );
        r.register(
            "digests_sent",
            "Counter digests sent to devices",
            self.digests.clone(),
        );
        r.register(
            "digest_batch_devices",
            "Devices whose digests one store round built (reconnect storms batch)",
            self.digest_batch.clone(),
        );
        r.register("pulls", "Pull requests served", self.pulls.clone());
        r.register(
            "pull_page_messages",
            "Messages per pulled page",
            self.pull_page.clone(),
        );
        r.register(
            "policy_verdicts",
            "Decisions by point (connect, subscribe, publish: the hook chain; message: the Lua policy) and verdict",
            self.verdicts.clone(),
        );
        r.register(
            "hook_failures",
            "Hook calls that overran their deadline or panicked (decisions then followed the hook's on_error), by hook and point; point dropped counts notifications a connection's queue could not take",
            self.hook_failures.clone(),
        );
        r.register(
            "policy_errors",
            "Policy script failures by script and kind (load, runtime, budget, deadline, bad_return, busy); each then followed policy.on_error",
            self.policy_errors.clone(),
        );
        r.register_with_unit(
            "store",
            "Store call latency by operation",
            Unit::Seconds,
            self.store_seconds.clone(),
        );
        r.register(
            "store_errors",
            "Failed store calls by operation",
            self.store_errors.clone(),
        );
        r.register(
            "redis_errors",
            "Failed or timed-out Redis calls (digest cache, presence, hand-overs)",
            self.redis_errors.clone(),
        );
        r.register(
            "handovers",
            "Live messages handed to other nodes (sent) or from them (received)",
            self.handovers.clone(),
        );
        r.register(
            "handovers_failed",
            "Live messages for devices on other nodes that did not get there (Redis failed, or the node was dead but not yet expired); they wait in the backlog for the next digest",
            self.handovers_failed.clone(),
        );
        r.register(
            "redis_up",
            "1 while this node's last heartbeat reached Redis, 0 while the cluster is degraded (single-node service, no hand-overs)",
            self.redis_up.clone(),
        );
        r.register(
            "online_users",
            "Users with a device subscribed to its inbox on this node",
            self.online_users.clone(),
        );
        r.register(
            "online_devices",
            "Devices subscribed to their inbox on this node",
            self.online_devices.clone(),
        );
        r.register(
            "upstream_links",
            "Client connections linked to the embedded rumqttd (opened on a client's first non-IM subscribe or publish, or at CONNECT for a will or a session rumqttd keeps); IM-only clients hold none",
            self.upstream_links.clone(),
        );
        r.register(
            "backlog_skipped",
            "Unacknowledged messages a backlog cap (im.max_backlog) skipped for a device; its digest reported them as missed",
            self.backlog_skipped.clone(),
        );
        r.register(
            "gc_deleted",
            "Rows garbage collection deleted: messages past their retention, devices past im.device_ttl",
            self.gc_deleted.clone(),
        );
        r.register(
            "pushes",
            "Owed notifications by outcome: sent, retried, failed, skipped (a device online, no pusher, the policy), dropped (beyond push.max_pending), rejected (pushkeys removed)",
            self.pushes.clone(),
        );
        r.register_with_unit(
            "push_gateway",
            "How long push gateway calls took",
            Unit::Seconds,
            self.push_gateway_seconds.clone(),
        );
        r.register_with_unit(
            "gc_lag",
            "How far retention is behind: how long past its retention the oldest message still stored is (0 when caught up)",
            Unit::Seconds,
            self.gc_lag.clone(),
        );
        r.register(
            "background_rounds",
            "Rounds the IM service's background tasks finished, by task (live_acks, receipts, removals, evictions, gc, heartbeat): a count that stops rising is a stalled task",
            self.background_rounds.clone(),
        );
        r.register(
            "reloads",
            "Files re-read while running (on change or SIGHUP) by file (policy, password_file, acl_file, jwks_file) and result: loaded, or kept (the new version failed to load; the last good one stays)",
            self.reloads.clone(),
        );
        r.register(
            "forwards_sent",
            "Plain-topic publishes this node handed to Redis for other nodes with a matching route, and retained ones for every node (at most once: the publisher's PUBACK does not wait for them)",
            self.forwards_sent.clone(),
        );
        r.register(
            "forwards_received",
            "Plain-topic publishes other nodes forwarded here, injected into this node's rumqttd",
            self.forwards_received.clone(),
        );
        r.register(
            "forwards_injected",
            "Publishes of other nodes this node's rumqttd has taken (QoS 1/2: acknowledged by it; QoS 0: written to it)",
            self.forwards_injected.clone(),
        );
        r.register(
            "forwards_failed",
            "Plain-topic publishes for other nodes that did not get there, by reason: queue_full (this node's forward queue), redis (Redis failed), no_listener (the node died before its routes expired), inject_queue_full, injector (the link into rumqttd broke with them in flight)",
            self.forwards_failed.clone(),
        );
        r.register(
            "cluster_routes_local",
            "Plain-topic filters this node's clients hold and advertise to the other nodes",
            self.cluster_routes_local.clone(),
        );
        r.register(
            "cluster_routes_remote",
            "Plain-topic filters the other live nodes advertise, which this node forwards to",
            self.cluster_routes_remote.clone(),
        );
        r.register(
            "retained_writes_failed",
            "Retained messages (or clearings) set through this node that the store did not keep: every node has them now, but a node that starts later will not",
            self.retained_writes_failed.clone(),
        );
        r.register(
            "shared_undelivered",
            "Publishes for a shared subscription (in a cluster) that no member took: every member's queue was full, or the members on the node chosen had just left",
            self.shared_undelivered.clone(),
        );
        r.register(
            "session_moves",
            "Client ids that connected through another node than the one holding their session, by outcome: resumed (this node got the session), unanswered (the old node did not hand it over in time; a new session started), lost (the node that had it is gone, and the session with it), given (this node handed one over), dropped (this node dropped one for a clean connect elsewhere)",
            self.session_moves.clone(),
        );
    }

    /// The counter of background task `task`'s finished rounds.
    pub(crate) fn rounds(&self, task: &'static str) -> Counter {
        self.background_rounds
            .get_or_create(&TaskLabels { task })
            .clone()
    }

    /// Counts a session move by outcome.
    pub(crate) fn count_session_move(&self, outcome: &'static str) {
        self.session_moves
            .get_or_create(&MoveLabels { outcome })
            .inc();
    }

    /// Counts a publish for another node that did not get there.
    pub(crate) fn count_forward_failed(&self, reason: &'static str) {
        self.forwards_failed
            .get_or_create(&ForwardFailureLabels { reason })
            .inc();
    }

    /// The counters of how reloads of `file` went.
    pub(crate) fn reload_outcomes(&self, file: &'static str) -> crate::watch::Outcomes {
        let counter = |result| {
            self.reloads
                .get_or_create(&ReloadLabels { file, result })
                .clone()
        };
        crate::watch::Outcomes {
            loaded: counter("loaded"),
            kept: counter("kept"),
        }
    }

    /// The registry itself (prometheus-client), for a service that encodes it with its own
    /// metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition (OpenMetrics) of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            tracing::error!("metrics encoding failed");
        }
        text
    }

    /// Times a store call that serves many requests at once; each failed request counts
    /// as a failed call.
    pub(crate) async fn store_batch<T, E>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Vec<Result<T, E>>>,
    ) -> Vec<Result<T, E>> {
        let started = Instant::now();
        let results = call.await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        self.record_store(op, started, failed);
        results
    }

    /// Times a store call and counts its failure under `op`.
    pub(crate) async fn store_call<T, E>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = call.await;
        self.record_store(op, started, usize::from(result.is_err()));
        result
    }

    fn record_store(&self, op: &'static str, started: Instant, failed: usize) {
        let labels = OperationLabels { op };
        self.store_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if failed > 0 {
            self.store_errors
                .get_or_create(&labels)
                .inc_by(failed as u64);
        }
    }

    /// Open connections per listener, for `/status`.
    pub(crate) fn connections_by_listener(&self) -> BTreeMap<&'static str, i64> {
        LISTENERS
            .iter()
            .map(|&listener| {
                let open = PROTOCOLS
                    .iter()
                    .map(|&protocol| {
                        let labels = ConnectionLabels { listener, protocol };
                        self.connections.get_or_create(&labels).get()
                    })
                    .sum();
                (listener, open)
            })
            .collect()
    }

    /// Counts a policy decision.
    pub(crate) fn verdict(&self, hook: &'static str, verdict: &'static str) {
        self.verdicts
            .get_or_create(&VerdictLabels { hook, verdict })
            .inc();
    }

    /// Counts a hook call that failed at `point`.
    pub(crate) fn count_hook_failure(&self, hook: &str, point: &'static str) {
        let labels = HookFailureLabels {
            hook: crate::text::clean(hook, 64),
            point,
        };
        self.hook_failures.get_or_create(&labels).inc();
    }

    /// Counts one client held back by `limit` (see [`LimitLabels`]).
    pub(crate) fn count_limited(&self, limit: &'static str) {
        self.limited.get_or_create(&LimitLabels { limit }).inc();
    }

    /// Counts one publish a subscriber did not get (see [`UndeliveredLabels`]).
    pub(crate) fn count_undelivered(&self, reason: &'static str) {
        self.undelivered
            .get_or_create(&UndeliveredLabels { reason })
            .inc();
    }

    /// Counts one refusal by the topic ACL (`action`: see [`AclLabels`]).
    pub(crate) fn count_acl_denial(&self, action: &'static str) {
        self.acl_denied.get_or_create(&AclLabels { action }).inc();
    }
}

/// Brings a counter up to a total kept elsewhere (totals only grow).
pub(crate) fn catch_up(counter: &Counter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}
