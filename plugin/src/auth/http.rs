//! The `http` provider: the team's auth service decides. Each CONNECT is POSTed as JSON
//! (`client_id`, `username`, `password`, `peer`, `protocol`, `transport`) over pooled
//! keep-alive connections with a deadline; the answer is `{"result": "allow" | "deny" |
//! "next", "uid"?, "is_superuser"?, "acl"?}` (HTTP 204 alone means allow). Answers are cached
//! for `cache_ttl` per client id, username and password. When the service cannot answer,
//! `on_error` decides: `deny` (the default) or `next`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::cache::TtlCache;
use super::settings::{HttpAuthSettings, ProviderOutage};
use super::{AuthError, Credentials, Grant, Provider, Refusal, Verdict};

/// Largest answer read from the service.
const MAX_ANSWER: usize = 64 * 1024;

/// The service's answer.
#[derive(Debug, Deserialize)]
struct Answer {
    result: String,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    is_superuser: bool,
    #[serde(default)]
    acl: Option<serde_json::Value>,
}

/// A configured auth service.
pub(super) struct Http {
    settings: HttpAuthSettings,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Answers by a digest of client id, username and password.
    cache: TtlCache<[u8; 32], Verdict>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("url", &self.settings.url)
            .finish_non_exhaustive()
    }
}

impl Http {
    pub(super) fn new(settings: &HttpAuthSettings) -> Result<Self, AuthError> {
        let uri: hyper::Uri = settings.url.parse().map_err(|_| {
            AuthError::Unavailable("auth.providers http: url does not parse".into())
        })?;
        if uri.scheme_str() != Some("http") {
            return Err(AuthError::Unavailable(
                "auth.providers http: only http:// URLs (put TLS in a local proxy)".into(),
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.timeout.0));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            settings: settings.clone(),
            client,
            cache: TtlCache::new(settings.cache_ttl.0),
        })
    }

    /// What identifies one login for the cache (the password only as part of a digest).
    fn cache_key(credentials: &Credentials) -> [u8; 32] {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            credentials.client_id.as_bytes(),
            credentials
                .username
                .as_deref()
                .unwrap_or_default()
                .as_bytes(),
            credentials.password.as_deref().unwrap_or_default(),
        ] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(context.finish().as_ref());
        key
    }

    async fn ask(&self, credentials: &Credentials) -> Result<Verdict, AuthError> {
        let body = serde_json::json!({
            "client_id": credentials.client_id,
            "username": credentials.username,
            "password": credentials.password.as_deref().map(String::from_utf8_lossy),
            "peer": credentials.peer.to_string(),
            "protocol": credentials.protocol.name(),
            "transport": credentials.transport.as_str(),
        });
        let mut request = hyper::Request::post(&self.settings.url)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (name, value) in &self.settings.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|_| AuthError::Unavailable("auth request could not be built".into()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| AuthError::Unavailable(format!("auth service: {e}")))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|_| AuthError::Unavailable("auth service answer unreadable".into()))?
                .to_bytes();
            Ok::<_, AuthError>((status, body))
        };
        let deadline = self.settings.timeout.0;
        let (status, body) = tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| AuthError::Timeout(deadline))??;
        match status.as_u16() {
            204 => Ok(Verdict::Allow(Grant::default())),
            200 => verdict_from(&body),
            other => Err(AuthError::Unavailable(format!(
                "auth service answered HTTP {other}"
            ))),
        }
    }
}

fn verdict_from(body: &[u8]) -> Result<Verdict, AuthError> {
    let answer: Answer = serde_json::from_slice(body).map_err(|_| {
        AuthError::Unavailable("auth service answer is not the expected JSON".into())
    })?;
    match answer.result.as_str() {
        "allow" => {
            let acl = match &answer.acl {
                Some(rules) => {
                    Some(super::acl::rules_from_json(rules).map_err(AuthError::Unavailable)?)
                }
                None => None,
            };
            Ok(Verdict::Allow(Grant {
                uid: answer.uid,
                superuser: answer.is_superuser,
                acl,
                expires: None,
            }))
        }
        "deny" => Ok(Verdict::Deny(Refusal::BadCredentials)),
        "next" | "ignore" => Ok(Verdict::Next),
        _ => Err(AuthError::Unavailable(
            "auth service result is not allow, deny or next".into(),
        )),
    }
}

#[async_trait::async_trait]
impl Provider for Http {
    fn name(&self) -> &'static str {
        "http"
    }

    fn outage(&self) -> ProviderOutage {
        self.settings.on_error
    }

    async fn check(&self, credentials: &Credentials) -> Result<Verdict, AuthError> {
        let key = Self::cache_key(credentials);
        if let Some(verdict) = self.cache.get(&key) {
            return Ok(verdict);
        }
        let verdict = self.ask(credentials).await?;
        self.cache.put(key, verdict.clone());
        Ok(verdict)
    }
}
