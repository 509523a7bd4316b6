//! One configuration tree: built-in defaults, then an optional TOML file, then environment
//! variables `MQTT_IM__SECTION__KEY`. Problems are reported all at once, one line per key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The built-in defaults, also the reference for every key.
const DEFAULTS: &str = r#"
[listeners]
mqtt = "127.0.0.1:1883"
# Optional, off unless set: tls = "0.0.0.0:8883", ws = "0.0.0.0:8083", wss = "0.0.0.0:8084",
# metrics = "127.0.0.1:9464" (Prometheus `/metrics` and the `/status` JSON).
ws_path = "/mqtt"

[tls]
cert = ""
key = ""
client_ca = ""
client_auth = "none"

[broker]
max_connections = 10000
private_listeners = 4
max_segment_size = 1048576
max_segment_count = 2
max_inflight_count = 100
max_packet_size = 1048576
connect_timeout_ms = 5000

[auth]
allow_anonymous = false
uid_from = "username"
plaintext = false
reload_interval_ms = 1000

[auth.users]

[store]
backend = "embedded"
path = "data/mqtt-im.db"
max_batch = 512

[store.postgres]
url = "postgres://postgres@127.0.0.1:5432/postgres"
schema = "public"
pool_size = 16
connect_timeout_ms = 3000
call_timeout_ms = 5000

[im]
prefix = "im"
digest_last_n = 3
page_size_default = 20
page_size_max = 200
max_message_bytes = 65536
receipt_interval_ms = 1000
removal_poll_ms = 500
live_ack_flush_ms = 50
# Unacknowledged messages a device keeps per conversation; older ones are skipped for it and
# reported as `missed` in its digest (0: no cap).
max_backlog = 5000
# A device unseen this long is forgotten: its next connection starts as a new device ("0": never).
device_ttl = "90d"
# How often retention and device expiry run, and how many rows one step deletes.
gc_interval = "1m"
gc_batch = 5000
# What `mqtt-im user erase` does to the user's messages in groups: "redact" keeps the seq with
# an empty body, "delete" removes it (1:1 messages are always deleted).
erase_group_messages = "redact"

# Messages older than this are deleted, per kind of conversation ("0": kept for good).
[im.retention]
direct = "30d"
group = "30d"

[limits]
publish_rate = 0
publish_burst = 0
publish_bytes_per_s = 0
max_devices_per_user = 0
device_overflow = "refuse_newest"
max_connections_per_listener = 0

[cluster]
redis_url = ""
node_id = ""
key_prefix = "mqtt-im"
heartbeat_ms = 1000
node_ttl_ms = 5000
redis_timeout_ms = 500

[policy]
scripts = []
on_error = "deny"
states = 2
memory_limit = 8388608
instruction_limit = 1000000
call_timeout_ms = 20
queue_timeout_ms = 1000
whole_words = true
reload_interval_ms = 1000

[policy.words]

[policy.config]
"#;

/// Everything mqtt-im reads at start-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// Public listeners owned by the hook layer.
    pub listeners: Listeners,
    /// Certificates of the TLS listeners.
    pub tls: TlsSettings,
    /// Settings of the embedded rumqttd.
    pub broker: BrokerSettings,
    /// Who may connect.
    pub auth: AuthSettings,
    /// Where messages are kept.
    pub store: StoreSettings,
    /// IM behaviour.
    pub im: ImSettings,
    /// Lua policy scripts.
    pub policy: PolicySettings,
    /// Several nodes sharing one PostgreSQL and one Redis.
    pub cluster: ClusterSettings,
    /// What one client, one user and one listener may use.
    pub limits: LimitSettings,
}

/// What a client exceeding the per-user device limit meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceOverflow {
    /// The new connection is refused (CONNACK quota exceeded).
    RefuseNewest,
    /// The user's oldest connection is closed (MQTT 5: DISCONNECT quota exceeded).
    DisconnectOldest,
}

