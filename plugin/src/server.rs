//! Wiring: the store, the IM service, the embedded rumqttd on private loopback listeners,
//! and the public listeners of the hook layer; [`Builder`] for services that embed it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
pub use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::{Backend, ClusterSettings, Config, ConfigError};
use crate::edge::{
    self, Admission, Cluster, EdgeContext, Injector, Listener, PrivateBroker, SessionMover,
    Transport, EDGE_USER,
};
use crate::hook::{Hook, Hooks};
use crate::im::ImService;
pub use crate::listener::ListenerKind;
use crate::listener::{ListenerAuth, ListenerSpec};
use crate::metrics::Metrics;
use crate::policy::{self, LuaPolicy, PolicyError, PolicyHook};
use crate::rumqttd_config;
use crate::status::{self, StatusSource};
use crate::store::{
    Bounded, DigestCache, EmbeddedStore, PostgresStore, RedisBus, Store, StoreError,
};
use crate::watch;

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

/// Builds mqtt-im around a rumqttd configuration: the public listeners it describes are
/// served by the hook layer, and the rest of it (router, bridge, console) runs in an
/// embedded rumqttd behind them.
///
/// ```no_run
/// # async fn embed() -> Result<(), Box<dyn std::error::Error>> {
/// use mqtt_im::hook::{Client, Hook, Verdict};
///
/// #[derive(Debug)]
/// struct NoGuests;
///
/// #[mqtt_im::async_trait]
/// impl Hook for NoGuests {
///     fn name(&self) -> &str {
///         "no-guests"
///     }
///     async fn admit(&self, client: &Client) -> Verdict {
///         if client.uid.starts_with("guest") {
///             return Verdict::Deny("no guests".into());
///         }
///         Verdict::Allow
///     }
/// }
///
/// // The service's own broker configuration, as it would give it to `rumqttd::Broker`.
/// let rumqttd_config = mqtt_im::rumqttd_config::load("rumqttd.toml".as_ref())?;
/// let handle = mqtt_im::Builder::new(rumqttd_config)?
///     .im(mqtt_im::Config::load(Some("mqtt-im.toml".as_ref()))?)
///     .hook(NoGuests)
///     .link("service")
///     .start()
///     .await?;
/// let (_tx, _rx) = handle.take_link("service").expect("asked for above");
/// handle.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Builder {
    listeners: Vec<ListenerSpec>,
    /// What runs behind the hook layer, from a rumqttd configuration (whose listeners are
    /// then the public ones, not the mqtt-im file's `[listeners]`); `[broker]` sizes it
    /// otherwise.
    behind: Option<rumqttd::Config>,
    metrics_addr: Option<SocketAddr>,
    notes: Vec<String>,
    config: Config,
    store: Option<Arc<dyn Store>>,
    hooks: Vec<Arc<dyn Hook>>,
    links: Vec<String>,
}

impl Builder {
    /// mqtt-im around a team's rumqttd configuration (see [`rumqttd_config::adopt`]), with
    /// the built-in mqtt-im settings until [`Builder::im`].
    ///
    /// # Errors
    /// A listener mqtt-im cannot serve, or none at all.
    pub fn new(rumqttd: rumqttd::Config) -> Result<Self, ConfigError> {
        let adopted = rumqttd_config::adopt(rumqttd)?;
        let mut builder = Self::from_config(Config::default());
        builder.listeners = adopted.listeners;
        builder.behind = Some(adopted.broker);
        builder.metrics_addr = adopted.metrics;
        builder.notes = adopted.notes;
        Ok(builder)
    }

