//! Hooks: the MQTT lifecycle as a type, for the Lua policy and for an embedding service's own
//! checks and side effects.
//!
//! The hook layer calls every registered [`Hook`] at each point of a connection's life, in
//! registration order (the Lua policy first). Decisions (`admit`, `subscribe`, `publish`)
//! are awaited in the connection's arrival order; notifications (`connected`, `delivered`,
//! `disconnected`) run on a task of their own per connection, in order, and never hold the
//! connection up. Every call runs under the hook's [`Hook::deadline`]; a hook that overruns,
//! panics or answers nothing follows its [`Hook::on_error`], so one slow or broken hook
//! stalls at most the connection it judges.
//!
//! IM topics are not hook points: the IM service owns them (it orders, stores and
//! acknowledges chat messages, and runs the policy's `on_message` itself).
//!
//! ```
//! use mqtt_im::hook::{Client, Hook, Message, Verdict};
//!
//! /// Keeps clients off `admin/…` and stamps every `sensors/…` payload.
//! #[derive(Debug)]
//! struct Gatekeeper;
//!
//! #[mqtt_im::async_trait]
//! impl Hook for Gatekeeper {
//!     fn name(&self) -> &str {
//!         "gatekeeper"
//!     }
//!
//!     async fn publish(&self, client: &Client, message: &Message) -> Verdict {
//!         if message.topic.starts_with("admin/") {
//!             return Verdict::Deny(format!("{} may not publish there", client.uid));
//!         }
//!         if message.topic.starts_with("sensors/") {
//!             let mut stamped = b"checked:".to_vec();
//!             stamped.extend_from_slice(&message.payload);
//!             return Verdict::Rewrite(stamped.into());
//!         }
//!         Verdict::Allow
//!     }
//! }
//! # let _: Box<dyn Hook> = Box::new(Gatekeeper);
//! ```

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use crate::domain::Protocol;

use crate::metrics::Metrics;

/// What a hook, a script or a provider that fails (errs, overruns, panics) means for what it
/// was judging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Refuse (the default: a broken filter must not let everything through).
    Deny,
    /// Let it through.
    Allow,
}

/// A connected client as hooks see it, after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The authenticated uid.
    pub uid: String,
    /// The MQTT client id.
    pub client_id: String,
    /// The CONNECT's username, if any.
    pub username: Option<String>,
    /// `"3.1.1"` or `"5"`.
    pub protocol: Protocol,
    /// The name of the listener it came through.
    pub listener: Arc<str>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The CONNECT's clean-session (clean start) flag.
    pub clean_session: bool,
    /// The CONNECT's keep-alive, seconds.
    pub keep_alive: u16,
}

/// One filter of a SUBSCRIBE to a non-IM topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The topic filter.
    pub filter: String,
    /// The requested QoS.
    pub qos: u8,
}

/// A publish on a non-IM topic, from a client (`publish`) or to one (`delivered`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic.
    pub topic: String,
    /// Its QoS.
    pub qos: u8,
    /// Its retain flag.
    pub retain: bool,
    /// Its payload.
    pub payload: Bytes,
}

/// A hook's answer to a decision point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allow,
    /// Refuse; the reason goes to an MQTT 5 client (trimmed and cleaned) and to the log.
    Deny(String),
    /// Go ahead with this payload instead (publishes only; elsewhere the same as `Allow`).
    Rewrite(Bytes),
}

/// Which points a hook takes part in, so that a connection does not wait for hooks that
/// have nothing to say (a publish nobody judges is relayed at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interests {
    /// [`Hook::admit`].
    pub admit: bool,
    /// [`Hook::subscribe`].
    pub subscribe: bool,
    /// [`Hook::publish`].
    pub publish: bool,
    /// [`Hook::connected`], [`Hook::delivered`] and [`Hook::disconnected`].
    pub notifications: bool,
}

impl Interests {
    /// Every point.
    pub const ALL: Self = Self {
        admit: true,
        subscribe: true,
        publish: true,
        notifications: true,
    };
    /// No point.
    pub const NONE: Self = Self {
        admit: false,
        subscribe: false,
        publish: false,
        notifications: false,
    };

    fn or(self, other: Self) -> Self {
        Self {
            admit: self.admit || other.admit,
            subscribe: self.subscribe || other.subscribe,
            publish: self.publish || other.publish,
            notifications: self.notifications || other.notifications,
        }
    }
}

/// One hook at every point of the MQTT lifecycle. Every method has a neutral default, so a
/// hook implements only the points it cares about. Calls for different connections run
/// concurrently; a hook must not block its thread (send blocking work to
/// `tokio::task::spawn_blocking`, as the Lua policy runs on threads of its own).
#[async_trait]
pub trait Hook: Send + Sync + std::fmt::Debug {
    /// A short name for logs and metrics.
    fn name(&self) -> &str;