/// Per-client, per-user and per-listener limits; 0 means unlimited.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// PUBLISH packets per second per connection (token bucket).
    pub publish_rate: u32,
    /// Publishes a connection may send at once above the rate (0: the rate).
    pub publish_burst: u32,
    /// PUBLISH bytes per second per connection (token bucket, one second of burst).
    pub publish_bytes_per_s: u64,
    /// Connections one user (identity) may hold at once.
    pub max_devices_per_user: u32,
    /// Which connection gives way when a user has too many.
    pub device_overflow: DeviceOverflow,
    /// Connections each public listener holds at once (checked before TLS or WebSocket).
    pub max_connections_per_listener: usize,
}

/// Scale-out: presence per node and hand-over of live messages through Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Redis URL; empty runs a single node without Redis.
    pub redis_url: String,
    /// This node's id; empty generates one at start.
    pub node_id: String,
    /// Prefix of every Redis key and channel (several deployments or tests can share Redis).
    pub key_prefix: String,
    /// How often this node refreshes its liveness and its devices' presence.
    pub heartbeat_ms: u64,
    /// A node that has not refreshed within this time no longer counts as holding its users.
    pub node_ttl_ms: u64,
    /// A Redis call unanswered this long fails; the digest is then computed from the store.
    pub redis_timeout_ms: u64,
}

/// Public listeners; one port serves MQTT 3.1.1 and MQTT 5 (the CONNECT tells them apart).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// Plain TCP address; port 0 picks a free port.
    pub mqtt: SocketAddr,
    /// MQTT over TLS (needs `tls.cert` and `tls.key`).
    #[serde(default)]
    pub tls: Option<SocketAddr>,
    /// MQTT over WebSocket, for browsers.
    #[serde(default)]
    pub ws: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS (needs `tls.cert` and `tls.key`).
    #[serde(default)]
    pub wss: Option<SocketAddr>,
    /// The HTTP path of the WebSocket listeners (mqtt.js and Paho use `/mqtt`).
    pub ws_path: String,
    /// HTTP address of Prometheus `/metrics` and the `/status` JSON.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

impl Listeners {
    /// Whether a listener needs the `[tls]` certificate.
    pub fn use_tls(&self) -> bool {
        self.tls.is_some() || self.wss.is_some()
    }
}

/// Whether TLS clients present certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Clients authenticate with username and password only.
    None,
    /// A client may present a certificate signed by `tls.client_ca`; its subject's common
    /// name is then its uid, without a password.
    Optional,
    /// Every TLS client must present such a certificate.
    Required,
}

/// Certificates of the `tls` and `wss` listeners (PEM files).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client certificates.
    pub client_ca: PathBuf,
    /// Whether clients present certificates.
    pub client_auth: ClientAuth,
}

/// Bounded router settings for rumqttd: IM traffic never enters its router, so small
/// commit logs are enough for pass-through topics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    /// Connections rumqttd accepts.
    pub max_connections: usize,
    /// rumqttd listeners for the hook layer's links (each accepts about 1,000 per second).
    pub private_listeners: usize,
    /// Bytes per commit-log segment of each topic filter.
    pub max_segment_size: usize,
    /// Segments kept per filter.
    pub max_segment_count: usize,
    /// Unacknowledged QoS 1/2 publishes per connection.
    pub max_inflight_count: usize,
    /// Largest packet a client may send, in bytes.
    pub max_packet_size: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout_ms: u64,
}

/// Where a connection's uid comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UidSource {
    /// The authenticated username.
    Username,
    /// The MQTT client id.
    ClientId,
}

/// Who may connect: the users table and the provider chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// username → password hash (a PHC string; `mqtt-im passwd` makes one).
    pub users: BTreeMap<String, String>,
    /// Allows clear-text passwords in `users` (warned about at start-up).
    pub plaintext: bool,
    /// Accept clients without credentials (their uid is then the client id).
    pub allow_anonymous: bool,
    /// Where the uid comes from.
    pub uid_from: UidSource,
    /// The chain, asked in order; empty means the users table alone.
    #[serde(default)]
    pub providers: Vec<ProviderSettings>,
    /// How often password and ACL files are checked for changes (0: only on SIGHUP).
    pub reload_interval_ms: u64,
    /// A Mosquitto `acl_file` for non-IM topics; none: every client may use every non-IM
    /// topic.
    #[serde(default)]
    pub acl_file: Option<PathBuf>,
}

