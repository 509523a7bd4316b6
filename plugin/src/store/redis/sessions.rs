//! Which node holds each client id, so that a client connecting through another node takes
//! its connection and session over from there: a key per client id naming its node, claimed
//! at every CONNECT and given up when a clean session ends (a persistent session's stays,
//! naming the node that keeps it), and a channel per node for the moves.

use std::time::Duration;

use super::RedisBus;
use crate::store::{now_ms, StoreError};

/// How long a client id's node is remembered without a new CONNECT: a persistent session
/// nobody resumes that long is not looked for.
const CLAIM_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Gives the key up only if it still names this node.
const RELEASE: &str =
    r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

impl RedisBus {
    fn client_key(&self, client_id: &str) -> String {
        format!("{}:client:{client_id}", self.prefix)
    }

    pub(super) fn sessions_channel(&self, node: &str) -> String {
        format!("{}:sessions:{node}", self.prefix)
    }

    /// Records that `client_id` is connected to this node; returns the node it was recorded
    /// on before, if any.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn claim_client(&self, client_id: &str) -> Result<Option<String>, StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(self.client_key(client_id))
            .arg(&self.node)
            .arg("EX")
            .arg(CLAIM_TTL.as_secs())
            .arg("GET");
        let mut connection = self.redis.connection();
        self.redis.within(set.query_async(&mut connection)).await
    }

    /// `client_id` has no session here any more (a clean session ended).
    ///
    /// # Errors
    /// Redis failed.
    pub async fn release_client(&self, client_id: &str) -> Result<(), StoreError> {
        let script = redis::Script::new(RELEASE);
        let mut call = script.key(self.client_key(client_id));
        call.arg(&self.node);
        let mut connection = self.redis.connection();
        self.redis
            .within(call.invoke_async::<i64>(&mut connection))
            .await
            .map(|_| ())
    }

    /// Whether `node` is alive (its heartbeat has not lapsed).
    ///
    /// # Errors
    /// Redis failed.
    pub async fn node_alive(&self, node: &str) -> Result<bool, StoreError> {
        let mut score = redis::cmd("ZSCORE");
        score.arg(self.route_nodes_key()).arg(node);
        let mut connection = self.redis.connection();
        let until: Option<i64> = self
            .redis
            .within(score.query_async(&mut connection))
            .await?;
        Ok(until.is_some_and(|until| until > now_ms()))
    }

    /// Sends an encoded `SessionMove` to `node`; whether it was listening.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn send_session_move(&self, node: &str, message: &[u8]) -> Result<bool, StoreError> {
        let message = message.to_vec();
        let sent = self
            .publish([(self.sessions_channel(node), &message)])
            .await?;
        Ok(sent.first().copied().unwrap_or(false))
    }
}