    /// mqtt-im around the rumqttd configuration file at `path` (`rumqttd.toml`), read as
    /// rumqttd reads it; keys rumqttd does not know are among the [`Builder::notes`].
    ///
    /// # Errors
    /// The file cannot be read, does not fit rumqttd's configuration, or has a listener
    /// mqtt-im cannot serve.
    pub fn from_rumqttd_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let unknown = rumqttd_config::unknown_keys(path)?;
        let mut builder = Self::new(rumqttd_config::load(path)?)?;
        builder.notes.extend(unknown);
        Ok(builder)
    }

    /// mqtt-im as its own configuration file describes it, listeners included.
    pub fn from_config(config: Config) -> Self {
        Self {
            listeners: config.listeners.specs(&config.tls, &config.broker),
            behind: None,
            metrics_addr: config.listeners.metrics,
            notes: Vec::new(),
            config,
            store: None,
            hooks: Vec::new(),
            links: Vec::new(),
        }
    }

    /// The mqtt-im settings: IM, store, policy, auth, cluster and limits. With a rumqttd
    /// configuration its `[listeners]` do not apply (its `metrics` address does unless
    /// `[prometheus]` names one).
    pub fn im(mut self, config: Config) -> Self {
        if self.behind.is_some() {
            self.metrics_addr = self.metrics_addr.or(config.listeners.metrics);
        } else {
            self.listeners = config.listeners.specs(&config.tls, &config.broker);
            self.metrics_addr = config.listeners.metrics;
        }
        self.config = config;
        self
    }

    /// A store the service opened itself, instead of the one `[store]` names.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// The Lua policy's settings (scripts, limits), instead of the `[policy]` section.
    pub fn policy(mut self, settings: crate::config::PolicySettings) -> Self {
        self.config.policy = settings;
        self
    }

    /// Adds a hook, called after the Lua policy and the hooks added before it.
    pub fn hook(mut self, hook: impl Hook + 'static) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// Asks for a local link into rumqttd under `client_id`, as `rumqttd::Broker::link`
    /// gives (for the service's own non-IM topics; IM topics are the hook layer's).
    pub fn link(mut self, client_id: impl Into<String>) -> Self {
        self.links.push(client_id.into());
        self
    }

    /// What mqtt-im treats differently from the rumqttd configuration, one line each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Where `/metrics` and `/status` will be served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The public listeners it will serve.
    pub fn listeners(&self) -> &[ListenerSpec] {
        &self.listeners
    }

    /// Opens the store, starts rumqttd and binds every listener; serve with [`Server::run`].
    ///
    /// # Errors
    /// The store, the policy, rumqttd or a listener could not be started.
    pub async fn bind(self) -> Result<Server, ServerError> {
        for note in &self.notes {
            tracing::warn!(note = note.as_str(), "rumqttd configuration");
        }
        let config = self.config;
        let metrics = Arc::new(Metrics::default());
        let store = match self.store {
            Some(store) => store,
            None => open_store(&config, &metrics).await?,
        };
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
        let bus = connect_cluster(&config.cluster).await?;
        let cluster = bus
            .clone()
            .map(|bus| Arc::new(Cluster::new(bus, Arc::clone(&store), Arc::clone(&metrics))));
        if let Some(cluster) = &cluster {
            cluster.read_retained().await;
        }
        let im = ImService::new(
            Arc::clone(&store),
            policy.clone(),
            config.im.clone(),
            config.push.clone(),
            bus,
            Arc::clone(&metrics),
        );
        let secret = format!("{:032x}", rand::random::<u128>());
        let max_packet = self
            .listeners
            .iter()
            .map(|spec| spec.max_packet)
            .max()
            .unwrap_or(config.broker.max_packet_size);
        let behind = self.behind.unwrap_or_else(|| own_broker(&config.broker));
        let (brokers, links) =
            start_broker(&config, behind, &secret, max_packet, &self.links).await?;
        let listeners = bind_listeners(&config, &self.listeners)?;
        let status = match self.metrics_addr {
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
        let chain = std::iter::once(lua).chain(self.hooks).collect();
        let hooks = Hooks::new(chain, Arc::clone(&metrics));
        let broker = PrivateBroker {
            listeners: brokers,
            secret,
            max_packet,
            connect_timeout: config.broker.connect_timeout.0,
        };
        let context = Arc::new(EdgeContext::new(
            im.clone(),
            hooks,
            Arc::clone(&auth),
            broker,
            &config.im.prefix,
            config.limits.clone(),
            cluster,
        ));
        Ok(Server {
            listeners,
            status,
            context,
            store,
            im,
            policy,
            auth,
            metrics,
            links,
            auth_reload: config.auth.reload_interval.0,
            heartbeat: config.cluster.heartbeat.0,
        })
    }

    /// Binds and serves in the background until [`Handle::shutdown`].
    ///
    /// # Errors
    /// As [`Builder::bind`].
    pub async fn start(self) -> Result<Handle, ServerError> {
        let mut server = self.bind().await?;
        let links = std::mem::take(&mut server.links);
        let addrs = server.addresses();
        let metrics_addr = server.metrics_addr().and_then(Result::ok);
        let (im, metrics) = (server.im(), Arc::clone(&server.metrics));
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(server.run(shutdown.clone()));
        Ok(Handle {
            shutdown,
            running,
            addrs,
            metrics_addr,
            im,
            metrics,
            links: std::sync::Mutex::new(links),
        })
    }
}

/// A running mqtt-im, started by [`Builder::start`]. Dropping it leaves mqtt-im serving
/// until the runtime ends; [`Handle::shutdown`] stops it cleanly.
#[derive(Debug)]
pub struct Handle {
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<()>,
    addrs: Vec<(String, ListenerKind, SocketAddr)>,
    metrics_addr: Option<SocketAddr>,
    im: ImService,
    metrics: Arc<Metrics>,
    links: std::sync::Mutex<LocalLinks>,
}

impl Handle {
    /// The address of the listener named `name` (`v4.1`-style, or `mqtt`/`tls`/`ws`/`wss`),
    /// with the real port when 0 was configured.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|(listener, _, _)| listener == name)
            .map(|(_, _, addr)| *addr)
    }

    /// Every listener: name, kind and bound address.
    pub fn listeners(&self) -> &[(String, ListenerKind, SocketAddr)] {
        &self.addrs
    }

    /// Where `/metrics` and `/status` are served, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The metrics registry (also served at the metrics address, if one is configured).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// The IM service, for server-side sends and presence.
    pub fn im(&self) -> ImService {
        self.im.clone()
    }

    /// The local link asked for with [`Builder::link`] (once).
    pub fn take_link(&self, client_id: &str) -> Option<LocalLink> {
        self.links.lock().ok()?.0.remove(client_id)
    }

    /// Stops accepting, lets every connection finish its in-flight stores, closes the store.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if let Err(e) = self.running.await {
            tracing::error!(error = %e, "mqtt-im stopped abnormally");
        }
    }
}