/// One link of the authentication chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderSettings {
    /// `auth.users`.
    Users,
    /// A Mosquitto password file (`mosquitto_passwd`).
    PasswordFile {
        /// The file, as `mosquitto_passwd` writes it.
        path: PathBuf,
    },
    /// JSON Web Tokens from the team's identity service.
    Jwt(Box<JwtSettings>),
    /// The team's HTTP auth service.
    Http(Box<HttpAuthSettings>),
    /// The team's own users table in PostgreSQL.
    Postgres(Box<PostgresAuthSettings>),
    /// The policy scripts' `on_auth` hook.
    Lua,
}

/// How the team's users table is queried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresAuthSettings {
    /// Connection URL of the team's database.
    pub url: String,
    /// Gets `$1` = username (and `$2` = client id if it uses it); returns the password hash,
    /// then optionally uid, superuser (boolean) and topic rules (JSON as text).
    pub query: String,
    /// Connections in the pool.
    #[serde(default = "default_auth_pool")]
    pub pool_size: usize,
    /// Longest a query may take (getting a connection included).
    #[serde(default = "default_http_timeout_ms")]
    pub timeout_ms: u64,
    /// How long a row (or its absence) is reused (0: never).
    #[serde(default)]
    pub cache_ttl_ms: u64,
    /// What an unreachable database means.
    #[serde(default)]
    pub on_error: ProviderOutage,
}

fn default_auth_pool() -> usize {
    4
}

/// What a provider that cannot answer means for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderOutage {
    /// Refuse (CONNACK server unavailable).
    #[default]
    Deny,
    /// Ask the next provider.
    Next,
}

/// How the auth service is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthSettings {
    /// The `http://` URL CONNECTs are POSTed to.
    pub url: String,
    /// Longest wait for an answer (connecting included).
    #[serde(default = "default_http_timeout_ms")]
    pub timeout_ms: u64,
    /// How long an answer is reused for the same client id, username and password (0: never).
    #[serde(default)]
    pub cache_ttl_ms: u64,
    /// Extra request headers (e.g. the service's own credentials).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// What an unreachable or failing service means.
    #[serde(default)]
    pub on_error: ProviderOutage,
}

fn default_http_timeout_ms() -> u64 {
    2000
}

/// Which CONNECT field carries the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JwtFrom {
    /// The password (the usual place).
    #[default]
    Password,
    /// The username.
    Username,
}

/// How tokens are checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// The CONNECT field holding the token.
    #[serde(default)]
    pub from: JwtFrom,
    /// `HS256`, `RS256` or `ES256`.
    pub algorithm: String,
    /// The shared secret (HS256).
    #[serde(default)]
    pub secret: Option<String>,
    /// A PEM public key (RS256, ES256).
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    /// A JWKS file (RS256, ES256), re-read when it changes.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    #[serde(default)]
    pub audience: Option<String>,
    /// The claim naming the uid (absent: `auth.uid_from` decides).
    #[serde(default = "default_uid_claim")]
    pub uid_claim: String,
    /// The claim with topic ACL rules, if any.
    #[serde(default)]
    pub acl_claim: Option<String>,
    /// A boolean claim that makes the client a superuser (no topic ACL), if any.
    #[serde(default)]
    pub superuser_claim: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default)]
    pub leeway_s: u64,
}

fn default_uid_claim() -> String {
    "sub".into()
}

/// Storage backend selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// SQLite file, no server needed.
    Embedded,
    /// PostgreSQL (messages, members, cursors).
    Postgres,
}

/// The PostgreSQL backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// Connection URL (`postgres://user[:password]@host:port/database`).
    pub url: String,
    /// Schema holding mqtt-im's tables (created if missing).
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Time to get a connection before a store call fails as unavailable.
    pub connect_timeout_ms: u64,
    /// Longest a store call (a commit included) may take before it fails as unavailable;
    /// also the server's statement timeout.
    pub call_timeout_ms: u64,
}

