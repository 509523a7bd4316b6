//! Who may connect: an ordered chain of providers (`[[auth.providers]]`), each answering
//! allow, deny or "not mine, ask the next", as EMQX's authentication chain does. Teams bring
//! their credentials as they keep them: the config's users table, a Mosquitto password file,
//! and their topic ACLs as a Mosquitto `acl_file` ([`acl`]).
//! Slow work (password hashing) runs on threads of its own with a deadline, so a CONNECT
//! storm never holds other connections.

pub mod acl;
mod cache;
pub mod hash;
mod http;
mod jwt;
mod password_file;
mod postgres;
mod script;
pub mod settings;
mod users;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::domain::{ListenerKind, Protocol};

use crate::watch::Watched;
use hash::StoredHash;
pub use password_file::PasswordFile;
pub use settings::AclSubscribe;
use settings::{ProviderOutage, ProviderSettings, Settings as AuthSettings, UidSource};

/// What a client presented in its CONNECT, and where from.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The client id (assigned, if the client sent an empty one).
    pub client_id: String,
    /// The CONNECT's username, if any.
    pub username: Option<String>,
    /// The CONNECT's password, if any (binary in MQTT 5).
    pub password: Option<Vec<u8>>,
    /// The client's address.
    pub peer: SocketAddr,
    /// `3.1.1` or `5`.
    pub protocol: Protocol,
    /// The listener kind: `mqtt`, `tls`, `ws`, `wss`.
    pub transport: ListenerKind,
}

/// What a provider grants an allowed client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// The identity to use instead of the one `auth.uid_from` names.
    pub uid: Option<String>,
    /// Bypasses topic ACLs for non-IM topics.
    pub superuser: bool,
    /// Topic rules for this client, checked before `auth.acl_file`.
    pub acl: Option<Vec<acl::Rule>>,
    /// When the credentials stop being valid: the connection is closed then.
    pub expires: Option<std::time::SystemTime>,
}

/// A provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted, with what the provider grants.
    Allow(Grant),
    /// Refused; later providers are not asked.
    Deny(Refusal),
    /// Not this provider's client: the next one decides.
    Next,
}

/// Why a CONNECT is refused; each maps to a CONNACK code and a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong password.
    BadCredentials,
    /// Known, but not allowed (no credentials where some are required, a certificate for
    /// someone else).
    NotAuthorized,
    /// A provider could not answer (timeout, backend down) and its outage mode is `deny`.
    Unavailable,
}

impl Refusal {
    /// The `reason` label of `mqtt_im_auth_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadCredentials => "bad_credentials",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::Unavailable => "unavailable",
        }
    }
}

/// Who the client is, once admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The IM uid if it is a valid one; any text otherwise (the client then has no IM).
    pub uid: String,
    /// Bypasses topic ACLs for non-IM topics.
    pub superuser: bool,
    /// The provider's topic rules for this client, if it gave any.
    pub acl: Option<Vec<acl::Rule>>,
    /// When the credentials expire.
    pub expires: Option<std::time::SystemTime>,
}

/// A provider that could not answer.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A password check outlived its deadline.
    #[error("password check took longer than {0:?}")]
    Timeout(Duration),
    /// The provider's backend could not answer.
    #[error("{0}")]
    Unavailable(String),
    /// A credentials file could not be read or parsed.
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: String,
        /// What is wrong, with the line.
        problem: String,
    },
    /// A users table entry is no usable hash.
    #[error("auth.users.{user}: {source}")]
    BadHash {
        /// The username.
        user: String,
        /// Why the hash is unusable.
        source: hash::HashError,
    },
}

/// One link of the chain.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// The provider's kind, for logs.
    fn name(&self) -> &'static str;
    /// Decides about `credentials`, or fails (the chain then applies [`Provider::outage`]).
    async fn check(&self, credentials: &Credentials) -> Result<Verdict, AuthError>;
    /// What a failure means: refuse the client (the default) or ask the next provider.
    fn outage(&self) -> ProviderOutage {
        ProviderOutage::Deny
    }
}

/// Password checks off the async workers: at most one per core at a time, each with a
/// deadline; a check that waits longer fails as unavailable.
#[derive(Debug)]
pub(crate) struct Hashing {
    permits: Arc<Semaphore>,
    deadline: Duration,
}

