//! Redis as the nodes' shared view: which node holds which device (presence with node
//! liveness) and a message bus between nodes. Everything here is rebuildable: nodes
//! re-publish their devices on every heartbeat, so a flushed or restarted Redis heals itself.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Device, StoreError};

mod connection;
mod routes;
mod sessions;
mod subscription;
pub(super) use connection::BoundedRedis;
pub use routes::{ClusterMessage, Destination, RemoteRoutes};
use subscription::Heard;

/// A Redis failure, keeping its cause.
#[derive(Debug, thiserror::Error)]
enum RedisFailure {
    #[error("redis: {0}")]
    Failed(#[from] redis::RedisError),
    #[error("redis: no answer within {0} ms")]
    TimedOut(u128),
}

/// A Redis failure as the store reports it: an outage (Redis holds nothing that a retry
/// could break).
pub(super) fn redis_error(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(Box::new(RedisFailure::Failed(e)))
}

/// An answer of a [`connection::Batch`] as `T` (a missing one is an error).
fn value<T: redis::FromRedisValue>(answer: Option<redis::Value>) -> Result<T, StoreError> {
    let answer = answer.unwrap_or(redis::Value::Nil);
    redis::from_redis_value(answer).map_err(|e| redis_error(e.into()))
}

/// How to reach the nodes' Redis.
#[derive(Debug, Clone, Copy)]
pub struct RedisSettings<'a> {
    /// `redis://…` of one server, or with `cluster` the comma-separated seed URLs of a
    /// Redis Cluster.
    pub url: &'a str,
    /// Whether `url` names a Redis Cluster.
    pub cluster: bool,
    /// Prefix of every key and channel (several deployments can share a Redis).
    pub prefix: &'a str,
    /// Longest wait for an answer.
    pub timeout: Duration,
}

/// A key of one user's: every key of a user shares the hash tag `{u:<uid>}`, so that on a
/// Redis Cluster a script can touch them together (user ids hold no braces).
pub(super) fn user_key(prefix: &str, uid: &str, what: &str) -> String {
    format!("{prefix}:{{u:{uid}}}:{what}")
}

/// Records a device on a node and returns the node it was recorded on before, if any.
const CLAIM: &str = r"
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return previous";

/// Re-records a device on a node unless another node has claimed it since (a heartbeat must
/// not take back a device that moved).
const REFRESH: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or current == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 0";

/// Compare-and-delete: a device leaves only if it is still recorded on this node.
const LEAVE: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0";

/// Presence and hand-over through Redis for one node.
#[derive(Clone)]
pub struct RedisBus {
    redis: BoundedRedis,
    prefix: String,
    node: String,
    node_ttl: Duration,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl RedisBus {
    /// The Redis link of node `node`. It connects on first use and reconnects by itself, so
    /// a node starts and serves its own clients while Redis is down; every call fails after
    /// `timeout` at most.
    ///
    /// # Errors
    /// The URL is invalid.
    pub fn new(
        redis: &RedisSettings<'_>,
        node: &str,
        node_ttl: Duration,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            redis: BoundedRedis::new(redis.url, redis.cluster, redis.timeout)?,
            prefix: redis.prefix.to_owned(),
            node: node.to_owned(),
            node_ttl,
        })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn presence_key(&self, uid: &str) -> String {
        user_key(&self.prefix, uid, "presence")
    }

    fn node_key(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    fn channel(&self, node: &str) -> String {
        format!("{}:handover:{node}", self.prefix)
    }

    /// The channel every node listens on (node ids never contain ':').
    fn broadcast_channel(&self) -> String {
        format!("{}:handover-all", self.prefix)
    }

    /// Records that `client_id` of `uid` is connected to this node; returns the other node
    /// it was recorded on before, whose connection of it is now stale.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn join(&self, uid: &str, client_id: &str) -> Result<Option<String>, StoreError> {
        let mut connection = self.redis.connection();
        let script = redis::Script::new(CLAIM);
        let mut invocation = script.key(self.presence_key(uid));
        invocation.arg(client_id).arg(&self.node);
        let previous: Option<String> = self
            .redis
            .within(invocation.invoke_async(&mut connection))
            .await?;
        Ok(previous.filter(|node| *node != self.node))
    }

    /// Records that `client_id` of `uid` left this node (unless another node took it over).
    ///
    /// # Errors
    /// Redis failed.
    pub async fn leave(&self, uid: &str, client_id: &str) -> Result<(), StoreError> {
        let mut connection = self.redis.connection();
        let script = redis::Script::new(LEAVE);
        let mut invocation = script.key(self.presence_key(uid));
        invocation.arg(client_id).arg(&self.node);
        self.redis
            .within(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(|_| ())
    }

    /// The devices of `uid` connected to live nodes: client id → node.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn locate(&self, uid: &str) -> Result<HashMap<String, String>, StoreError> {
        let mut found = self.locate_many(&[uid]).await?;
        Ok(found.pop().unwrap_or_default())
    }

