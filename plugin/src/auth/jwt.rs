//! The `jwt` provider: the CONNECT's password (or username) is a JWT from the team's
//! identity service. HS256 with a shared secret, RS256/ES256 with a PEM public key or a JWKS
//! file (re-read on change); `exp`, `nbf`, `iss` and `aud` are checked; a claim names the uid,
//! an optional claim carries topic ACL rules (`{"pub": [...], "sub": [...], "all": [...],
//! "deny": [...]}`, `%u`/`%c` allowed), and the connection ends when the token expires.
//! A credential that is not shaped like a JWT is the next provider's.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::acl;
use super::settings::{JwtFrom, JwtSettings};
use super::{AuthError, Credentials, Grant, Provider, Refusal, Verdict};

/// Keys to check signatures with.
enum Keys {
    /// One key (a secret or a PEM public key).
    Single(DecodingKey),
    /// A JWKS file, keys chosen by the token's `kid`.
    Set(JwkSet),
}

/// A configured JWT provider.
pub(super) struct Jwt {
    settings: JwtSettings,
    algorithm: Algorithm,
    keys: RwLock<Keys>,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

fn file_problem(path: &Path, problem: impl ToString) -> AuthError {
    AuthError::File {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

impl Jwt {
    pub(super) fn new(settings: &JwtSettings) -> Result<Self, AuthError> {
        let algorithm = match settings.algorithm.as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(AuthError::Unavailable(format!(
                    "auth.providers jwt: algorithm {other:?} (HS256, RS256 or ES256)"
                )))
            }
        };
        let keys = load_keys(settings, algorithm)?;
        Ok(Self {
            settings: settings.clone(),
            algorithm,
            keys: RwLock::new(keys),
        })
    }

    /// The JWKS file, if keys come from one (it is re-read when it changes).
    pub(super) fn jwks_file(&self) -> Option<&PathBuf> {
        self.settings.jwks_file.as_ref()
    }

    /// Re-reads the JWKS file, keeping the old keys if it no longer parses; `true` when the
    /// new keys are in use.
    pub(super) fn reload(&self) -> bool {
        match load_keys(&self.settings, self.algorithm) {
            Ok(keys) => {
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
                tracing::info!("JWKS file loaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS file not reloaded; keeping the last good one");
                false
            }
        }
    }

    fn validation(&self) -> Validation {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = self.settings.leeway.0.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims = ["exp".to_owned()].into();
        match &self.settings.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        validation
    }

    /// The claims of a valid token, or why it is refused.
    fn verify(&self, token: &str) -> Result<serde_json::Map<String, Value>, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let key = match &*keys {
            Keys::Single(key) => key.clone(),
            Keys::Set(set) => {
                let jwk = match &header.kid {
                    Some(kid) => set.find(kid),
                    None => set.keys.first(),
                }
                .ok_or("no key for the token's kid")?;
                DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?
            }
        };
        drop(keys);
        jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &self.validation())
            .map(|data| data.claims)
            .map_err(|e| e.to_string())
    }

    fn grant(&self, claims: &serde_json::Map<String, Value>) -> Result<Grant, String> {
        let uid = match claims.get(&self.settings.uid_claim) {
            Some(Value::String(uid)) => Some(uid.clone()),
            None => None,
            Some(_) => return Err(format!("claim {} is not a string", self.settings.uid_claim)),
        };
        let acl = match self.settings.acl_claim.as_ref().and_then(|c| claims.get(c)) {
            Some(rules) => Some(acl::rules_from_json(rules)?),
            None => None,
        };
        let expires = claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|exp| UNIX_EPOCH + Duration::from_secs(exp));
        let superuser = self
            .settings
            .superuser_claim
            .as_ref()
            .and_then(|c| claims.get(c))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Grant {
            uid,
            superuser,
            acl,
            expires,
        })
    }
}

fn load_keys(settings: &JwtSettings, algorithm: Algorithm) -> Result<Keys, AuthError> {
    if let Some(path) = &settings.jwks_file {
        let text = std::fs::read_to_string(path).map_err(|e| file_problem(path, e))?;
        let set: JwkSet = serde_json::from_str(&text).map_err(|e| file_problem(path, e))?;
        return Ok(Keys::Set(set));
    }
    if let Some(path) = &settings.public_key {
        let pem = std::fs::read(path).map_err(|e| file_problem(path, e))?;
        let key = match algorithm {
            Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
            _ => DecodingKey::from_rsa_pem(&pem),
        }
        .map_err(|e| file_problem(path, e))?;
        return Ok(Keys::Single(key));
    }
    match &settings.secret {
        Some(secret) if algorithm == Algorithm::HS256 && !secret.is_empty() => {
            Ok(Keys::Single(DecodingKey::from_secret(secret.as_bytes())))
        }
        _ => Err(AuthError::Unavailable(
            "auth.providers jwt: needs `secret` (HS256), `public_key` or `jwks_file`".into(),
        )),
    }
}

/// Whether `text` is shaped like a compact JWS (three base64url parts).
fn looks_like_jwt(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    parts.len() == 3
        && parts.iter().take(2).all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[async_trait::async_trait]
impl Provider for Jwt {
    fn name(&self) -> &'static str {
        "jwt"
    }

    async fn check(&self, credentials: &Credentials) -> Result<Verdict, AuthError> {
        let token = match self.settings.from {
            JwtFrom::Password => credentials
                .password
                .as_deref()
                .and_then(|p| std::str::from_utf8(p).ok()),
            JwtFrom::Username => credentials.username.as_deref(),
        };
        let Some(token) = token.filter(|t| looks_like_jwt(t)) else {
            return Ok(Verdict::Next);
        };
        let verdict = self
            .verify(token)
            .and_then(|claims| self.grant(&claims))
            .map_or_else(
                |why| {
                    tracing::debug!(reason = %crate::text::clean(&why, 200), "JWT refused");
                    Verdict::Deny(Refusal::BadCredentials)
                },
                Verdict::Allow,
            );
        if let Verdict::Allow(Grant {
            expires: Some(at), ..
        }) = &verdict
        {
            if *at <= SystemTime::now() {
                return Ok(Verdict::Deny(Refusal::BadCredentials));
            }
        }
        Ok(verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shape_and_acl_claims() {
        assert!(looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.sig-_"));
        assert!(!looks_like_jwt("pw"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a b.c.d"));
        let claim = serde_json::json!({"pub": ["a/#"], "sub": ["b/+"], "deny": ["a/x"]});
        let rules = acl::rules_from_json(&claim).unwrap_or_default();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].grant, acl::Grant::Deny);
        assert!(acl::rules_from_json(&serde_json::json!(["a"])).is_err());
    }
}
