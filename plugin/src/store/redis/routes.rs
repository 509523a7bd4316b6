//! Routes of plain (non-IM) topics between nodes: each node advertises the filters its
//! clients hold, as a set in Redis that expires with the node unless its heartbeat renews
//! it, and tells the others of every change on a channel; publishes for another node go to
//! that node's forward channel. Like presence, everything here is rebuilt by the heartbeat.

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::connection::Batch;
use super::{value, Heard, RedisBus};
use crate::store::{now_ms, StoreError};

/// Every other live node's routes: node id → filters.
pub type RemoteRoutes = HashMap<String, Vec<String>>;

/// What arrives for this node's plain-topic routing.
#[derive(Debug)]
pub enum ClusterMessage {
    /// The node follows the cluster's channels (again): what was announced before, it
    /// missed.
    Following,
    /// A node's routes changed (an encoded `RouteChange`).
    Routes(Vec<u8>),
    /// Publishes another node forwards here (an encoded `ForwardBatch`).
    Forwards(Vec<u8>),
    /// A step of a session moving to or from this node (an encoded `SessionMove`).
    Session(Vec<u8>),
}

/// Where forwarded publishes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// One node.
    Node(std::sync::Arc<str>),
    /// Every node (retained messages).
    All,
}

impl RedisBus {
    fn routes_key(&self, node: &str) -> String {
        format!("{}:routes:{node}", self.prefix)
    }

    /// Live nodes with routes: node → when its routes expire (ms).
    pub(super) fn route_nodes_key(&self) -> String {
        format!("{}:route-nodes", self.prefix)
    }

    fn routes_channel(&self) -> String {
        format!("{}:routes", self.prefix)
    }

    fn forward_channel(&self, node: &str) -> String {
        format!("{}:forward:{node}", self.prefix)
    }

    fn forward_all_channel(&self) -> String {
        format!("{}:forward-all", self.prefix)
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.node_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Writes a change of this node's routes and tells the other nodes of it (`change`, an
    /// encoded `RouteChange`), in one round trip.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn change_routes(
        &self,
        added: &[String],
        removed: &[String],
        change: &[u8],
    ) -> Result<(), StoreError> {
        let key = self.routes_key(&self.node);
        let mut batch = self.redis.batch();
        if !added.is_empty() {
            batch.add(&key, redis::Cmd::sadd(&key, added));
        }
        if !removed.is_empty() {
            batch.add(&key, redis::Cmd::srem(&key, removed));
        }
        batch.add(&key, redis::Cmd::pexpire(&key, self.ttl()));
        self.mark_alive(&mut batch);
        let channel = self.routes_channel();
        batch.add(&channel, self.redis.publish(&channel, change));
        self.redis.run(batch).await.map(|_| ())
    }

    /// Keeps this node's routes alive, and writes them whole if Redis lost or changed them
    /// (a flushed Redis heals with the next heartbeat).
    ///
    /// # Errors
    /// Redis failed.
    pub async fn refresh_routes(&self, all: &[String]) -> Result<(), StoreError> {
        let key = self.routes_key(&self.node);
        let mut batch = self.redis.batch();
        batch.add(&key, redis::Cmd::scard(&key));
        self.mark_alive(&mut batch);
        let answers = self.redis.run(batch).await?;
        let held: usize = value(answers.into_iter().next())?;
        let mut batch = self.redis.batch();
        if held != all.len() {
            batch.add(&key, redis::Cmd::del(&key));
            if !all.is_empty() {
                batch.add(&key, redis::Cmd::sadd(&key, all));
            }
        }
        batch.add(&key, redis::Cmd::pexpire(&key, self.ttl()));
        self.redis.run(batch).await.map(|_| ())
    }

    /// This node's time to live, for PEXPIRE.
    fn ttl(&self) -> i64 {
        i64::try_from(self.ttl_ms()).unwrap_or(i64::MAX)
    }

    /// Records this node as holding routes until its time to live passes, and forgets the
    /// nodes whose time passed.
    fn mark_alive(&self, batch: &mut Batch) {
        let now = now_ms();
        let until = now.saturating_add(self.ttl());
        let nodes = self.route_nodes_key();
        batch.add(&nodes, redis::Cmd::zadd(&nodes, &self.node, until));
        batch.add(&nodes, redis::Cmd::zrembyscore(&nodes, "-inf", now));
    }

    /// Every other live node's routes, in two round trips.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn remote_routes(&self) -> Result<RemoteRoutes, StoreError> {
        let mut connection = self.redis.connection();
        let mut live = redis::cmd("ZRANGEBYSCORE");
        live.arg(self.route_nodes_key()).arg(now_ms()).arg("+inf");
        let nodes: Vec<String> = self.redis.within(live.query_async(&mut connection)).await?;
        let others: Vec<String> = nodes.into_iter().filter(|n| *n != self.node).collect();
        let mut batch = self.redis.batch();
        for node in &others {
            let key = self.routes_key(node);
            batch.add(&key, redis::Cmd::smembers(&key));
        }
        if batch.is_empty() {
            return Ok(RemoteRoutes::new());
        }
        let routes = self.redis.run(batch).await?;
        others
            .into_iter()
            .zip(routes)
            .map(|(node, filters)| Ok((node, value(Some(filters))?)))
            .collect()
    }

    /// Sends each encoded `ForwardBatch` to its destination in one round trip; per batch,
    /// whether a node was listening there.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn forward(
        &self,
        batches: &[(Destination, Vec<u8>)],
    ) -> Result<Vec<bool>, StoreError> {
        let channels = batches.iter().map(|(destination, batch)| {
            let channel = match destination {
                Destination::Node(node) => self.forward_channel(node),
                Destination::All => self.forward_all_channel(),
            };
            (channel, batch)
        });
        self.publish(channels).await
    }

    /// Delivers route changes of every node, the publishes forwarded to this one and the
    /// steps of sessions moving to or from it into `inbox` until `shutdown`, resubscribing
    /// after a Redis failure.
    pub async fn listen_routes(
        self,
        inbox: mpsc::Sender<ClusterMessage>,
        shutdown: CancellationToken,
    ) {
        let (routes, sessions) = (self.routes_channel(), self.sessions_channel(&self.node));
        let channels = vec![
            routes.clone(),
            sessions.clone(),
            self.forward_channel(&self.node),
            self.forward_all_channel(),
        ];
        let deliver = |heard: Heard| {
            let inbox = inbox.clone();
            let message = match heard {
                Heard::Subscribed => ClusterMessage::Following,
                Heard::Message { channel, payload } if channel == routes => {
                    ClusterMessage::Routes(payload)
                }
                Heard::Message { channel, payload } if channel == sessions => {
                    ClusterMessage::Session(payload)
                }
                Heard::Message { payload, .. } => ClusterMessage::Forwards(payload),
            };
            async move { inbox.send(message).await.is_ok() }
        };
        self.subscribed(channels, "routes", deliver, shutdown).await;
    }
}
