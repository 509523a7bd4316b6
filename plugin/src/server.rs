//! Wiring: the store, the IM service, the embedded rumqttd on a private loopback listener,
//! and the public listeners of the hook layer.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
pub use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::{Backend, ClusterSettings, Config};
pub use crate::edge::ListenerKind;
use crate::edge::{self, EdgeContext, Transport, Upgrade, EDGE_USER};
use crate::hook::{Hook, Hooks};
use crate::im::ImService;
use crate::metrics::Metrics;
use crate::policy::{self, LuaPolicy, PolicyError, PolicyHook};
use crate::status::{self, StatusSource};
use crate::store::{
    Bounded, DigestCache, EmbeddedStore, PostgresStore, RedisBus, Store, StoreError,
};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened or migrated.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The TLS certificate or key could not be used.
    #[error("tls: {0}")]
    Tls(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The policy scripts could not be read.
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    /// The authentication chain could not be built (a bad hash, an unreadable file).
    #[error("auth: {0}")]
    Auth(#[from] crate::auth::AuthError),
    /// The embedded rumqttd did not come up.
    #[error("embedded broker: {0}")]
    Broker(String),
}

/// A bound, ready-to-run mqtt-im.
#[derive(Debug)]
pub struct Server {
    /// The public listeners, the plain MQTT one first.
    listeners: Vec<(TcpListener, Upgrade)>,
    /// The metrics and status endpoint, if configured.
    status: Option<(TcpListener, StatusSource)>,
    context: Arc<EdgeContext>,
    store: Arc<dyn Store>,
    im: ImService,
    policy: Arc<LuaPolicy>,
    auth: Arc<Authenticator>,
    /// How often password files are checked for changes.
    auth_reload_ms: u64,
    heartbeat: Duration,
}

impl Server {
    /// Opens the store, starts rumqttd and binds the public listener.
    ///
    /// # Errors
    /// The store, rumqttd or a listener could not be started.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let metrics = Arc::new(Metrics::default());
        let store = open_store(&config, &metrics).await?;
        // Loading runs the scripts' top-level code: on a blocking thread, not a worker.
        let settings = config.policy.clone();
        let policy = tokio::task::spawn_blocking(move || LuaPolicy::load(settings))
            .await
            .map_err(|e| PolicyError::Lua(format!("loading the policy failed: {e}")))??;
        let policy = Arc::new(policy);
        let scripts: Arc<dyn crate::policy::Policy> = policy.clone();
        let auth = Arc::new(Authenticator::new(&config.auth, Some(scripts))?);
        if config.auth.plaintext {
            tracing::warn!("auth.plaintext is on: [auth.users] may hold clear-text passwords; store hashes made with `mqtt-im passwd`");
        }
        let cluster = connect_cluster(&config.cluster).await?;
        let im = ImService::new(
            Arc::clone(&store),
            policy.clone(),
            config.im.clone(),
            cluster,
            Arc::clone(&metrics),
        );
        let secret = format!("{:032x}", rand::random::<u128>());
        let broker = start_broker(&config, &secret).await?;
        let listeners = bind_listeners(&config).await?;
        let status = match config.listeners.metrics {
            Some(addr) => {
                let listener = crate::accept::bind(addr)
                    .map_err(|source| ServerError::Bind { addr, source })?;
                let source = StatusSource {
                    metrics: Arc::clone(&metrics),
                    im: im.clone(),
                    store: Arc::clone(&store),
                    policy: Arc::clone(&policy),
                    backend: match config.store.backend {
                        Backend::Embedded => "embedded",
                        Backend::Postgres => "postgres",
                    },
                };
                Some((listener, source))
            }
            None => None,
        };
        let lua: Arc<dyn Hook> = Arc::new(PolicyHook::new(policy.clone(), config.policy.on_error));
        let hooks = Hooks::new(vec![lua], Arc::clone(&metrics));
        let context = Arc::new(EdgeContext::new(
            &config,
            im.clone(),
            hooks,
            Arc::clone(&auth),
            broker,
            secret,
        ));
        Ok(Self {
            listeners,
            status,
            context,
            store,
            im,
            policy,
            auth,
            auth_reload_ms: config.auth.reload_interval_ms,
            heartbeat: Duration::from_millis(config.cluster.heartbeat_ms),
        })
    }

    /// The public MQTT address (with the real port when 0 was configured).
    ///
    /// # Errors
    /// The socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener_addr(ListenerKind::Tcp)
            .unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into()))
    }

    /// The address of the `kind` listener, if configured (with the real port when 0 was).
    pub fn listener_addr(&self, kind: ListenerKind) -> Option<std::io::Result<SocketAddr>> {
        self.listeners
            .iter()
            .find(|(_, upgrade)| upgrade.kind() == kind)
            .map(|(listener, _)| listener.local_addr())
    }

    /// The address of the metrics and status endpoint, if configured.
    pub fn metrics_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.status
            .as_ref()
            .map(|(listener, _)| listener.local_addr())
    }

    /// The IM service, for embedding programs and tests (presence, direct sends).
    pub fn im(&self) -> ImService {
        self.im.clone()
    }

    /// The store, for embedding programs, operator tools and tests (e.g. bulk set-up).
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// The policy, for embedding programs and tests (stats, reload).
    pub fn policy(&self) -> Arc<LuaPolicy> {
        Arc::clone(&self.policy)
    }

    /// Serves clients until `shutdown` is cancelled, then waits for every connection to
    /// finish its in-flight stores and closes the store.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        tasks.spawn(policy::watch(self.policy, shutdown.clone()));
        for (path, reload) in self.auth.reloads() {
            let interval = self.auth_reload_ms;
            tasks.spawn(crate::watch::on_change(
                vec![path.clone()],
                interval,
                Arc::clone(reload),
                shutdown.clone(),
            ));
        }
        tasks.spawn(self.im.clone().run(self.heartbeat, shutdown.clone()));
        if let Some((listener, source)) = self.status {
            tasks.spawn(status::serve(
                listener,
                source,
                tasks.clone(),
                shutdown.clone(),
            ));
        }
        let accepting = self.listeners.into_iter().map(|(listener, upgrade)| {
            let context = Arc::clone(&self.context);
            edge::serve(listener, upgrade, context, tasks.clone(), shutdown.clone())
        });
        futures::future::join_all(accepting).await;
        tasks.close();
        tasks.wait().await;
        self.im.close().await;
        self.store.close().await;
    }
}

