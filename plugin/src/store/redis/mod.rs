//! Redis as the nodes' shared view: which node holds which device (presence with node
//! liveness) and a message bus between nodes. Everything here is rebuildable: nodes
//! re-publish their devices on every heartbeat, so a flushed or restarted Redis heals itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Device, StoreError};

mod routes;
pub use routes::{ClusterMessage, Destination, RemoteRoutes};

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

/// How long a silent Redis connection waits before the kernel starts probing it.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// A Redis connection whose every call is bounded by `timeout`. It connects on first use (so
/// a node starts while Redis is down) and reconnects by itself; a call that gets no answer in
/// time replaces the connection, since a silently dead socket would hold every later call
/// too, and tells the subscribers ([`BoundedRedis::replaced`]) to subscribe again.
#[derive(Clone)]
pub(super) struct BoundedRedis {
    client: redis::Client,
    current: Arc<Mutex<ConnectionManager>>,
    replaced: Arc<tokio::sync::Notify>,
    timeout: Duration,
}

impl BoundedRedis {
    /// A connection to `url` (probing idle sockets, so a dead peer is noticed).
    ///
    /// # Errors
    /// The URL is invalid.
    pub(super) fn new(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
        use redis::IntoConnectionInfo;
        let keepalive = TcpKeepalive::new()
            .with_time(KEEPALIVE)
            .with_interval(KEEPALIVE);
        let info = url
            .into_connection_info()
            .map_err(redis_error)?
            .set_tcp_settings(TcpSettings::default().set_keepalive(keepalive));
        let client = redis::Client::open(info).map_err(redis_error)?;
        let connection = manager(&client, timeout)?;
        Ok(Self {
            client,
            current: Arc::new(Mutex::new(connection)),
            replaced: Arc::default(),
            timeout,
        })
    }

    /// The connection to issue a call on.
    pub(super) fn connection(&self) -> ConnectionManager {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs one request (made on [`BoundedRedis::connection`]), failing like an outage when
    /// it is not answered within the timeout.
    pub(super) async fn within<T>(
        &self,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, request).await {
            // The client's own response timeout can win the race against this one; either
            // way the socket may be silently dead, and the manager would keep it.
            Ok(Err(e)) if !e.is_timeout() => Err(redis_error(e)),
            Ok(answer @ Ok(_)) => answer.map_err(redis_error),
            Ok(Err(_)) | Err(_) => {
                self.replace();
                let waited = self.timeout.as_millis();
                Err(StoreError::Unavailable(Box::new(RedisFailure::TimedOut(
                    waited,
                ))))
            }
        }
    }

    fn replace(&self) {
        match manager(&self.client, self.timeout) {
            Ok(fresh) => {
                *self.current.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
                self.replaced.notify_waiters();
            }
            Err(e) => tracing::debug!(error = %e, "cannot replace a stalled redis connection"),
        }
    }

    /// Completes when a stalled connection was replaced.
    pub(super) async fn replaced(&self) {
        self.replaced.notified().await;
    }
}

/// A lazily connecting manager whose connection attempts and answers give up after `timeout`.
fn manager(client: &redis::Client, timeout: Duration) -> Result<ConnectionManager, StoreError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(timeout);
    ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(redis_error)
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

/// What a subscription to Redis channels hears.
enum Heard {
    /// The subscription is (again) in place: what was published before was missed.
    Subscribed,
    /// A message on `channel`.
    Message { channel: String, payload: Vec<u8> },
}

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
        url: &str,
        prefix: &str,
        node: &str,
        node_ttl: Duration,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            redis: BoundedRedis::new(url, timeout)?,
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            node_ttl,
        })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn presence_key(&self, uid: &str) -> String {
        format!("{}:presence:{uid}", self.prefix)
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
        let mut connection = self.redis.connection();
        let mut pipe = redis::pipe();
        for uid in uids {
            pipe.hgetall(self.presence_key(uid));
        }
        let devices: Vec<HashMap<String, String>> =
            self.redis.within(pipe.query_async(&mut connection)).await?;
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
        let mut pipe = redis::pipe();
        let ttl = u64::try_from(self.node_ttl.as_millis()).unwrap_or(u64::MAX);
        pipe.cmd("SET")
            .arg(self.node_key(&self.node))
            .arg(1)
            .arg("PX")
            .arg(ttl)
            .ignore();
        for device in devices {
            pipe.cmd("EVAL")
                .arg(REFRESH)
                .arg(1)
                .arg(self.presence_key(&device.uid))
                .arg(&device.client_id)
                .arg(&self.node)
                .ignore();
        }
        let mut connection = self.redis.connection();
        self.redis
            .within(pipe.query_async::<()>(&mut connection))
            .await
    }

    /// Sends each payload to its node in one round trip; per message, whether a node was
    /// listening there.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn send_many(&self, messages: &[(String, Vec<u8>)]) -> Result<Vec<bool>, StoreError> {
        let mut pipe = redis::pipe();
        for (node, payload) in messages {
            pipe.publish(self.channel(node), payload);
        }
        self.publish(pipe).await
    }

    /// Sends each payload to every node (this one included) in one round trip.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn broadcast(&self, payloads: &[Vec<u8>]) -> Result<Vec<bool>, StoreError> {
        let mut pipe = redis::pipe();
        for payload in payloads {
            pipe.publish(self.broadcast_channel(), payload);
        }
        self.publish(pipe).await
    }

    async fn publish(&self, pipe: redis::Pipeline) -> Result<Vec<bool>, StoreError> {
        let mut connection = self.redis.connection();
        let receivers: Vec<i64> = self.redis.within(pipe.query_async(&mut connection)).await?;
        Ok(receivers.into_iter().map(|n| n > 0).collect())
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

    /// Hands every message on `channels` to `deliver` until `shutdown` or until `deliver`
    /// says no more, resubscribing after a Redis failure; each (re)subscription is heard too,
    /// since what was published before it was missed.
    async fn subscribed<F, D>(
        &self,
        channels: Vec<String>,
        what: &'static str,
        mut deliver: D,
        shutdown: CancellationToken,
    ) where
        D: FnMut(Heard) -> F,
        F: std::future::Future<Output = bool>,
    {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let subscribed = async {
                let mut pubsub = self.redis.client.get_async_pubsub().await?;
                pubsub.subscribe(&channels).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let mut pubsub = match self.redis.within(subscribed).await {
                Ok(pubsub) => pubsub,
                Err(e) => {
                    tracing::warn!(error = %e, what, "cannot subscribe; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if !deliver(Heard::Subscribed).await {
                return;
            }
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    message = messages.next() => match message {
                        Some(message) => {
                            let channel = message.get_channel_name().to_owned();
                            let payload = message.get_payload_bytes().to_vec();
                            if !deliver(Heard::Message { channel, payload }).await {
                                return;
                            }
                        }
                        None => break,
                    },
                    () = shutdown.cancelled() => return,
                    // Redis stalled: this subscription's socket may be just as dead.
                    () = self.redis.replaced() => break,
                }
            }
            tracing::warn!(what, "subscription lost; resubscribing");
        }
    }
}
