//! One configuration tree: built-in defaults, then an optional TOML file, then environment
//! variables `MQTT_IM__SECTION__KEY`. Each section is defined and checked by the layer it
//! configures; this module holds the defaults, the loading and the list of sections, and
//! reports every problem at once, one line per key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use crate::auth::settings::{
    AclSubscribe, HttpAuthSettings, JwtFrom, JwtSettings, PostgresAuthSettings, ProviderOutage,
    ProviderSettings, Settings as AuthSettings, UidSource,
};
pub use crate::broker::Settings as BrokerSettings;
pub use crate::edge::{DeviceOverflow, LimitSettings};
pub use crate::hook::OnError;
pub use crate::im::settings::{ClusterSettings, RetentionSettings, Settings as ImSettings};
pub use crate::listener::{ClientAuth, Settings as Listeners, TlsSettings};
pub use crate::policy::settings::{ConfigValue, Settings as PolicySettings};
pub use crate::push::settings::Settings as PushSettings;
pub use crate::settings::{Period, Problems};
pub use crate::store::settings::{Backend, PostgresSettings, Settings as StoreSettings};

/// The built-in defaults, also the reference for every key. Times are periods (`500ms`,
/// `30s`, `7d`; `0` is off).
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
connect_timeout = "5s"

[auth]
allow_anonymous = false
uid_from = "username"
plaintext = false
reload_interval = "1s"

[auth.users]

[store]
backend = "embedded"
path = "data/mqtt-im.db"
max_batch = 512

[store.postgres]
url = "postgres://postgres@127.0.0.1:5432/postgres"
schema = "public"
pool_size = 16
connect_timeout = "3s"
call_timeout = "5s"

[im]
prefix = "im"
digest_last_n = 3
page_size_default = 20
page_size_max = 200
max_message_bytes = 65536
receipt_interval = "1s"
removal_poll = "500ms"
live_ack_flush = "50ms"
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
redis_cluster = false
node_id = ""
key_prefix = "mqtt-im"
heartbeat = "1s"
node_ttl = "5s"
redis_timeout = "500ms"

[policy]
scripts = []
on_error = "deny"
states = 2
memory_limit = 8388608
instruction_limit = 1000000
call_timeout = "20ms"
queue_timeout = "1s"
whole_words = true
reload_interval = "1s"

[policy.words]

[policy.config]

# Offline push through gateways speaking the Matrix Push Gateway API: the notify URLs pushers
# may name, each compared whole (e.g. "http://sygnal:5000/_matrix/push/v1/notify"; empty: push
# is off); whether pushers may ask for the sender and text in notifications; pushers per device;
# the wait a read or connect cancels; one notification per user and conversation per
# coalescing window; a gateway call's deadline; owed notifications kept while gateways are
# down (beyond, the oldest are dropped and counted).
[push]
allowed_urls = []
allow_content = false
max_pushers_per_device = 5
delay = "2s"
coalesce = "30s"
timeout = "5s"
max_pending = 100000
"#;

/// Everything mqtt-im reads at start-up, one section per layer.
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
    /// Offline push through the teams' push gateways.
    pub push: PushSettings,
}

/// A configuration that cannot be used; one line per problem, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.join("\n"))]
pub struct ConfigError {
    /// `key: what is wrong`.
    pub problems: Vec<String>,
}

impl From<Problems> for ConfigError {
    fn from(problems: Problems) -> Self {
        Self {
            problems: problems.into_lines(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (if any), then the environment, and validates the result:
    /// the one place that reads the process's environment and files.
    ///
    /// # Errors
    /// Every unreadable, unknown, mistyped or out-of-range key, one line each.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            let file = config::File::from(path).required(true);
            builder = builder.add_source(legacy::Renamed(file));
        }
        let env = config::Environment::with_prefix("MQTT_IM")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            // MQTT_IM__POLICY__SCRIPTS=a.lua,b.lua
            .list_separator(",")
            .with_list_parse_key("policy.scripts")
            .with_list_parse_key("push.allowed_urls");
        let raw = builder
            .add_source(legacy::Renamed(env))
            .build()
            .map_err(|e| ConfigError {
                problems: vec![e.to_string()],
            })?;
        let config = Self::from_tree(&raw)?;
        config.validate()?;
        Ok(config)
    }

    /// The sections of a merged tree, or every section that does not deserialize.
    fn from_tree(raw: &config::Config) -> Result<Self, ConfigError> {
        let mut problems = Problems::default();
        if let Ok(table) = raw
            .clone()
            .try_deserialize::<BTreeMap<String, config::Value>>()
        {
            for key in table.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
                problems.push(format!("{key}: unknown section"));
            }
        }
        let sections = (
            section(raw, "listeners", &mut problems),
            section(raw, "tls", &mut problems),
            section(raw, "broker", &mut problems),
            section(raw, "auth", &mut problems),
            section(raw, "store", &mut problems),
            section(raw, "im", &mut problems),
            section(raw, "policy", &mut problems),
            section(raw, "cluster", &mut problems),
            section(raw, "limits", &mut problems),
            section(raw, "push", &mut problems),
        );
        match sections {
            (
                Some(listeners),
                Some(tls),
                Some(broker),
                Some(auth),
                Some(store),
                Some(im),
                Some(policy),
                Some(cluster),
                Some(limits),
                Some(push),
            ) if problems.is_empty() => Ok(Config {
                listeners,
                tls,
                broker,
                auth,
                store,
                im,
                policy,
                cluster,
                limits,
                push,
            }),
            _ => Err(problems.into()),
        }
    }

    /// Checks values that parse but cannot work (files named must be there), each section
    /// by its own layer's rules.
    ///
    /// # Errors
    /// Every problem found, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.listeners.check(&self.tls, &mut problems);
        self.broker.check(&mut problems);
        self.auth.check(&mut problems);
        self.store.check(&mut problems);
        self.im.check(&mut problems);
        self.policy.check(&mut problems);
        self.cluster.check(&mut problems);
        self.push.check(&mut problems);
        problems.check(
            self.im.max_message_bytes <= self.broker.max_packet_size,
            "im.max_message_bytes: must not exceed broker.max_packet_size",
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.into())
        }
    }
}

const SECTIONS: [&str; 10] = [
    "listeners",
    "tls",
    "broker",
    "auth",
    "store",
    "im",
    "policy",
    "cluster",
    "limits",
    "push",
];

fn section<T: DeserializeOwned>(
    raw: &config::Config,
    key: &str,
    problems: &mut Problems,
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
    /// The built-in defaults alone: nothing from the environment, no file looked at.
    fn default() -> Self {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build();
        let config = raw.map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        });
        // The defaults are part of the binary and covered by a unit test.
        #[allow(clippy::expect_used)]
        config
            .and_then(|raw| Self::from_tree(&raw))
            .expect("built-in defaults are valid")
    }
}

mod legacy;

#[cfg(test)]
mod tests;