/// How long a starting node of a cluster waits for its rumqttd to take the retained
/// messages (read from the store at bind) before it serves clients without them.
const RETAINED_LOAD_LIMIT: Duration = Duration::from_secs(5);

/// A bound, ready-to-run mqtt-im.
#[derive(Debug)]
pub struct Server {
    /// The public listeners, in configuration order.
    listeners: Vec<(TcpListener, Arc<Listener>)>,
    /// The metrics and status endpoint, if configured.
    status: Option<(TcpListener, StatusSource)>,
    context: Arc<EdgeContext>,
    store: Arc<dyn Store>,
    im: ImService,
    policy: Arc<LuaPolicy>,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    links: LocalLinks,
    /// How often password, ACL and JWKS files are checked for changes.
    auth_reload: Duration,
    heartbeat: Duration,
}

impl Server {
    /// Opens the store, starts rumqttd and binds the listeners of mqtt-im's own
    /// configuration.
    ///
    /// # Errors
    /// The store, rumqttd or a listener could not be started.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        Builder::from_config(config).bind().await
    }

    /// The first plain MQTT address (with the real port when 0 was configured).
    ///
    /// # Errors
    /// The socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener_addr(ListenerKind::Tcp)
            .unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into()))
    }

    /// The address of the first `kind` listener, if configured (with the real port when 0
    /// was).
    pub fn listener_addr(&self, kind: ListenerKind) -> Option<std::io::Result<SocketAddr>> {
        self.listeners
            .iter()
            .find(|(_, listener)| listener.kind() == kind)
            .map(|(socket, _)| socket.local_addr())
    }

    /// Every listener: name, kind and bound address.
    pub fn addresses(&self) -> Vec<(String, ListenerKind, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(socket, listener)| {
                let addr = socket.local_addr().ok()?;
                Some((listener.name.to_string(), listener.kind(), addr))
            })
            .collect()
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
        let metrics = self.im.metrics();
        let (policy_files, policy_interval) = policy::watched(self.policy);
        let outcomes = metrics.reload_outcomes(policy_files.what);
        tasks.spawn(watch::on_change(
            policy_files,
            policy_interval,
            outcomes,
            shutdown.clone(),
        ));
        for watched in self.auth.reloads() {
            let outcomes = metrics.reload_outcomes(watched.what);
            let interval = self.auth_reload;
            let watched = Arc::clone(watched);
            tasks.spawn(watch::on_change(
                watched,
                interval,
                outcomes,
                shutdown.clone(),
            ));
        }
        tasks.spawn(self.im.clone().run(self.heartbeat, shutdown.clone()));
        let expiry = edge::expire_sessions(Arc::clone(&self.context), shutdown.clone());
        tasks.spawn(expiry);
        if let Some(cluster) = self.context.cluster.clone() {
            let injector = Injector::new(Arc::clone(&self.context), cluster.node());
            let mover = SessionMover::new(Arc::clone(&self.context));
            let running =
                Arc::clone(&cluster).run(injector, mover, self.heartbeat, shutdown.clone());
            tasks.spawn(running);
            // The first subscribers get the cluster's retained messages.
            cluster.retained_loaded(RETAINED_LOAD_LIMIT).await;
        }
        if let Some((listener, source)) = self.status {
            tasks.spawn(status::serve(
                listener,
                source,
                tasks.clone(),
                shutdown.clone(),
            ));
        }
        let accepting = self.listeners.into_iter().map(|(socket, listener)| {
            let context = Arc::clone(&self.context);
            edge::serve(socket, listener, context, tasks.clone(), shutdown.clone())
        });
        futures::future::join_all(accepting).await;
        tasks.close();
        tasks.wait().await;
        self.context.hooks.close().await;
        self.im.close().await;
        self.store.close().await;
    }
}