    /// The points this hook takes part in (all, unless it says otherwise).
    fn interests(&self) -> Interests {
        Interests::ALL
    }

    /// How long one call may take before it counts as failed.
    fn deadline(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// What an overrun or panic of a decision means (refusal, unless the hook says otherwise).
    fn on_error(&self) -> OnError {
        OnError::Deny
    }

    /// Decides on a client once its credentials are accepted, before CONNACK.
    async fn admit(&self, _client: &Client) -> Verdict {
        Verdict::Allow
    }

    /// The client was admitted (CONNACK sent).
    async fn connected(&self, _client: &Client) {}

    /// Decides on one filter of a SUBSCRIBE to a non-IM topic (after the topic ACL).
    async fn subscribe(&self, _client: &Client, _subscription: &Subscription) -> Verdict {
        Verdict::Allow
    }

    /// Decides on a publish to a non-IM topic (after the topic ACL); a rewrite replaces the
    /// payload that later hooks and subscribers see.
    async fn publish(&self, _client: &Client, _message: &Message) -> Verdict {
        Verdict::Allow
    }

    /// A publish on a non-IM topic was handed to the client's connection.
    async fn delivered(&self, _client: &Client, _message: &Message) {}

    /// The connection ended.
    async fn disconnected(&self, _client: &Client) {}
}

/// A shared hook is a hook, so a service can keep its own handle on the state its hook
/// fills (counters, caches).
#[async_trait]
impl<H: Hook + ?Sized> Hook for Arc<H> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn interests(&self) -> Interests {
        (**self).interests()
    }
    fn deadline(&self) -> Duration {
        (**self).deadline()
    }
    fn on_error(&self) -> OnError {
        (**self).on_error()
    }
    async fn admit(&self, client: &Client) -> Verdict {
        (**self).admit(client).await
    }
    async fn connected(&self, client: &Client) {
        (**self).connected(client).await;
    }
    async fn subscribe(&self, client: &Client, subscription: &Subscription) -> Verdict {
        (**self).subscribe(client, subscription).await
    }
    async fn publish(&self, client: &Client, message: &Message) -> Verdict {
        (**self).publish(client, message).await
    }
    async fn delivered(&self, client: &Client, message: &Message) {
        (**self).delivered(client, message).await;
    }
    async fn disconnected(&self, client: &Client) {
        (**self).disconnected(client).await;
    }
}

/// The registered hooks, in order, with what together they take part in.
#[derive(Debug, Clone)]
pub(crate) struct Hooks {
    chain: Arc<[Arc<dyn Hook>]>,
    interests: Interests,
    metrics: Arc<Metrics>,
    /// The connections' notifier tasks, waited for by [`Hooks::close`].
    notifiers: TaskTracker,
}

/// Notifications queued per connection before new ones are dropped (and counted).
const NOTIFICATION_QUEUE: usize = 256;

/// A lifecycle notification for a connection's notifier task.
#[derive(Debug)]
enum Notification {
    Connected,
    Delivered(Message),
    Disconnected,
}

/// One connection's notifications, run in order on a task of their own; `disconnected`
/// follows the rest once the notifier is dropped.
#[derive(Debug)]
pub(crate) struct Notifier {
    queue: mpsc::Sender<Notification>,
    metrics: Arc<Metrics>,
}

impl Notifier {
    /// Queues `delivered` for `message`; dropped (and counted) when the hooks fall behind.
    pub(crate) fn delivered(&self, message: Message) {
        self.send(Notification::Delivered(message));
    }

    fn send(&self, notification: Notification) {
        if self.queue.try_send(notification).is_err() {
            self.metrics.count_hook_failure("all", "dropped");
        }
    }
}

impl Hooks {
    /// `chain`, called in this order.
    pub(crate) fn new(chain: Vec<Arc<dyn Hook>>, metrics: Arc<Metrics>) -> Self {
        let interests = chain
            .iter()
            .fold(Interests::NONE, |all, hook| all.or(hook.interests()));
        Self {
            chain: chain.into(),
            interests,
            metrics,
            notifiers: TaskTracker::new(),
        }
    }

    /// What the hooks together take part in.
    pub(crate) fn interests(&self) -> Interests {
        self.interests
    }

    /// The first refusal of any hook, or `Allow`.
    pub(crate) async fn admit(&self, client: &Client) -> Verdict {
        let verdict = self
            .decide("admit", |i| i.admit, |hook| hook.admit(client))
            .await;
        self.count("connect", &verdict);
        verdict
    }

    /// The first refusal of any hook, or `Allow`.
    pub(crate) async fn subscribe(&self, client: &Client, subscription: &Subscription) -> Verdict {
        let verdict = self
            .decide(
                "subscribe",
                |i| i.subscribe,
                |hook| hook.subscribe(client, subscription),
            )
            .await;
        self.count("subscribe", &verdict);
        verdict
    }

