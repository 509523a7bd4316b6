//! Hooks of an embedding service beside IM and the Lua policy, over real connections: each
//! lifecycle point, the order of the chain, rewrites, and hooks that overrun or panic
//! without holding up other connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use mqtt_im::hook::{
    Client as HookClient, Hook, Interests, Message, OnError, Subscription, Verdict,
};

/// Records what it heard, refuses `carol`, `secret/…` filters and `closed/…` publishes, and
/// appends its tag to every other pass-through payload.
#[derive(Debug, Default)]
struct Recorder {
    tag: &'static str,
    heard: Mutex<Vec<String>>,
}

impl Recorder {
    fn new(tag: &'static str) -> Arc<Self> {
        Arc::new(Self {
            tag,
            heard: Mutex::default(),
        })
    }

    fn hear(&self, event: String) {
        self.heard.lock().unwrap().push(event);
    }

    fn heard(&self) -> Vec<String> {
        self.heard.lock().unwrap().clone()
    }
}

#[mqtt_im::async_trait]
impl Hook for Recorder {
    fn name(&self) -> &str {
        self.tag
    }

    async fn admit(&self, client: &HookClient) -> Verdict {
        self.hear(format!("admit {} on {}", client.uid, client.listener));
        if client.uid == "carol" {
            return Verdict::Deny("carol is away".into());
        }
        Verdict::Allow
    }

    async fn connected(&self, client: &HookClient) {
        self.hear(format!("connected {}", client.client_id));
    }

    async fn subscribe(&self, _client: &HookClient, subscription: &Subscription) -> Verdict {
        self.hear(format!("subscribe {}", subscription.filter));
        if subscription.filter.starts_with("secret/") {
            return Verdict::Deny("no secrets".into());
        }
        Verdict::Allow
    }

    async fn publish(&self, _client: &HookClient, message: &Message) -> Verdict {
        self.hear(format!("publish {}", message.topic));
        if message.topic.starts_with("closed/") {
            return Verdict::Deny("closed topic".into());
        }
        let mut payload = message.payload.to_vec();
        payload.extend_from_slice(format!("+{}", self.tag).as_bytes());
        Verdict::Rewrite(payload.into())
    }

    async fn delivered(&self, client: &HookClient, message: &Message) {
        self.hear(format!(
            "delivered {} to {}",
            message.topic, client.client_id
        ));
    }

    async fn disconnected(&self, client: &HookClient) {
        self.hear(format!("disconnected {}", client.client_id));
    }
}

/// Blocks `slow/…` publishes far past its deadline (saying when one starts), and panics on
/// subscriptions.
#[derive(Debug)]
struct Broken {
    on_error: OnError,
    slow_started: Arc<tokio::sync::Notify>,
}

impl Broken {
    fn new(on_error: OnError) -> Self {
        Self {
            on_error,
            slow_started: Arc::default(),
        }
    }
}

#[mqtt_im::async_trait]
impl Hook for Broken {
    fn name(&self) -> &str {
        "broken"
    }

    fn interests(&self) -> Interests {
        Interests {
            notifications: false,
            ..Interests::ALL
        }
    }

    fn deadline(&self) -> Duration {
        Duration::from_millis(300)
    }

    fn on_error(&self) -> OnError {
        self.on_error
    }

    async fn subscribe(&self, _client: &HookClient, subscription: &Subscription) -> Verdict {
        assert!(
            !subscription.filter.starts_with("boom/"),
            "a hook that panics"
        );
        Verdict::Allow
    }