/// Loads every TLS certificate and key (and client CA) the way start-up does, so that
/// `check-config` catches unusable files, not only missing ones.
///
/// # Errors
/// A file does not parse or the key does not fit the certificate.
pub fn check_certificates(listeners: &[ListenerSpec]) -> Result<(), ServerError> {
    for spec in listeners {
        transport(spec)?;
    }
    Ok(())
}

/// What carries MQTT on `spec`'s listener, with its TLS configuration loaded.
fn transport(spec: &ListenerSpec) -> Result<Transport, ServerError> {
    let tls = || {
        let settings = spec
            .tls
            .as_ref()
            .ok_or_else(|| ServerError::Tls(format!("{}: no certificate configured", spec.name)))?;
        edge::tls_acceptor(settings).map_err(|e| ServerError::Tls(format!("{}: {e}", spec.name)))
    };
    Ok(match spec.kind {
        ListenerKind::Tcp => Transport::Tcp,
        ListenerKind::Ws => Transport::Ws,
        ListenerKind::Tls => Transport::Tls(tls()?),
        ListenerKind::Wss => Transport::Wss(tls()?),
    })
}

/// Binds every listener with its transport, limits and credentials.
fn bind_listeners(
    config: &Config,
    specs: &[ListenerSpec],
) -> Result<Vec<(TcpListener, Arc<Listener>)>, ServerError> {
    let mut listeners = Vec::with_capacity(specs.len());
    for spec in specs {
        let admission = match &spec.auth {
            ListenerAuth::Chain => Admission::Chain,
            // A team that gives mqtt-im credentials means them for its listeners too.
            ListenerAuth::Open if chain_configured(&config.auth) => Admission::Chain,
            ListenerAuth::Open => Admission::Open,
            ListenerAuth::Table(users) => Admission::Table(Arc::new(table_auth(config, users)?)),
            ListenerAuth::External(handler) => Admission::External(Arc::clone(handler)),
        };
        let listener = Listener {
            name: spec.name.as_str().into(),
            transport: transport(spec)?,
            ws_path: spec.ws_path.as_deref().map(Arc::from),
            max_packet: spec.max_packet,
            connect_timeout: spec.connect_timeout,
            admission,
            max_pending: spec.max_pending,
            version: spec.protocol,
        };
        let addr = spec.addr;
        let socket =
            crate::accept::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
        listeners.push((socket, Arc::new(listener)));
    }
    Ok(listeners)
}

/// Whether the `[auth]` section names any credentials (users or providers).
fn chain_configured(auth: &crate::config::AuthSettings) -> bool {
    !auth.users.is_empty() || !auth.providers.is_empty()
}