/// Loads the TLS certificate and key (and client CA) the way start-up does, so that
/// `check-config` catches unusable files, not only missing ones.
///
/// # Errors
/// A file does not parse or the key does not fit the certificate.
pub fn check_certificates(config: &Config) -> Result<(), ServerError> {
    tls_if_used(config).map(drop)
}

/// The TLS configuration, when a listener uses it.
fn tls_if_used(config: &Config) -> Result<Option<TlsAcceptor>, ServerError> {
    if !config.listeners.use_tls() {
        return Ok(None);
    }
    edge::tls_acceptor(&config.tls)
        .map(Some)
        .map_err(ServerError::Tls)
}

/// Binds every configured public listener with its transport.
async fn bind_listeners(config: &Config) -> Result<Vec<(TcpListener, Upgrade)>, ServerError> {
    let settings = &config.listeners;
    let tls = tls_if_used(config)?;
    let with_tls = |wrap: fn(TlsAcceptor) -> Transport| tls.clone().map(wrap);
    let wanted = [
        (Some(settings.mqtt), Some(Transport::Tcp)),
        (settings.tls, with_tls(Transport::Tls)),
        (settings.ws, Some(Transport::Ws)),
        (settings.wss, with_tls(Transport::Wss)),
    ];
    let mut listeners = Vec::new();
    for (addr, transport) in wanted {
        let (Some(addr), Some(transport)) = (addr, transport) else {
            continue;
        };
        let listener =
            crate::accept::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
        let upgrade = Upgrade {
            name: transport.kind().as_str().into(),
            transport,
            ws_path: settings.ws_path.as_str().into(),
            // Room for a largest packet with its header, and a small one sent along with it.
            max_message: config.broker.max_packet_size.saturating_mul(2),
        };
        listeners.push((listener, upgrade));
    }
    Ok(listeners)
}