    async fn publish(&self, _client: &HookClient, message: &Message) -> Verdict {
        if message.topic.starts_with("slow/") {
            self.slow_started.notify_one();
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Verdict::Allow
    }
}

const LUA: &str = r#"
hooks = {
  on_publish = function(p)
    if p.topic:find("^lua/") then return false, "the script said no" end
  end,
}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn every_point_reaches_the_hooks_in_order_beside_im() {
    let (first, second) = (Recorder::new("one"), Recorder::new("two"));
    let dir = tempfile::tempdir().unwrap();
    let lua = script(dir.path(), "hooks.lua", LUA);
    let broker = TestBroker::start_built(
        |config| config.policy.scripts = vec![lua],
        |builder| builder.hook(Arc::clone(&first)).hook(Arc::clone(&second)),
    )
    .await;

    // admit: carol is refused (MQTT 5: not authorized), alice is admitted on "mqtt".
    let refused = try_connect(
        broker.addr,
        true,
        "carol-phone",
        true,
        Some(("carol", "pw")),
    )
    .await;
    assert_eq!(refused.map(|ack| ack.code), Some(0x87));
    let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;

    // subscribe: pass-through filters are judged, IM filters are the IM service's.
    assert_eq!(bob.subscribe("secret/#", 1).await, vec![0x87]);
    assert_eq!(bob.subscribe("news/#", 1).await, vec![1]);
    assert_eq!(bob.subscribe("im/u/bob/#", 1).await, vec![1]);
    let _ = bob.digest("bob").await;

    // publish: the Lua policy first, then the hooks in order, each seeing the rewrite of the
    // one before; a refusal stops the chain.
    let (code, reason) = alice.publish_answered("lua/x", b"1".to_vec()).await;
    assert_eq!(
        (code, reason.as_deref()),
        (0x87, Some("the script said no"))
    );
    let (code, reason) = alice.publish_answered("closed/x", b"2".to_vec()).await;
    assert_eq!((code, reason.as_deref()), (0x87, Some("closed topic")));
    assert_eq!(alice.publish_acked("news/today", b"x".to_vec()).await, 0);
    assert_eq!(bob.next_on("news/today").await, b"x+one+two");

    // IM beside the hooks: a chat message is neither judged nor rewritten by them.
    let stored = alice
        .publish_acked("im/u/bob", chat("m1", "bob", "hello", false))
        .await;
    assert_eq!(stored, 0);
    let delivered = bob.next_on("im/u/bob").await;
    assert_eq!(chat_seq(&delivered), 1);

    alice.disconnect().await;
    bob.disconnect().await;
    eventually(|| async {
        second
            .heard()
            .iter()
            .filter(|e| e.starts_with("disconnected"))
            .count()
            == 2
    })
    .await;

    let heard = first.heard();
    assert!(
        heard.contains(&"admit carol on mqtt".to_owned()),
        "{heard:?}"
    );
    assert!(
        !heard.contains(&"connected carol-phone".to_owned()),
        "{heard:?}"
    );
    assert!(
        !heard.iter().any(|e| e.contains("lua/")),
        "the script refused it first: {heard:?}"
    );
    assert!(
        !heard.iter().any(|e| e.contains("im/")),
        "IM is not a hook point: {heard:?}"
    );
    // The second hook never saw what the first refused.
    assert!(!second.heard().iter().any(|e| e.contains("closed/")));
    // One connection's notifications in order: connected, deliveries, disconnected.
    let bob_events: Vec<String> = second
        .heard()
        .into_iter()
        .filter(|e| e.ends_with("bob-phone") && !e.starts_with("admit"))
        .collect();
    assert_eq!(
        bob_events,
        [
            "connected bob-phone",
            "delivered news/today to bob-phone",
            "disconnected bob-phone"
        ]
    );
    let metrics = broker.im.metrics().render();
    assert!(
        metrics.contains("mqtt_im_policy_verdicts_total{hook=\"publish\",verdict=\"rewrite\"} 1"),
        "{metrics}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hook_that_overruns_or_panics_follows_on_error_and_stalls_nobody_else() {
    let broken = Broken::new(OnError::Allow);
    let slow_started = Arc::clone(&broken.slow_started);
    let broker = TestBroker::start_built(|_| {}, |builder| builder.hook(broken)).await;
    let mut watcher = Client::v5(broker.addr, "watcher", "carol").await;
    assert_eq!(watcher.subscribe("#", 1).await, vec![1]);
    let alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    let mut bob = Client::v5(broker.addr, "bob-phone", "bob").await;

    // alice's publish waits for the hook's deadline; bob's, sent after it, does not wait.
    alice.publish("slow/x", 1, b"slow".to_vec()).await;
    tokio::time::timeout(WAIT, slow_started.notified())
        .await
        .expect("the slow publish never reached the hook");
    assert_eq!(bob.publish_acked("fast/x", b"fast".to_vec()).await, 0);
    let first = watcher.next().await;
    assert!(
        matches!(&first, Seen::Publish { topic, .. } if topic == "fast/x"),
        "{first:?}"
    );
    // Then the overrun follows on_error = allow.
    assert_eq!(watcher.next_on("slow/x").await, b"slow");

    // A panic follows on_error too (allow here), and the connection stays up.
    assert_eq!(bob.subscribe("boom/x", 1).await, vec![1]);
    assert_eq!(bob.publish_acked("fast/y", b"still here".to_vec()).await, 0);

    let metrics = broker.im.metrics().render();
    for point in ["publish", "subscribe"] {
        let series = format!("mqtt_im_hook_failures_total{{hook=\"broken\",point=\"{point}\"}} 1");
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_hook_with_on_error_deny_refuses() {
    let broker =
        TestBroker::start_built(|_| {}, |builder| builder.hook(Broken::new(OnError::Deny))).await;
    let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    assert_eq!(alice.subscribe("boom/x", 1).await, vec![0x87]);
    let (code, _) = alice.publish_answered("slow/x", b"1".to_vec()).await;
    assert_eq!(code, 0x87);
    broker.stop().await;
}

/// A service hands the builder a store it opened and the Lua settings: chat messages land in
/// the service's own store, and the scripts judge beside the service's hooks.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_gives_the_builder_its_own_store_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn mqtt_im::store::Store> =
        Arc::new(mqtt_im::store::EmbeddedStore::open(&dir.path().join("service.db"), 64).unwrap());
    let mut policy = mqtt_im::Config::default().policy;
    policy.scripts = vec![script(dir.path(), "hooks.lua", LUA)];
    let broker = TestBroker::start_built(
        |_| {},
        |builder| builder.store(Arc::clone(&store)).policy(policy),
    )
    .await;
    let mut alice = Client::v5(broker.addr, "alice-phone", "alice").await;
    let (code, reason) = alice.publish_answered("lua/x", b"1".to_vec()).await;
    assert_eq!(
        (code, reason.as_deref()),
        (0x87, Some("the script said no"))
    );
    let stored = alice
        .publish_acked("im/u/bob", chat("m1", "bob", "kept here", false))
        .await;
    assert_eq!(stored, 0);
    let conversation = direct("alice", "bob");
    let page = store.history(&conversation, None, 10).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].sender, "alice");
    broker.stop().await;
}
