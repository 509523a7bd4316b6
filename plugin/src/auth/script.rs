//! The `lua` provider: the policy scripts' `on_auth` hook decides, for teams whose
//! authentication is custom (VerneMQ's `auth_on_register`). `return true[, uid]` admits,
//! `return false[, reason]` refuses, `nil` passes to the next provider; the scripts run on
//! the policy's own threads under its limits.

use std::sync::Arc;

use super::{AuthError, Credentials, Grant, Provider, Refusal, Verdict};
use crate::policy::{AuthDecision, AuthView, Policy};

/// The policy scripts as a link of the chain.
#[derive(Debug)]
pub(super) struct Script {
    pub(super) policy: Arc<dyn Policy>,
}

#[async_trait::async_trait]
impl Provider for Script {
    fn name(&self) -> &'static str {
        "lua"
    }

    async fn check(&self, credentials: &Credentials) -> Result<Verdict, AuthError> {
        let view = AuthView {
            client_id: credentials.client_id.clone(),
            username: credentials.username.clone(),
            password: credentials.password.clone(),
            peer: credentials.peer.to_string(),
            protocol: credentials.protocol.name(),
            transport: credentials.transport.as_str(),
        };
        Ok(match self.policy.on_auth(view).await {
            AuthDecision::Allow { uid } => Verdict::Allow(Grant {
                uid,
                ..Grant::default()
            }),
            AuthDecision::Deny => Verdict::Deny(Refusal::BadCredentials),
            AuthDecision::Next => Verdict::Next,
        })
    }
}