/// Storage settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// Which backend.
    pub backend: Backend,
    /// SQLite file of the embedded backend.
    pub path: PathBuf,
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// The PostgreSQL backend, used when `backend = "postgres"`.
    pub postgres: PostgresSettings,
}

/// IM behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImSettings {
    /// First topic level of every IM topic.
    pub prefix: String,
    /// Newest messages per conversation in a digest.
    pub digest_last_n: usize,
    /// Page size of a Pull or History that asks for none.
    pub page_size_default: usize,
    /// Largest page; bigger requests are capped.
    pub page_size_max: usize,
    /// Largest chat payload, in bytes.
    pub max_message_bytes: usize,
    /// How often online senders get the batched read-receipt updates.
    pub receipt_interval_ms: u64,
    /// How often this node reads the removal log, to cut off members removed elsewhere (on
    /// another node or by an operator's command).
    pub removal_poll_ms: u64,
    /// How often acknowledged live deliveries are written, merged per device and
    /// conversation (a Pull or digest of the device writes its own at once).
    pub live_ack_flush_ms: u64,
    /// Unacknowledged messages a device keeps per conversation (0: no cap): a phone back
    /// from a month offline pages through at most this many, and learns how many it missed.
    pub max_backlog: u64,
    /// A device unseen this long is forgotten, so it holds no state for good.
    pub device_ttl: Period,
    /// How long messages are kept.
    pub retention: RetentionSettings,
    /// How often retention and device expiry run.
    pub gc_interval: Period,
    /// Rows one garbage-collection step deletes (one short transaction each).
    pub gc_batch: usize,
    /// What erasing a user does to its group messages.
    pub erase_group_messages: crate::store::GroupErasure,
}

/// How long messages are kept, per kind of conversation: `im.retention = "30d"` for both, or
/// a table with `direct` and `group`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(try_from = "RetentionForm")]
pub struct RetentionSettings {
    /// 1:1 chats.
    pub direct: Period,
    /// Groups.
    pub group: Period,
}

/// The two ways `im.retention` may be written.
#[derive(Deserialize)]
#[serde(untagged)]
enum RetentionForm {
    Both(String),
    PerKind { direct: String, group: String },
}

impl TryFrom<RetentionForm> for RetentionSettings {
    type Error = String;

    fn try_from(form: RetentionForm) -> Result<Self, Self::Error> {
        match form {
            RetentionForm::Both(text) => {
                let period: Period = text.parse()?;
                Ok(Self {
                    direct: period,
                    group: period,
                })
            }
            RetentionForm::PerKind { direct, group } => Ok(Self {
                direct: direct.parse().map_err(|e| format!("direct: {e}"))?,
                group: group.parse().map_err(|e| format!("group: {e}"))?,
            }),
        }
    }
}

/// A length of time written as `30d`, `12h`, `15m`, `90s` or `500ms`; `0` means never
/// (the feature it sets is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Period(pub std::time::Duration);

impl Period {
    /// `None` when off.
    pub fn get(self) -> Option<std::time::Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl std::str::FromStr for Period {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text == "0" {
            return Ok(Self::default());
        }
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?} has no unit (ms, s, m, h or d)"))?;
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} does not start with a number"))?;
        let millis_per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("{text:?}: the unit must be ms, s, m, h or d")),
        };
        number
            .checked_mul(millis_per)
            .map(|ms| Self(std::time::Duration::from_millis(ms)))
            .ok_or_else(|| format!("{text:?} is too long"))
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a failing or misbehaving script means for the message it was judging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Refuse the message (the default: a broken filter must not let everything through).
    Deny,
    /// Let the message through.
    Allow,
}

/// A value of the free-form `policy.config` table, handed read-only to scripts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConfigValue {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// An array.
    List(Vec<ConfigValue>),
    /// A table.
    Table(BTreeMap<String, ConfigValue>),
}