/// Opens (and migrates) the configured store, with the digest cache when PostgreSQL has a
/// Redis beside it (its failures counted in `metrics`); for the server and for operator
/// commands.
///
/// # Errors
/// The store or Redis could not be opened.
pub async fn open_store(config: &Config, metrics: &Metrics) -> Result<Arc<dyn Store>, ServerError> {
    Ok(match config.store.backend {
        Backend::Embedded => Arc::new(EmbeddedStore::open(
            &config.store.path,
            config.store.max_batch,
        )?),
        Backend::Postgres => {
            let cache = digest_cache(config, metrics).await?;
            let settings = &config.store.postgres;
            let store = PostgresStore::open(settings, config.store.max_batch, cache).await?;
            let limit = Duration::from_millis(settings.call_timeout_ms);
            Arc::new(Bounded::new(Arc::new(store), limit))
        }
    })
}

/// The deployment's Redis as the PostgreSQL backend's digest cache, when it has one.
async fn digest_cache(
    config: &Config,
    metrics: &Metrics,
) -> Result<Option<DigestCache>, ServerError> {
    let cluster = &config.cluster;
    if cluster.redis_url.is_empty() {
        return Ok(None);
    }
    let timeout = Duration::from_millis(cluster.redis_timeout_ms);
    let cache = DigestCache::new(
        &cluster.redis_url,
        &cluster.key_prefix,
        config.im.digest_last_n,
        timeout,
        metrics.redis_errors.clone(),
    )?;
    Ok(Some(cache))
}

/// The Redis link of this node, when `cluster.redis_url` is set.
async fn connect_cluster(settings: &ClusterSettings) -> Result<Option<RedisBus>, ServerError> {
    if settings.redis_url.is_empty() {
        return Ok(None);
    }
    let node = if settings.node_id.is_empty() {
        format!("node-{:012x}", rand::random::<u64>() >> 16)
    } else {
        settings.node_id.clone()
    };
    let ttl = Duration::from_millis(settings.node_ttl_ms);
    let timeout = Duration::from_millis(settings.redis_timeout_ms);
    let bus = RedisBus::new(
        &settings.redis_url,
        &settings.key_prefix,
        &node,
        ttl,
        timeout,
    )?;
    tracing::info!(node, "cluster node");
    Ok(Some(bus))
}

/// Starts rumqttd with `broker.private_listeners` MQTT 5 listeners on loopback that only the
/// hook layer can use (they require the per-process secret), and waits until they accept
/// connections. rumqttd 0.20 paces each listener's accept loop to about one connection per
/// millisecond, so several listeners (each its own thread) multiply the reconnect rate.
async fn start_broker(config: &Config, secret: &str) -> Result<Vec<SocketAddr>, ServerError> {
    let settings = &config.broker;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: u16::try_from(settings.connect_timeout_ms).unwrap_or(u16::MAX),
        max_payload_size: settings.max_packet_size,
        max_inflight_count: settings.max_inflight_count,
        auth: Some(HashMap::from([(EDGE_USER.to_owned(), secret.to_owned())])),
        external_auth: None,
        dynamic_filters: true,
    };
    let mut listeners = HashMap::new();
    let mut addrs = Vec::new();
    for index in 0..settings.private_listeners {
        let addr = free_loopback_port().map_err(|e| ServerError::Broker(e.to_string()))?;
        let server = rumqttd::ServerSettings {
            name: format!("mqtt-im-private-{index}"),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections: connections.clone(),
        };
        listeners.insert(format!("private-{index}"), server);
        addrs.push(addr);
    }
    let broker_config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: settings.max_connections,
            max_outgoing_packet_count: settings.max_inflight_count as u64,
            max_segment_size: settings.max_segment_size,
            max_segment_count: settings.max_segment_count,
            ..Default::default()
        },
        v5: Some(listeners),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(broker_config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded rumqttd stopped");
            }
        })
        .map_err(|e| ServerError::Broker(e.to_string()))?;
    for addr in &addrs {
        wait_ready(*addr, secret).await?;
    }
    Ok(addrs)
}

async fn wait_ready(addr: SocketAddr, secret: &str) -> Result<(), ServerError> {
    for _ in 0..200 {
        if edge::broker_ready(addr, secret).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(ServerError::Broker(format!(
        "rumqttd did not listen on {addr}"
    )))
}

fn free_loopback_port() -> std::io::Result<SocketAddr> {
    StdListener::bind("127.0.0.1:0")?.local_addr()
}