impl Hashing {
    fn new(deadline: Duration) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            permits: Arc::new(Semaphore::new(cores)),
            deadline,
        }
    }

    /// Whether `password` matches `stored`; cheap formats are checked inline.
    pub(crate) async fn verify(
        &self,
        stored: &Arc<StoredHash>,
        password: &[u8],
    ) -> Result<bool, AuthError> {
        if matches!(
            **stored,
            StoredHash::Plain(_) | StoredHash::MosquittoSha512 { .. }
        ) {
            return Ok(stored.verify(password));
        }
        let work = async {
            let permit = Arc::clone(&self.permits)
                .acquire_owned()
                .await
                .map_err(|_| AuthError::Unavailable("shutting down".into()))?;
            let (stored, password) = (Arc::clone(stored), password.to_vec());
            // The permit stays with the check, so one abandoned at its deadline still counts
            // until it finishes: never more checks at once than cores.
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                stored.verify(&password)
            })
            .await
            .map_err(|_| AuthError::Unavailable("password check failed".into()))
        };
        tokio::time::timeout(self.deadline, work)
            .await
            .map_err(|_| AuthError::Timeout(self.deadline))?
    }
}

/// The configured chain.
pub struct Authenticator {
    providers: Vec<Arc<dyn Provider>>,
    reloads: Vec<Arc<Watched>>,
    acl: Option<Arc<acl::AclFile>>,
    acl_subscribe: Option<AclSubscribe>,
    allow_anonymous: bool,
    uid_from: UidSource,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.providers.iter().map(|p| p.name()).collect();
        f.debug_struct("Authenticator")
            .field("providers", &names)
            .field("acl", &self.acl.as_ref().map(|acl| acl.path()))
            .finish_non_exhaustive()
    }
}

/// `path` as a watched file of kind `what`, re-read by `reload`.
fn watched(
    path: &std::path::Path,
    what: &'static str,
    reload: impl Fn() -> bool + Send + Sync + 'static,
) -> Arc<Watched> {
    Arc::new(Watched {
        files: vec![path.to_owned()],
        what,
        reload: Arc::new(reload),
    })
}

/// Provider failures are logged once per burst (an outage is one line, not one per CONNECT).
static PROVIDER_FAILED: crate::throttle::Throttle = crate::throttle::Throttle::new();

/// Longest a password check may take (queueing for a core included).
const HASH_DEADLINE: Duration = Duration::from_secs(5);

impl Authenticator {
    /// Builds the chain; an empty `auth.providers` means the users table alone. `scripts`
    /// serve `type = "lua"` (without them, as in `check-config`, that link is left out).
    pub fn new(
        settings: &AuthSettings,
        scripts: Option<Arc<dyn crate::policy::Policy>>,
    ) -> Result<Self, AuthError> {
        let hashing = Arc::new(Hashing::new(HASH_DEADLINE));
        let configured = if settings.providers.is_empty() {
            vec![ProviderSettings::Users]
        } else {
            settings.providers.clone()
        };
        let mut reloads: Vec<Arc<Watched>> = Vec::new();
        let mut providers: Vec<Arc<dyn Provider>> = Vec::with_capacity(configured.len());
        for provider in &configured {
            match provider {
                ProviderSettings::Users => {
                    providers.push(Arc::new(users::Users::new(settings, Arc::clone(&hashing))?));
                }
                ProviderSettings::PasswordFile { path } => {
                    let file = Arc::new(PasswordFile::open(path, Arc::clone(&hashing))?);
                    let reloaded = Arc::clone(&file);
                    reloads.push(watched(path, "password_file", move || reloaded.reload()));
                    providers.push(file);
                }
                ProviderSettings::Lua => {
                    if let Some(policy) = &scripts {
                        let policy = Arc::clone(policy);
                        providers.push(Arc::new(script::Script { policy }));
                    }
                }
                ProviderSettings::Http(http) => providers.push(Arc::new(http::Http::new(http)?)),
                ProviderSettings::Postgres(table) => providers.push(Arc::new(
                    postgres::Postgres::new(table, Arc::clone(&hashing))?,
                )),
                ProviderSettings::Jwt(jwt) => {
                    let jwt = Arc::new(jwt::Jwt::new(jwt)?);
                    if let Some(path) = jwt.jwks_file() {
                        let reloaded = Arc::clone(&jwt);
                        reloads.push(watched(path, "jwks_file", move || reloaded.reload()));
                    }
                    providers.push(jwt);
                }
            }
        }
        let acl = match &settings.acl_file {
            Some(path) => {
                let file = Arc::new(acl::AclFile::open(path)?);
                let reloaded = Arc::clone(&file);
                reloads.push(watched(path, "acl_file", move || reloaded.reload()));
                Some(file)
            }
            None => None,
        };
        Ok(Self {
            providers,
            reloads,
            acl,
            acl_subscribe: settings.acl_subscribe,
            allow_anonymous: settings.allow_anonymous,
            uid_from: settings.uid_from,
        })
    }

    /// The files the chain reads (password, ACL and JWKS files), each with what re-reads it
    /// when it changes.
    pub(crate) fn reloads(&self) -> &[Arc<Watched>] {
        &self.reloads
    }

    /// The topic ACL for non-IM topics, if one is configured.
    pub fn acl(&self) -> Option<&Arc<acl::AclFile>> {
        self.acl.as_ref()
    }