/// The Lua policy host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Scripts, run in this order; none means every message is allowed.
    pub scripts: Vec<PathBuf>,
    /// What a script error, a limit hit or a bad return value means.
    pub on_error: OnError,
    /// Lua states in the pool: how many policy calls may run at once.
    pub states: usize,
    /// Bytes of memory per Lua state.
    pub memory_limit: usize,
    /// Lua VM instructions per hook call (pattern-matching steps count too).
    pub instruction_limit: u64,
    /// CPU time one script call may take (time spent waiting for a core is not counted).
    pub call_timeout_ms: u64,
    /// How long a call may wait for a free Lua state before it follows `on_error`.
    pub queue_timeout_ms: u64,
    /// Word lists match whole words in alphabetic scripts (`heck` does not mask `heckler`);
    /// scripts without spaces between words (Chinese, Japanese) always match inside text.
    pub whole_words: bool,
    /// How often script and word-list files are checked for changes (0: only on SIGHUP).
    pub reload_interval_ms: u64,
    /// Word lists for `words.find` / `words.mask`: name → file with one word per line.
    pub words: BTreeMap<String, PathBuf>,
    /// A read-only table scripts see as `config`.
    pub config: BTreeMap<String, ConfigValue>,
}

/// A configuration that cannot be used; one line per problem, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.join("\n"))]
pub struct ConfigError {
    /// `key: what is wrong`.
    pub problems: Vec<String>,
}

