//! Routes of plain (non-IM) topics between nodes: each node advertises the filters its
//! clients hold, as a set in Redis that expires with the node unless its heartbeat renews
//! it, and tells the others of every change on a channel; publishes for another node go to
//! that node's forward channel. Like presence, everything here is rebuilt by the heartbeat.

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Heard, RedisBus};
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
    fn route_nodes_key(&self) -> String {
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
        let mut pipe = redis::pipe();
        if !added.is_empty() {
            pipe.sadd(&key, added).ignore();
        }
        if !removed.is_empty() {
            pipe.srem(&key, removed).ignore();
        }
        pipe.pexpire(&key, i64::try_from(self.ttl_ms()).unwrap_or(i64::MAX))
            .ignore();
        self.mark_alive(&mut pipe);
        pipe.publish(self.routes_channel(), change).ignore();
        let mut connection = self.redis.connection();
        self.redis
            .within(pipe.query_async::<()>(&mut connection))
            .await
    }

    /// Keeps this node's routes alive, and writes them whole if Redis lost or changed them
    /// (a flushed Redis heals with the next heartbeat).
    ///
    /// # Errors
    /// Redis failed.
    pub async fn refresh_routes(&self, all: &[String]) -> Result<(), StoreError> {
        let key = self.routes_key(&self.node);
        let mut pipe = redis::pipe();
        self.mark_alive(&mut pipe);
        pipe.scard(&key);
        let mut connection = self.redis.connection();
        let (held,): (usize,) = self.redis.within(pipe.query_async(&mut connection)).await?;
        let ttl = i64::try_from(self.ttl_ms()).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        if held != all.len() {
            pipe.del(&key).ignore();
            if !all.is_empty() {
                pipe.sadd(&key, all).ignore();
            }
        }
        pipe.pexpire(&key, ttl).ignore();
        self.redis
            .within(pipe.query_async::<()>(&mut connection))
            .await
    }

    /// Records this node as holding routes until its time to live passes, and forgets the
    /// nodes whose time passed.
    fn mark_alive(&self, pipe: &mut redis::Pipeline) {
        let now = now_ms();
        let until = now.saturating_add(i64::try_from(self.ttl_ms()).unwrap_or(i64::MAX));
        let nodes = self.route_nodes_key();
        pipe.zadd(&nodes, &self.node, until).ignore();
        pipe.zrembyscore(&nodes, "-inf", now).ignore();
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
        if others.is_empty() {
            return Ok(RemoteRoutes::new());
        }
        let mut pipe = redis::pipe();
        for node in &others {
            pipe.smembers(self.routes_key(node));
        }
        let routes: Vec<Vec<String>> = self.redis.within(pipe.query_async(&mut connection)).await?;
        Ok(others.into_iter().zip(routes).collect())
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
        let mut pipe = redis::pipe();
        for (destination, batch) in batches {
            let channel = match destination {
                Destination::Node(node) => self.forward_channel(node),
                Destination::All => self.forward_all_channel(),
            };
            pipe.publish(channel, batch);
        }
        self.publish(pipe).await
    }

    /// Delivers route changes of every node and the publishes forwarded to this one into
    /// `inbox` until `shutdown`, resubscribing after a Redis failure.
    pub async fn listen_routes(
        self,
        inbox: mpsc::Sender<ClusterMessage>,
        shutdown: CancellationToken,
    ) {
        let routes = self.routes_channel();
        let channels = vec![
            routes.clone(),
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
                Heard::Message { payload, .. } => ClusterMessage::Forwards(payload),
            };
            async move { inbox.send(message).await.is_ok() }
        };
        self.subscribed(channels, "routes", deliver, shutdown).await;
    }
}
