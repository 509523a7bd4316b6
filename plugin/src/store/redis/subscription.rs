//! Listening on the nodes' channels: classic pub/sub on one server; sharded pub/sub
//! (SSUBSCRIBE, each channel on the shard of its slot) on a Redis Cluster, where the client
//! subscribes again by itself after a node's connection is lost.

use std::time::Duration;

use futures::StreamExt;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::connection::Server;
use super::RedisBus;

/// What a subscription to Redis channels hears.
pub(super) enum Heard {
    /// The subscription is (again) in place: what was published before was missed.
    Subscribed,
    /// A message on `channel`.
    Message { channel: String, payload: Vec<u8> },
}

/// Why listening stopped.
enum Stopped {
    /// Shut down, or the receiver wants no more.
    Done,
    /// The subscription is lost: subscribe again.
    Lost,
}

impl RedisBus {
    /// Hands every message on `channels` to `deliver` until `shutdown` or until `deliver`
    /// says no more, resubscribing after a Redis failure; each (re)subscription is heard too,
    /// since what was published before it was missed.
    pub(super) async fn subscribed<F, D>(
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
            let listened = match self.redis.server() {
                Server::Single(client) => {
                    self.listen_single(client, &channels, &mut deliver, &shutdown)
                        .await
                }
                Server::Cluster { seeds, .. } => {
                    self.listen_sharded(seeds, &channels, &mut deliver, &shutdown)
                        .await
                }
            };
            match listened {
                Ok(Stopped::Done) => return,
                Ok(Stopped::Lost) => {
                    backoff = Duration::from_millis(100);
                    tracing::warn!(what, "subscription lost; resubscribing");
                }
                Err(e) => {
                    tracing::warn!(error = %e, what, "cannot subscribe; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Classic pub/sub on one server, until the subscription is lost.
    async fn listen_single<F, D>(
        &self,
        client: &redis::Client,
        channels: &[String],
        deliver: &mut D,
        shutdown: &CancellationToken,
    ) -> Result<Stopped, crate::store::StoreError>
    where
        D: FnMut(Heard) -> F,
        F: std::future::Future<Output = bool>,
    {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channels).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let mut pubsub = self.redis.within(subscribed).await?;
        if !deliver(Heard::Subscribed).await {
            return Ok(Stopped::Done);
        }
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => {
                        let channel = message.get_channel_name().to_owned();
                        let payload = message.get_payload_bytes().to_vec();
                        if !deliver(Heard::Message { channel, payload }).await {
                            return Ok(Stopped::Done);
                        }
                    }
                    None => return Ok(Stopped::Lost),
                },
                () = shutdown.cancelled() => return Ok(Stopped::Done),
                // Redis stalled: this subscription's socket may be just as dead.
                () = self.redis.replaced() => return Ok(Stopped::Lost),
            }
        }
    }

    /// Sharded pub/sub on a Redis Cluster. The client resubscribes by itself when a shard's
    /// connection drops; its confirmation after a drop is heard as a new subscription.
    async fn listen_sharded<F, D>(
        &self,
        seeds: &[String],
        channels: &[String],
        deliver: &mut D,
        shutdown: &CancellationToken,
    ) -> Result<Stopped, crate::store::StoreError>
    where
        D: FnMut(Heard) -> F,
        F: std::future::Future<Output = bool>,
    {
        let (pushes, mut heard) = mpsc::unbounded_channel::<PushInfo>();
        // One connection per hash slot: the client subscribes a connection again with one
        // SSUBSCRIBE of all its channels, which Redis refuses for channels of several slots.
        let by_slot = self
            .redis
            .by_slot(channels.iter().map(|channel| (channel.clone(), channel)));
        let subscribed = async {
            let mut connections = Vec::with_capacity(by_slot.len());
            for (_, of_slot) in &by_slot {
                let client = Server::cluster_builder(seeds, self.redis.timeout())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(pushes.clone())
                    .build()?;
                let mut connection = client.get_async_connection().await?;
                for channel in of_slot {
                    connection.ssubscribe(channel.as_str()).await?;
                }
                connections.push(connection);
            }
            Ok::<_, redis::RedisError>(connections)
        };
        // Held for as long as the subscriptions are wanted.
        let _connections = self.redis.within(subscribed).await?;
        if !deliver(Heard::Subscribed).await {
            return Ok(Stopped::Done);
        }
        let mut dropped = false;
        loop {
            let push = tokio::select! {
                push = heard.recv() => push,
                () = shutdown.cancelled() => return Ok(Stopped::Done),
                () = self.redis.replaced() => return Ok(Stopped::Lost),
            };
            let Some(PushInfo { kind, data }) = push else {
                return Ok(Stopped::Lost);
            };
            let heard = match kind {
                PushKind::SMessage => match message(data) {
                    Some((channel, payload)) => Heard::Message { channel, payload },
                    None => continue,
                },
                PushKind::Disconnection => {
                    dropped = true;
                    continue;
                }
                PushKind::SSubscribe if dropped => {
                    dropped = false;
                    Heard::Subscribed
                }
                _ => continue,
            };
            if !deliver(heard).await {
                return Ok(Stopped::Done);
            }
        }
    }
}

/// The channel and payload of a sharded message push.
fn message(data: Vec<Value>) -> Option<(String, Vec<u8>)> {
    let mut data = data.into_iter();
    let channel: String = redis::from_redis_value(data.next()?).ok()?;
    let payload: Vec<u8> = redis::from_redis_value(data.next()?).ok()?;
    Some((channel, payload))
}
