//! The `[auth]` section: the provider chain, its files and the topic ACL file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{Period, Problems, DAY};

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
pub struct Settings {
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
    /// How often password, ACL and JWKS files are checked for changes (0: only on SIGHUP).
    pub reload_interval: Period,
    /// A Mosquitto `acl_file` for non-IM topics; none: every client may use every non-IM
    /// topic.
    #[serde(default)]
    pub acl_file: Option<PathBuf>,
    /// How a SUBSCRIBE the topic ACL does not wholly grant is answered; none: as the rules'
    /// origin expects (`filter` under an `acl_file`, as Mosquitto does; `refuse` under rules
    /// an identity brings, as EMQX and VerneMQ do).
    #[serde(default)]
    pub acl_subscribe: Option<AclSubscribe>,
}

/// What a SUBSCRIBE to a filter the topic ACL does not wholly grant gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AclSubscribe {
    /// Granted; only the messages the client may read are delivered (retained ones too),
    /// as Mosquitto does with its `acl_file`.
    Filter,
    /// Refused (SUBACK 0x87 / 0x80), as EMQX and VerneMQ do.
    Refuse,
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
    #[serde(default = "default_timeout")]
    pub timeout: Period,
    /// How long a row (or its absence) is reused (0: never).
    #[serde(default)]
    pub cache_ttl: Period,
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
    #[serde(default = "default_timeout")]
    pub timeout: Period,
    /// How long an answer is reused for the same client id, username and password (0: never).
    #[serde(default)]
    pub cache_ttl: Period,
    /// Extra request headers (e.g. the service's own credentials).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// What an unreachable or failing service means.
    #[serde(default)]
    pub on_error: ProviderOutage,
}

fn default_timeout() -> Period {
    Period::millis(2000)
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
    /// Clock skew allowed on `exp` and `nbf` (whole seconds).
    #[serde(default)]
    pub leeway: Period,
}

fn default_uid_claim() -> String {
    "sub".into()
}

impl Settings {
    /// Values that parse but cannot work.
    pub fn check(&self, problems: &mut Problems) {
        problems.within(
            "auth.reload_interval",
            self.reload_interval,
            Duration::ZERO,
            DAY,
        );
        for user in self.users.keys() {
            // Any MQTT username; one that is no IM uid connects without IM (see uid_from).
            problems.check(
                !user.is_empty() && user.len() <= usize::from(u16::MAX),
                "auth.users: a username must be 1-65535 bytes",
            );
        }
        for (index, provider) in self.providers.iter().enumerate() {
            provider.check(&format!("auth.providers[{index}]"), problems);
        }
    }
}

impl ProviderSettings {
    fn check(&self, key: &str, problems: &mut Problems) {
        let (timeout, cache_ttl) = match self {
            Self::Http(http) => (http.timeout, http.cache_ttl),
            Self::Postgres(table) => (table.timeout, table.cache_ttl),
            Self::Jwt(jwt) => {
                problems.within(&format!("{key}.leeway"), jwt.leeway, Duration::ZERO, DAY);
                return;
            }
            Self::Users | Self::PasswordFile { .. } | Self::Lua => return,
        };
        let ms = Duration::from_millis(1);
        problems.within(&format!("{key}.timeout"), timeout, ms, DAY);
        problems.within(&format!("{key}.cache_ttl"), cache_ttl, Duration::ZERO, DAY);
    }
}