/// A rumqttd `auth` table as a provider chain of its own: clear-text passwords, the
/// username as the uid, the `[auth]` ACL file still applying.
fn table_auth(
    config: &Config,
    users: &std::collections::BTreeMap<String, String>,
) -> Result<Authenticator, ServerError> {
    let settings = crate::config::AuthSettings {
        users: users.clone(),
        plaintext: true,
        allow_anonymous: false,
        uid_from: crate::config::UidSource::Username,
        providers: Vec::new(),
        ..config.auth.clone()
    };
    Ok(Authenticator::new(&settings, None)?)
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
            let limit = settings.call_timeout.0;
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
    let cache = DigestCache::new(
        &cluster.redis(),
        config.im.digest_last_n,
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
    let bus = RedisBus::new(&settings.redis(), &node, settings.node_ttl.0)?;
    tracing::info!(node, "cluster node");
    Ok(Some(bus))
}

/// A local client link into rumqttd, as `rumqttd::Broker::link` gives.
pub type LocalLink = (rumqttd::local::LinkTx, rumqttd::local::LinkRx);

/// The local links asked for, by client id, until taken.
#[derive(Default)]
struct LocalLinks(HashMap<String, LocalLink>);

impl std::fmt::Debug for LocalLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// What runs behind the hook layer with mqtt-im's own configuration: a router `[broker]`
/// sizes, nothing else.
fn own_broker(settings: &crate::config::BrokerSettings) -> rumqttd::Config {
    rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: settings.max_connections,
            max_outgoing_packet_count: settings.max_inflight_count as u64,
            max_segment_size: settings.max_segment_size,
            max_segment_count: settings.max_segment_count,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Private listeners and the local links asked for, once rumqttd is up.
type Started = (Vec<SocketAddr>, LocalLinks);

/// Starts rumqttd — `behind` with its listeners replaced by `broker.private_listeners` MQTT 5
/// listeners on loopback that only the hook layer can use (they require the per-process
/// secret) — and waits until they accept connections. rumqttd 0.20 paces each listener's
/// accept loop to about one connection per millisecond, so several listeners (each its own
/// thread) multiply the reconnect rate.
async fn start_broker(
    config: &Config,
    behind: rumqttd::Config,
    secret: &str,
    max_packet: usize,
    local_links: &[String],
) -> Result<Started, ServerError> {
    let settings = &config.broker;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: u16::try_from(settings.connect_timeout.0.as_millis())
            .unwrap_or(u16::MAX),
        // What the hook layer carries in each publish comes on top of the client's limit.
        max_payload_size: max_packet + edge::CARRIED_GROWTH,
        max_inflight_count: settings.max_inflight_count,
        auth: Some(HashMap::from([(EDGE_USER.to_owned(), secret.to_owned())])),
        external_auth: None,
        dynamic_filters: true,
    };
    let mut listeners = HashMap::new();
    let mut addrs = Vec::new();
    let mut reserved = Vec::new();
    for index in 0..settings.private_listeners {
        let reservation =
            reserve_loopback_port().map_err(|e| ServerError::Broker(e.to_string()))?;
        let addr = reservation
            .local_addr()
            .map_err(|e| ServerError::Broker(e.to_string()))?;
        reserved.push(reservation);
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
        v5: Some(listeners),
        ..behind
    };
    let mut broker = rumqttd::Broker::new(broker_config);
    let mut links = LocalLinks::default();
    for client_id in local_links {
        if links.0.contains_key(client_id) {
            let why = format!("local link {client_id:?} asked for twice");
            return Err(ServerError::Broker(why));
        }
        let link = broker
            .link(client_id)
            .map_err(|e| ServerError::Broker(format!("local link {client_id:?}: {e}")))?;
        links.0.insert(client_id.clone(), link);
    }
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded rumqttd stopped");
            }
        })
        .map_err(|e| ServerError::Broker(e.to_string()))?;
    for addr in &addrs {
        wait_ready(*addr, secret).await?;
    }
    // rumqttd listens on them now: the reservations may go.
    drop(reserved);
    Ok((addrs, links))
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

/// A loopback port for a private rumqttd listener, held until rumqttd listens on it: a
/// socket bound with SO_REUSEADDR and not listening keeps every other bind (port 0 and
/// outgoing connections included) off the port, while rumqttd's own bind, which sets
/// SO_REUSEADDR too, still succeeds. (Binding port 0 and letting go before rumqttd binds
/// left a window in which another process could take the port.)
fn reserve_loopback_port() -> std::io::Result<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reserved port is not handed out again to a bind of port 0 (as other programs and
    /// tests pick theirs), and rumqttd's own bind to it succeeds.
    #[tokio::test]
    async fn a_reserved_port_is_kept_for_rumqttd() -> std::io::Result<()> {
        let reservation = reserve_loopback_port()?;
        let addr = reservation.local_addr()?;
        for _ in 0..2000 {
            let other = std::net::TcpListener::bind("127.0.0.1:0")?;
            assert_ne!(
                other.local_addr()?,
                addr,
                "the reserved port was handed out"
            );
        }
        // rumqttd binds with tokio, which sets SO_REUSEADDR as the reservation does.
        let rumqttd = tokio::net::TcpListener::bind(addr).await?;
        assert_eq!(rumqttd.local_addr()?, addr);
        Ok(())
    }
}