    /// `auth.acl_subscribe`, if set.
    pub fn acl_subscribe(&self) -> Option<AclSubscribe> {
        self.acl_subscribe
    }

    /// Runs the chain. A verified client certificate's common name is the identity and needs
    /// no password; a username that names someone else is refused rather than ignored.
    pub async fn authenticate(
        &self,
        credentials: &Credentials,
        certified: Option<&str>,
    ) -> Result<Identity, Refusal> {
        if let Some(common_name) = certified {
            if credentials
                .username
                .as_deref()
                .is_some_and(|u| u != common_name)
            {
                return Err(Refusal::NotAuthorized);
            }
            return Ok(Identity {
                uid: common_name.to_owned(),
                superuser: false,
                acl: None,
                expires: None,
            });
        }
        if credentials.username.is_none() {
            return if self.allow_anonymous {
                Ok(self.identity(credentials, Grant::default()))
            } else {
                Err(Refusal::NotAuthorized)
            };
        }
        for provider in &self.providers {
            match provider.check(credentials).await {
                Ok(Verdict::Allow(grant)) => return Ok(self.identity(credentials, grant)),
                Ok(Verdict::Deny(refusal)) => return Err(refusal),
                Ok(Verdict::Next) => {}
                Err(e) => {
                    PROVIDER_FAILED.admit().inspect(|also| {
                        tracing::warn!(provider = provider.name(), error = %e, also_since_last = also, "authentication provider failed");
                    });
                    if provider.outage() == ProviderOutage::Deny {
                        return Err(Refusal::Unavailable);
                    }
                }
            }
        }
        Err(Refusal::BadCredentials)
    }

    /// Admits without checking credentials, as a rumqttd listener without an `auth` table
    /// does: the uid is a verified certificate's common name, or follows `auth.uid_from`.
    pub fn admit_anyone(&self, credentials: &Credentials, certified: Option<&str>) -> Identity {
        let grant = Grant {
            uid: certified.map(str::to_owned),
            ..Grant::default()
        };
        self.identity(credentials, grant)
    }

    fn identity(&self, credentials: &Credentials, grant: Grant) -> Identity {
        let uid =
            grant
                .uid
                .unwrap_or_else(|| match (self.uid_from, credentials.username.as_deref()) {
                    (UidSource::Username, Some(username)) => username.to_owned(),
                    _ => credentials.client_id.clone(),
                });
        Identity {
            uid,
            superuser: grant.superuser,
            acl: grant.acl,
            expires: grant.expires,
        }
    }
}

/// A user's stored hash checked against a password: allow, or deny as bad credentials.
async fn judge(
    hashing: &Hashing,
    stored: Option<Arc<StoredHash>>,
    password: Option<&[u8]>,
) -> Result<Verdict, AuthError> {
    let Some(stored) = stored else {
        return Ok(Verdict::Next);
    };
    let password = password.unwrap_or_default();
    Ok(if hashing.verify(&stored, password).await? {
        Verdict::Allow(Grant::default())
    } else {
        Verdict::Deny(Refusal::BadCredentials)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(username: Option<&str>, password: &str) -> Credentials {
        Credentials {
            client_id: "c1".into(),
            username: username.map(str::to_owned),
            password: Some(password.as_bytes().to_vec()),
            peer: "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!()),
            protocol: Protocol::V5,
            transport: ListenerKind::Tcp,
        }
    }

    fn settings() -> AuthSettings {
        let mut settings = crate::config::Config::default().auth;
        settings.users.insert(
            "alice".into(),
            hash::hash_password("pw").unwrap_or_default(),
        );
        settings
    }

    #[tokio::test]
    async fn users_table_decides_and_certificates_name_the_uid() {
        let chain = Authenticator::new(&settings(), None).unwrap_or_else(|e| panic!("{e}"));
        let ok = chain
            .authenticate(&credentials(Some("alice"), "pw"), None)
            .await;
        assert_eq!(ok.map(|i| i.uid), Ok("alice".into()));
        let wrong = chain
            .authenticate(&credentials(Some("alice"), "no"), None)
            .await;
        assert_eq!(wrong, Err(Refusal::BadCredentials));
        let unknown = chain
            .authenticate(&credentials(Some("eve"), "pw"), None)
            .await;
        assert_eq!(unknown, Err(Refusal::BadCredentials));
        let anonymous = chain.authenticate(&credentials(None, ""), None).await;
        assert_eq!(anonymous, Err(Refusal::NotAuthorized));
        let dave = chain
            .authenticate(&credentials(None, ""), Some("dave"))
            .await;
        assert_eq!(dave.map(|i| i.uid), Ok("dave".into()));
        let impostor = chain
            .authenticate(&credentials(Some("alice"), "pw"), Some("dave"))
            .await;
        assert_eq!(impostor, Err(Refusal::NotAuthorized));
    }
}
