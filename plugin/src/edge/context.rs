//! What every connection of the hook layer shares: the IM service, the hook chain, the
//! authenticator, the embedded rumqttd behind it, the limits, and what outlives a
//! connection (persistent sessions, client ids holding a rumqttd link, devices per user).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttd::protocol::Filter;

use super::cluster::Cluster;
use super::limits::{self, LimitSettings};
use super::links;
use super::topics::Topics;
use crate::auth::Authenticator;
use crate::hook::Hooks;
use crate::im::{Device, ImService};

/// Username the hook layer presents to rumqttd; the password is the per-process secret.
pub(crate) const EDGE_USER: &str = "mqtt-im-edge";

/// The embedded rumqttd as the hook layer reaches it.
#[derive(Debug)]
pub(crate) struct PrivateBroker {
    /// Its private listeners; connections are spread over them.
    pub(crate) listeners: Vec<SocketAddr>,
    /// The per-process secret that opens them.
    pub(crate) secret: String,
    /// The largest packet any public listener takes (rumqttd's links take as much).
    pub(crate) max_packet: usize,
    /// How long rumqttd may take to accept a link.
    pub(crate) connect_timeout: Duration,
}

/// What every connection needs, shared.
#[derive(Debug)]
pub(crate) struct EdgeContext {
    pub(crate) im: ImService,
    /// The hook chain: the Lua policy, then the embedder's hooks.
    pub(crate) hooks: Hooks,
    pub(crate) topics: Topics,
    pub(crate) auth: Arc<Authenticator>,
    /// The embedded rumqttd behind the hook layer.
    pub(crate) broker: PrivateBroker,
    next_connection: AtomicU64,
    /// Persistent sessions, by (uid, client id): their IM subscriptions, restored when the
    /// device reconnects without a clean session (rumqttd keeps only the non-IM ones).
    persistent: Mutex<HashMap<Device, HashMap<String, u8>>>,
    /// Client ids whose persistent session rumqttd keeps (their link was open when they
    /// left): their next connection links to rumqttd at once, to resume or discard it.
    upstream_sessions: Mutex<HashSet<String>>,
    /// One rumqttd link per client id at a time (the hook layer does session take-over).
    pub(crate) links: Arc<links::Links>,
    /// Per-client, per-user and per-listener limits.
    pub(crate) limits: LimitSettings,
    /// Plain-topic routing across nodes, with a cluster.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// Sessions kept for a while after their connection (MQTT 5 session expiry).
    pub(crate) expiring: super::expiry::Expiring,
    /// The routes of persistent sessions waiting at rumqttd, by client id.
    kept_routes: Mutex<HashMap<String, KeptRoutes>>,
    /// Connections per user, for `limits.max_devices_per_user`.
    pub(crate) devices: Arc<limits::Devices>,
}

/// What a persistent session away from this node holds in the cluster.
#[derive(Debug, Default)]
pub(crate) struct KeptRoutes {
    /// Plain-topic filters held at rumqttd, advertised meanwhile.
    pub(crate) plain: Vec<Filter>,
    /// Shared subscriptions (`$share/...`), rejoined at the next connection (meanwhile
    /// their messages go to the members that are connected).
    pub(crate) shared: Vec<Filter>,
}

impl EdgeContext {
    /// The private rumqttd listener for connection `id` (round robin).
    pub(crate) fn broker_for(&self, id: u64) -> Option<SocketAddr> {
        let listeners = &self.broker.listeners;
        let count = u64::try_from(listeners.len()).ok().filter(|n| *n > 0)?;
        let index = usize::try_from(id % count).ok()?;
        listeners.get(index).copied()
    }

    /// Takes the IM subscriptions a persistent session of `device` left behind.
    pub(crate) fn restore_session(&self, device: &Device) -> HashMap<String, u8> {
        self.persistent
            .lock()
            .ok()
            .and_then(|mut sessions| sessions.remove(device))
            .unwrap_or_default()
    }

    /// Whether `device` left a persistent session (for CONNACK's session present).
    pub(crate) fn has_session(&self, device: &Device) -> bool {
        self.persistent
            .lock()
            .is_ok_and(|sessions| sessions.contains_key(device))
    }

    /// Keeps a persistent session, with its IM subscriptions, for the device's next
    /// connection.
    pub(crate) fn keep_session(&self, device: &Device, filters: HashMap<String, u8>) {
        if let Ok(mut sessions) = self.persistent.lock() {
            sessions.insert(device.clone(), filters);
        }
    }

    /// Ends the session of a device that connected with a clean session.
    pub(crate) fn drop_session(&self, device: &Device) {
        if let Ok(mut sessions) = self.persistent.lock() {
            sessions.remove(device);
        }
    }

    /// Keeps the routes of `client_id`'s persistent session for its next connection.
    pub(crate) fn keep_routes(&self, client_id: &str, routes: KeptRoutes) {
        if let Ok(mut kept) = self.kept_routes.lock() {
            kept.insert(client_id.to_owned(), routes);
        }
    }

    /// The routes `client_id`'s persistent session left, if any.
    pub(crate) fn take_routes(&self, client_id: &str) -> KeptRoutes {
        self.kept_routes
            .lock()
            .ok()
            .and_then(|mut kept| kept.remove(client_id))
            .unwrap_or_default()
    }

    /// Whether rumqttd keeps a session of `client_id`; forgets it (the link that opens now
    /// resumes or discards it, and records it again as it closes).
    pub(crate) fn take_upstream_session(&self, client_id: &str) -> bool {
        self.upstream_sessions
            .lock()
            .is_ok_and(|mut ids| ids.remove(client_id))
    }

    /// Records that rumqttd keeps the session of `client_id` after its link closed.
    pub(crate) fn keep_upstream_session(&self, client_id: &str) {
        if let Ok(mut ids) = self.upstream_sessions.lock() {
            ids.insert(client_id.to_owned());
        }
    }

    /// The shared part of every connection: IM topics under `prefix`, clients held to
    /// `limits`, relayed to `broker`.
    pub(crate) fn new(
        im: ImService,
        hooks: Hooks,
        auth: Arc<Authenticator>,
        broker: PrivateBroker,
        prefix: &str,
        limits: LimitSettings,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Self {
            im,
            hooks,
            topics: Topics::new(prefix),
            auth,
            broker,
            next_connection: AtomicU64::new(1),
            persistent: Mutex::new(HashMap::new()),
            upstream_sessions: Mutex::new(HashSet::new()),
            expiring: super::expiry::Expiring::default(),
            links: Arc::default(),
            limits,
            cluster,
            kept_routes: Mutex::default(),
            devices: Arc::default(),
        }
    }
}

impl EdgeContext {
    /// A number for a new connection, unique in this process.
    pub(crate) fn next_connection(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }
}
