//! The one Redis connection every Redis user of a node shares: one server, or a Redis
//! Cluster. Callers name the key of each command; on a cluster the commands of one call are
//! grouped by hash slot (one pipeline per slot, sent together), so the same code serves
//! both. Keys that a script or a pipeline must find together share a hash tag.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::OnceCell;

use super::{redis_error, RedisFailure};
use crate::store::StoreError;

/// How long a silent Redis connection waits before the kernel starts probing it.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// Where Redis is.
#[derive(Clone)]
pub(super) enum Server {
    /// One Redis server (or a proxy in front of several).
    Single(redis::Client),
    /// A Redis Cluster, reached through any of its seed nodes.
    Cluster {
        client: Arc<ClusterClient>,
        seeds: Vec<String>,
    },
}

impl Server {
    /// `url`, or with `cluster` the comma-separated seed URLs of a Redis Cluster.
    ///
    /// # Errors
    /// A URL is invalid.
    pub(super) fn new(url: &str, cluster: bool, timeout: Duration) -> Result<Self, StoreError> {
        if cluster {
            let seeds: Vec<String> = url.split(',').map(|s| s.trim().to_owned()).collect();
            let client = Self::cluster_builder(&seeds, timeout)
                .build()
                .map_err(redis_error)?;
            return Ok(Self::Cluster {
                client: Arc::new(client),
                seeds,
            });
        }
        use redis::IntoConnectionInfo;
        let info = url
            .into_connection_info()
            .map_err(redis_error)?
            .set_tcp_settings(tcp_settings());
        redis::Client::open(info)
            .map(Self::Single)
            .map_err(redis_error)
    }

    /// A cluster client of `seeds` whose connection attempts and answers give up after
    /// `timeout`, probing idle sockets.
    pub(super) fn cluster_builder(seeds: &[String], timeout: Duration) -> ClusterClientBuilder {
        ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1)
            .tcp_settings(tcp_settings())
    }

    /// A connection that connects on first use and reconnects by itself.
    fn connect_lazily(&self, timeout: Duration) -> Result<Connection, StoreError> {
        match self {
            Self::Single(client) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(timeout);
                ConnectionManager::new_lazy_with_config(client.clone(), config)
                    .map(Connection::Single)
                    .map_err(redis_error)
            }
            Self::Cluster { client, .. } => Ok(Connection::Cluster(LazyCluster {
                client: Arc::clone(client),
                connection: Arc::default(),
            })),
        }
    }

    /// Whether this is a Redis Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }
}

/// Sockets probe a silent peer, so a dead one is noticed.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(KEEPALIVE);
    TcpSettings::default().set_keepalive(keepalive)
}

/// A connection to a Redis Cluster made on first use (so a node starts while Redis is down).
#[derive(Clone)]
pub(in crate::store) struct LazyCluster {
    client: Arc<ClusterClient>,
    connection: Arc<OnceCell<ClusterConnection>>,
}

impl LazyCluster {
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// A connection to one server or to a cluster; cheap to clone.
#[derive(Clone)]
pub(in crate::store) enum Connection {
    Single(ConnectionManager),
    Cluster(LazyCluster),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                connection.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                connection
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Commands sent together whose answers come back in the order they were added: one
/// pipeline on one server; on a cluster one pipeline per hash slot (commands of one slot
/// keep their order, slots go in parallel).
#[derive(Default)]
pub(in crate::store) struct Batch {
    cluster: bool,
    /// Per slot (none on one server): its pipeline and the positions of its commands.
    groups: Vec<(Pipeline, Vec<usize>)>,
    /// Where each slot's group is in `groups`.
    slots: HashMap<Option<Slot>, usize>,
    added: usize,
}

impl Batch {
    /// Adds `command`, which acts on `key` (its channel, for a publish).
    pub(in crate::store) fn add(&mut self, key: &str, command: Cmd) -> &mut Self {
        let slot = self.cluster.then(|| Slot::for_key(key));
        let groups = &mut self.groups;
        let at = *self.slots.entry(slot).or_insert_with(|| {
            groups.push((redis::pipe(), Vec::new()));
            groups.len() - 1
        });
        let (pipeline, positions) = &mut self.groups[at];
        pipeline.add_command(command);
        positions.push(self.added);
        self.added += 1;
        self
    }