impl Config {
    /// Loads defaults, then `file` (if any), then the environment, and validates the result.
    ///
    /// # Errors
    /// Every unreadable, unknown, mistyped or out-of-range key, one line each.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env = config::Environment::with_prefix("MQTT_IM")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            // MQTT_IM__POLICY__SCRIPTS=a.lua,b.lua
            .list_separator(",")
            .with_list_parse_key("policy.scripts");
        let raw = builder.add_source(env).build().map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        let mut problems = Vec::new();
        let listeners = section(&raw, "listeners", &mut problems);
        let tls = section(&raw, "tls", &mut problems);
        let broker = section(&raw, "broker", &mut problems);
        let auth = section(&raw, "auth", &mut problems);
        let store = section(&raw, "store", &mut problems);
        let im = section(&raw, "im", &mut problems);
        let policy = section(&raw, "policy", &mut problems);
        let cluster = section(&raw, "cluster", &mut problems);
        let limits = section(&raw, "limits", &mut problems);
        if let Ok(table) = raw
            .clone()
            .try_deserialize::<BTreeMap<String, config::Value>>()
        {
            for key in table.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
                problems.push(format!("{key}: unknown section"));
            }
        }
        match (
            listeners,
            tls,
            broker,
            auth,
            store,
            im,
            policy,
            (cluster, limits),
        ) {
            (
                Some(listeners),
                Some(tls),
                Some(broker),
                Some(auth),
                Some(store),
                Some(im),
                Some(policy),
                (Some(cluster), Some(limits)),
            ) if problems.is_empty() => {
                let config = Config {
                    listeners,
                    tls,
                    broker,
                    auth,
                    store,
                    im,
                    policy,
                    cluster,
                    limits,
                };
                config.validate()?;
                Ok(config)
            }
            _ => Err(ConfigError { problems }),
        }
    }

    /// Checks values that parse but cannot work.
    ///
    /// # Errors
    /// Every problem found, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_owned());
            }
        };
        let prefix = &self.im.prefix;
        check(
            !prefix.is_empty() && !prefix.contains(['/', '+', '#', '$']),
            "im.prefix: must be one topic level without '/', '+', '#' or '$'",
        );
        check(
            self.im.page_size_max >= 1,
            "im.page_size_max: must be at least 1",
        );
        check(
            (1..=self.im.page_size_max).contains(&self.im.page_size_default),
            "im.page_size_default: must be between 1 and im.page_size_max",
        );
        check(
            self.im.receipt_interval_ms >= 10,
            "im.receipt_interval_ms: at least 10",
        );
        check(
            self.im.removal_poll_ms >= 10,
            "im.removal_poll_ms: at least 10",
        );
        check(
            (1..=60_000).contains(&self.im.live_ack_flush_ms),
            "im.live_ack_flush_ms: between 1 and 60000",
        );
        check(self.im.digest_last_n <= 50, "im.digest_last_n: at most 50");
        check(
            self.im
                .gc_interval
                .get()
                .is_some_and(|every| every <= std::time::Duration::from_secs(86_400)),
            "im.gc_interval: between 1ms and 1d",
        );
        check(
            (1..=100_000).contains(&self.im.gc_batch),
            "im.gc_batch: between 1 and 100000",
        );
        // Each node marks its connected devices as seen once a round; a shorter time to live
        // would let another node's round expire them while they are connected.
        check(
            self.im.device_ttl.get().is_none_or(|ttl| {
                let rounds = self.im.gc_interval.0.checked_mul(2);
                rounds.is_some_and(|two_rounds| ttl >= two_rounds)
            }),
            "im.device_ttl: 0 or at least twice im.gc_interval",
        );
        check(
            self.im.max_message_bytes >= 64
                && self.im.max_message_bytes <= self.broker.max_packet_size,
            "im.max_message_bytes: must be between 64 and broker.max_packet_size",
        );
        check(
            self.broker.max_segment_size >= 1024,
            "broker.max_segment_size: at least 1024",
        );
        check(
            self.broker.max_segment_count >= 1,
            "broker.max_segment_count: at least 1",
        );
        check(
            self.broker.max_connections >= 1,
            "broker.max_connections: at least 1",
        );
        check(
            (1..=u16::MAX as usize).contains(&self.broker.max_inflight_count),
            "broker.max_inflight_count: between 1 and 65535",
        );
        check(
            self.broker.max_packet_size >= 1024,
            "broker.max_packet_size: at least 1024",
        );
        check(self.store.max_batch >= 1, "store.max_batch: at least 1");
        check(
            self.store.postgres.pool_size >= 1,
            "store.postgres.pool_size: at least 1",
        );
        check(
            self.store.postgres.call_timeout_ms >= 100,
            "store.postgres.call_timeout_ms: at least 100",
        );
        let schema = &self.store.postgres.schema;
        check(
            !schema.is_empty()
                && schema.len() <= 63
                && schema
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "store.postgres.schema: 1-63 characters of letters, digits and '_'",
        );
        check(
            (1..=64).contains(&self.policy.states),
            "policy.states: between 1 and 64",
        );
        check(
            self.policy.memory_limit >= 1 << 20,
            "policy.memory_limit: at least 1048576 bytes",
        );
        check(
            self.policy.instruction_limit >= 1000,
            "policy.instruction_limit: at least 1000",
        );
        check(
            (1..=10_000).contains(&self.policy.call_timeout_ms),
            "policy.call_timeout_ms: between 1 and 10000",
        );
        check(
            (1..=10_000).contains(&self.policy.queue_timeout_ms),
            "policy.queue_timeout_ms: between 1 and 10000",
        );
        check(
            self.cluster.heartbeat_ms >= 50 && self.cluster.node_ttl_ms > self.cluster.heartbeat_ms,
            "cluster.node_ttl_ms: must exceed cluster.heartbeat_ms (at least 50)",
        );
        check(
            self.cluster.redis_timeout_ms > 0,
            "cluster.redis_timeout_ms: must be at least 1",
        );
        check(
            self.cluster.node_id.len() <= 64 && !self.cluster.node_id.contains([':', ' ']),
            "cluster.node_id: at most 64 characters, no ':' or spaces",
        );
        for script in &self.policy.scripts {
            check(
                script.is_file(),
                &format!(
                    "policy.scripts: {} is not a readable file",
                    script.display()
                ),
            );
        }
        for (name, file) in &self.policy.words {
            check(
                file.is_file(),
                &format!(
                    "policy.words.{name}: {} is not a readable file",
                    file.display()
                ),
            );
        }
        check(
            self.listeners.ws_path.starts_with('/'),
            "listeners.ws_path: must start with '/'",
        );
        self.validate_tls(&mut check);
        for user in self.auth.users.keys() {
            // Any MQTT username; one that is no IM uid connects without IM (see auth.uid_from).
            check(
                !user.is_empty() && user.len() <= usize::from(u16::MAX),
                "auth.users: a username must be 1-65535 bytes",
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

impl Config {
    /// Certificate files must be there when a TLS listener or client certificates need them.
    fn validate_tls(&self, check: &mut impl FnMut(bool, &str)) {
        let tls = &self.tls;
        if self.listeners.use_tls() {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                check(
                    path.is_file(),
                    &format!(
                        "{key}: {:?} is not a readable file (needed by listeners.tls/wss)",
                        path.display().to_string()
                    ),
                );
            }
        }
        if tls.client_auth != ClientAuth::None {
            check(
                tls.client_ca.is_file(),
                &format!(
                    "tls.client_ca: {:?} is not a readable file (needed by tls.client_auth)",
                    tls.client_ca.display().to_string()
                ),
            );
        }
    }
}

const SECTIONS: [&str; 9] = [
    "listeners",
    "tls",
    "broker",
    "auth",
    "store",
    "im",
    "policy",
    "cluster",
    "limits",
];

fn section<T: DeserializeOwned>(
    raw: &config::Config,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    match raw.get::<T>(key) {
        Ok(value) => Some(value),
        Err(e) => {
            problems.push(format!("{key}: {e}"));
            None
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        // The embedded defaults are part of the binary and covered by a unit test.
        #[allow(clippy::expect_used)]
        Self::load(None).expect("built-in defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn defaults_are_valid() {
        let config = Config::default();
        assert_eq!(config.im.prefix, "im");
        assert_eq!(config.store.backend, Backend::Embedded);
    }

    #[test]
    fn periods_read_with_their_unit() {
        let ms = |text: &str| text.parse::<Period>().map(|p| p.0.as_millis());
        assert_eq!(ms("30d"), Ok(30 * 86_400_000));
        assert_eq!(ms("2s"), Ok(2_000));
        assert_eq!(ms("250ms"), Ok(250));
        assert_eq!(ms("0"), Ok(0));
        assert!(ms("30").unwrap_err().contains("no unit"));
        assert!(ms("3w").unwrap_err().contains("unit must be"));
        assert!(ms("d").is_err());
        let config = Config::default();
        assert_eq!(
            config.im.retention.direct.get(),
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        assert_eq!(Period::default().get(), None);
    }

    #[test]
    fn retention_is_one_period_or_one_per_kind() {
        let load = |toml: &str| {
            let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
            writeln!(file, "{toml}").unwrap();
            Config::load(Some(file.path())).map(|c| c.im.retention)
        };
        let day = Some(std::time::Duration::from_secs(86_400));
        let both = load("[im]\nretention = \"1d\"").unwrap();
        assert_eq!((both.direct.get(), both.group.get()), (day, day));
        let split = load("[im.retention]\ngroup = \"1d\"").unwrap();
        assert_eq!(split.group.get(), day);
        assert_eq!(
            split.direct.get(),
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        let err = load("[im]\nretention = \"1w\"").unwrap_err();
        assert!(err.problems[0].contains("the unit must be"), "{err}");
        let err = load("[im.retention]\ngroup = \"x\"").unwrap_err();
        assert!(err.problems[0].contains("group: \"x\""), "{err}");
        // Huge periods are refused or saturate, never overflow.
        let mut config = Config::default();
        config.im.gc_interval = "106751991167d".parse().unwrap();
        config.im.device_ttl = "106751991167d".parse().unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.problems[0].starts_with("im.gc_interval:"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        writeln!(
            file,
            "[im]\nprefix = \"a/b\"\npage_size_default = 500\n[store]\nbogus = 1\n[nope]\nx = 1"
        )
        .unwrap();
        let err = Config::load(Some(file.path())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("store:"), "{text}");
        assert!(text.contains("nope: unknown section"), "{text}");
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        writeln!(file, "[im]\nprefix = \"a/b\"\npage_size_default = 500").unwrap();
        let err = Config::load(Some(file.path())).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.problems[0].starts_with("im.prefix:"));
        assert!(err.problems[1].starts_with("im.page_size_default:"));
    }
}
