//! The `users` provider: `[auth.users]` in the configuration, username → password hash
//! (clear text only with `auth.plaintext = true`).

use std::collections::HashMap;
use std::sync::Arc;

use super::hash::StoredHash;
use super::settings::Settings as AuthSettings;
use super::{judge, AuthError, Credentials, Hashing, Provider, Verdict};

/// The configured users; an unknown username is the next provider's.
#[derive(Debug)]
pub(super) struct Users {
    users: HashMap<String, Arc<StoredHash>>,
    hashing: Arc<Hashing>,
}

impl Users {
    pub(super) fn new(settings: &AuthSettings, hashing: Arc<Hashing>) -> Result<Self, AuthError> {
        let users = settings
            .users
            .iter()
            .map(|(user, stored)| {
                StoredHash::parse(stored, settings.plaintext)
                    .map(|hash| (user.clone(), Arc::new(hash)))
                    .map_err(|source| AuthError::BadHash {
                        user: user.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { users, hashing })
    }
}

#[async_trait::async_trait]
impl Provider for Users {
    fn name(&self) -> &'static str {
        "users"
    }

    async fn check(&self, credentials: &Credentials) -> Result<Verdict, AuthError> {
        let stored = credentials
            .username
            .as_deref()
            .and_then(|user| self.users.get(user))
            .cloned();
        judge(&self.hashing, stored, credentials.password.as_deref()).await
    }
}