    /// The first refusal of any hook, or the payload as the last rewrite left it (`Allow`
    /// when none rewrote it).
    pub(crate) async fn publish(&self, client: &Client, message: Message) -> Verdict {
        let mut message = message;
        let mut rewritten = false;
        for hook in self.chain.iter().filter(|h| h.interests().publish) {
            match self
                .call_decision(hook.as_ref(), "publish", hook.publish(client, &message))
                .await
            {
                Verdict::Allow => {}
                Verdict::Rewrite(payload) => {
                    message.payload = payload;
                    rewritten = true;
                }
                deny @ Verdict::Deny(_) => {
                    self.count("publish", &deny);
                    return deny;
                }
            }
        }
        let verdict = if rewritten {
            Verdict::Rewrite(message.payload)
        } else {
            Verdict::Allow
        };
        self.count("publish", &verdict);
        verdict
    }

    /// Starts the notifications of `client`'s connection (`connected` now, `disconnected`
    /// when the notifier is dropped), if any hook wants them.
    pub(crate) fn notifier(&self, client: Arc<Client>) -> Option<Notifier> {
        if !self.interests.notifications {
            return None;
        }
        let (queue, mut notifications) = mpsc::channel(NOTIFICATION_QUEUE);
        let hooks = self.clone();
        let span = tracing::Span::current();
        let notifying = async move {
            while let Some(notification) = notifications.recv().await {
                hooks.notify(&client, &notification).await;
            }
            hooks.notify(&client, &Notification::Disconnected).await;
        };
        self.notifiers.spawn(notifying.instrument(span));
        let notifier = Notifier {
            queue,
            metrics: Arc::clone(&self.metrics),
        };
        notifier.send(Notification::Connected);
        Some(notifier)
    }

    /// Once every connection has ended: waits until the hooks heard the last notifications
    /// (each call bounded by its hook's deadline).
    pub(crate) async fn close(&self) {
        self.notifiers.close();
        self.notifiers.wait().await;
    }

    async fn notify(&self, client: &Client, notification: &Notification) {
        for hook in self.chain.iter().filter(|h| h.interests().notifications) {
            let (point, call) = match notification {
                Notification::Connected => ("connected", hook.connected(client)),
                Notification::Delivered(message) => ("delivered", hook.delivered(client, message)),
                Notification::Disconnected => ("disconnected", hook.disconnected(client)),
            };
            if self.guarded(hook.as_ref(), point, call).await.is_none() {
                self.metrics.count_hook_failure(hook.name(), point);
            }
        }
    }

    /// Runs the decision of every interested hook in order; the first refusal ends it.
    async fn decide<'a, F>(
        &'a self,
        point: &'static str,
        interested: fn(Interests) -> bool,
        call: F,
    ) -> Verdict
    where
        F: Fn(&'a dyn Hook) -> futures::future::BoxFuture<'a, Verdict>,
    {
        for hook in self.chain.iter().filter(|h| interested(h.interests())) {
            let verdict = self
                .call_decision(hook.as_ref(), point, call(hook.as_ref()))
                .await;
            if let Verdict::Deny(_) = verdict {
                return verdict;
            }
        }
        Verdict::Allow
    }

    /// One hook's decision under its deadline; an overrun or panic follows its `on_error`.
    async fn call_decision(
        &self,
        hook: &dyn Hook,
        point: &'static str,
        call: futures::future::BoxFuture<'_, Verdict>,
    ) -> Verdict {
        match self.guarded(hook, point, call).await {
            Some(verdict) => verdict,
            None => {
                self.metrics.count_hook_failure(hook.name(), point);
                match hook.on_error() {
                    OnError::Allow => Verdict::Allow,
                    OnError::Deny => Verdict::Deny("not allowed now".into()),
                }
            }
        }
    }

    /// `call` under `hook`'s deadline, with a panic caught; `None` if it did not finish.
    async fn guarded<T>(
        &self,
        hook: &dyn Hook,
        point: &'static str,
        call: futures::future::BoxFuture<'_, T>,
    ) -> Option<T> {
        let outcome = tokio::time::timeout(hook.deadline(), AssertUnwindSafe(call).catch_unwind());
        match outcome.await {
            Ok(Ok(answer)) => Some(answer),
            Ok(Err(_)) => {
                tracing::warn!(
                    hook = crate::text::clean(hook.name(), 64),
                    point,
                    "hook panicked"
                );
                None
            }
            Err(_) => {
                tracing::warn!(
                    hook = crate::text::clean(hook.name(), 64),
                    point,
                    "hook overran its deadline"
                );
                None
            }
        }
    }

    fn count(&self, point: &'static str, verdict: &Verdict) {
        let answer = match verdict {
            Verdict::Allow => "allow",
            Verdict::Deny(_) => "deny",
            Verdict::Rewrite(_) => "rewrite",
        };
        self.metrics.verdict(point, answer);
    }
}