    /// Whether nothing was added.
    pub(in crate::store) fn is_empty(&self) -> bool {
        self.added == 0
    }
}

/// A Redis connection whose every call is bounded by `timeout`. It connects on first use (so
/// a node starts while Redis is down) and reconnects by itself; a call that gets no answer in
/// time replaces the connection, since a silently dead socket would hold every later call
/// too, and tells the subscribers ([`BoundedRedis::replaced`]) to subscribe again.
#[derive(Clone)]
pub(in crate::store) struct BoundedRedis {
    server: Server,
    current: Arc<Mutex<Connection>>,
    replaced: Arc<tokio::sync::Notify>,
    timeout: Duration,
}

impl BoundedRedis {
    /// A connection to `url` (with `cluster`: the seed URLs of a Redis Cluster).
    ///
    /// # Errors
    /// A URL is invalid.
    pub(in crate::store) fn new(
        url: &str,
        cluster: bool,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let server = Server::new(url, cluster, timeout)?;
        let connection = server.connect_lazily(timeout)?;
        Ok(Self {
            server,
            current: Arc::new(Mutex::new(connection)),
            replaced: Arc::default(),
            timeout,
        })
    }

    /// Where Redis is.
    pub(super) fn server(&self) -> &Server {
        &self.server
    }

    /// How long a call may take.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The connection to issue a call on.
    pub(in crate::store) fn connection(&self) -> Connection {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An empty batch for this Redis.
    pub(in crate::store) fn batch(&self) -> Batch {
        Batch {
            cluster: self.server.is_cluster(),
            ..Batch::default()
        }
    }

    /// Sends `batch` and returns its answers in the order the commands were added.
    ///
    /// # Errors
    /// Redis failed or did not answer in time.
    pub(in crate::store) async fn run(&self, batch: Batch) -> Result<Vec<Value>, StoreError> {
        let connection = self.connection();
        let sent = batch.groups.iter().map(|(pipeline, _)| {
            let mut connection = connection.clone();
            let sent: BoxFuture<'_, redis::RedisResult<Vec<Value>>> =
                Box::pin(async move { pipeline.query_async(&mut connection).await });
            sent
        });
        let answers = self.within(futures::future::try_join_all(sent)).await?;
        let mut ordered = vec![Value::Nil; batch.added];
        for ((_, positions), answers) in batch.groups.iter().zip(answers) {
            for (at, answer) in positions.iter().zip(answers) {
                ordered[*at] = answer;
            }
        }
        Ok(ordered)
    }

    /// Runs one request (made on [`BoundedRedis::connection`]), failing like an outage when
    /// it is not answered within the timeout.
    pub(in crate::store) async fn within<T>(
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
        match self.server.connect_lazily(self.timeout) {
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

    /// Runs script calls together (each on the shard of its first key), within the timeout.
    ///
    /// # Errors
    /// Redis failed or did not answer in time.
    pub(in crate::store) async fn invoke_all(
        &self,
        calls: &[redis::ScriptInvocation<'_>],
    ) -> Result<(), StoreError> {
        let connection = self.connection();
        let sent = calls.iter().map(|call| {
            let mut connection = connection.clone();
            let sent: BoxFuture<'_, redis::RedisResult<Value>> =
                Box::pin(async move { call.invoke_async(&mut connection).await });
            sent
        });
        self.within(futures::future::try_join_all(sent))
            .await
            .map(|_| ())
    }

    /// Groups `items` by the hash slot of their key, first appearance first; on one server
    /// they are one group. Each group is what one script call may touch together.
    pub(in crate::store) fn by_slot<T>(
        &self,
        items: impl IntoIterator<Item = (String, T)>,
    ) -> Vec<(String, Vec<T>)> {
        let cluster = self.server.is_cluster();
        let mut order: Vec<(String, Vec<T>)> = Vec::new();
        let mut slots: HashMap<Option<Slot>, usize> = HashMap::new();
        for (key, item) in items {
            let slot = cluster.then(|| Slot::for_key(&key));
            let at = *slots.entry(slot).or_insert_with(|| {
                order.push((key, Vec::new()));
                order.len() - 1
            });
            order[at].1.push(item);
        }
        order
    }

    /// The command that publishes on `channel`: sharded on a cluster (a channel lives on
    /// the shard of its slot, not on every node).
    pub(super) fn publish(&self, channel: &str, payload: &[u8]) -> Cmd {
        let mut command = redis::cmd(if self.server.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        command.arg(channel).arg(payload);
        command
    }
}