    /// [`RedisBus::locate`] for several users in two round trips, in the order given.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn locate_many(
        &self,
        uids: &[&str],
    ) -> Result<Vec<HashMap<String, String>>, StoreError> {
        let mut batch = self.redis.batch();
        for uid in uids {
            let key = self.presence_key(uid);
            batch.add(&key, redis::Cmd::hgetall(&key));
        }
        let devices: Vec<HashMap<String, String>> = self
            .redis
            .run(batch)
            .await?
            .into_iter()
            .map(|answer| value(Some(answer)))
            .collect::<Result<_, _>>()?;
        let mut connection = self.redis.connection();
        let mut nodes: Vec<&String> = devices.iter().flat_map(HashMap::values).collect();
        nodes.sort();
        nodes.dedup();
        if nodes.is_empty() {
            return Ok(devices);
        }
        let keys: Vec<String> = nodes.iter().map(|n| self.node_key(n)).collect();
        let alive: Vec<Option<String>> = self.redis.within(connection.mget(&keys)).await?;
        let live: Vec<String> = nodes
            .into_iter()
            .zip(alive)
            .filter_map(|(node, alive)| alive.map(|_| node.clone()))
            .collect();
        Ok(devices
            .into_iter()
            .map(|of_user| {
                of_user
                    .into_iter()
                    .filter(|(_, node)| live.contains(node))
                    .collect()
            })
            .collect())
    }

    /// Refreshes this node's liveness and re-records its devices (heals a flushed Redis),
    /// except those another node has claimed since.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn heartbeat(&self, devices: &[Device]) -> Result<(), StoreError> {
        let ttl = u64::try_from(self.node_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut batch = self.redis.batch();
        let alive = self.node_key(&self.node);
        let mut set = redis::cmd("SET");
        set.arg(&alive).arg(1).arg("PX").arg(ttl);
        batch.add(&alive, set);
        for device in devices {
            let key = self.presence_key(&device.uid);
            let mut refresh = redis::cmd("EVAL");
            refresh
                .arg(REFRESH)
                .arg(1)
                .arg(&key)
                .arg(&device.client_id)
                .arg(&self.node);
            batch.add(&key, refresh);
        }
        self.redis.run(batch).await.map(|_| ())
    }

    /// Sends each payload to its node in one round trip; per message, whether a node was
    /// listening there.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn send_many(&self, messages: &[(String, Vec<u8>)]) -> Result<Vec<bool>, StoreError> {
        let channels = messages
            .iter()
            .map(|(node, payload)| (self.channel(node), payload));
        self.publish(channels).await
    }

    /// Sends each payload to every node (this one included) in one round trip.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn broadcast(&self, payloads: &[Vec<u8>]) -> Result<Vec<bool>, StoreError> {
        let channel = self.broadcast_channel();
        self.publish(payloads.iter().map(|payload| (channel.clone(), payload)))
            .await
    }

    /// Publishes each payload on its channel, in order per channel; per payload, whether a
    /// node was listening.
    async fn publish<'a>(
        &self,
        messages: impl IntoIterator<Item = (String, &'a Vec<u8>)>,
    ) -> Result<Vec<bool>, StoreError> {
        let mut batch = self.redis.batch();
        for (channel, payload) in messages {
            batch.add(&channel, self.redis.publish(&channel, payload));
        }
        let receivers = self.redis.run(batch).await?;
        Ok(receivers
            .iter()
            .map(|n| redis::from_redis_value_ref::<i64>(n).is_ok_and(|n| n > 0))
            .collect())
    }

    /// Delivers what other nodes send to this one into `inbox` until `shutdown`, resubscribing
    /// after a Redis failure.
    pub async fn listen(self, inbox: mpsc::Sender<Vec<u8>>, shutdown: CancellationToken) {
        let channels = vec![self.channel(&self.node), self.broadcast_channel()];
        let forward = |heard: Heard| {
            let inbox = inbox.clone();
            async move {
                match heard {
                    Heard::Message { payload, .. } => inbox.send(payload).await.is_ok(),
                    // Hand-overs missed meanwhile are in the receivers' backlogs.
                    Heard::Subscribed => true,
                }
            }
        };
        self.subscribed(channels, "hand-overs", forward, shutdown)
            .await;
    }
}
