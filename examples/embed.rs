//! A Rust service that already builds its broker from its own `rumqttd::Config` and adds
//! mqtt-im to it, with a hook of its own beside IM.
//!
//! `cargo run --example embed` starts it on free ports, then checks itself with real MQTT
//! clients and exits non-zero if anything is off:
//! - the service's hook refuses `admin/…` publishes from anyone but `ops` and stamps every
//!   `telemetry/…` payload;
//! - the service reads telemetry through its local rumqttd link, stamped;
//! - a chat message between two users is stored and pulled (IM, beside the hook);
//! - the hook heard of the connections and deliveries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtt_im::hook::{Client, Hook, Message, Verdict};
use mqtt_im::wire::pb;
use prost::Message as _;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The service's own policy for its topics, and a count of what reached its clients.
#[derive(Debug, Default)]
struct Telemetry {
    connected: AtomicUsize,
    delivered: AtomicUsize,
}

#[mqtt_im::async_trait]
impl Hook for Telemetry {
    fn name(&self) -> &str {
        "telemetry"
    }

    async fn publish(&self, client: &Client, message: &Message) -> Verdict {
        if message.topic.starts_with("admin/") && client.uid != "ops" {
            return Verdict::Deny("admin topics are for ops".into());
        }
        if message.topic.starts_with("telemetry/") {
            let mut stamped = format!("{}:", client.uid).into_bytes();
            stamped.extend_from_slice(&message.payload);
            return Verdict::Rewrite(stamped.into());
        }
        Verdict::Allow
    }

    async fn connected(&self, _client: &Client) {
        self.connected.fetch_add(1, Ordering::Relaxed);
    }

    async fn delivered(&self, _client: &Client, _message: &Message) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

/// The service's broker configuration, as it would hand it to `rumqttd::Broker::new`: one
/// MQTT 3.1.1 and one MQTT 5 listener, both with the same users.
fn broker_config() -> rumqttd::Config {
    let users: HashMap<String, String> = ["alice", "bob", "ops"]
        .into_iter()
        .map(|user| (user.to_owned(), format!("{user}-secret")))
        .collect();
    let server = |name: &str| rumqttd::ServerSettings {
        name: name.to_owned(),
        listen: ([127, 0, 0, 1], 0).into(),
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: Some(users.clone()),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: 1 << 20,
            max_segment_count: 2,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_owned(), server("v4-1"))])),
        v5: Some(HashMap::from([("1".to_owned(), server("v5-1"))])),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let data = std::env::temp_dir().join(format!("mqtt-im-embed-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let mut im = mqtt_im::Config::default();
    im.store.path = data.join("im.db");
    let telemetry = Arc::new(Telemetry::default());
    let handle = mqtt_im::Builder::new(broker_config())?
        .im(im)
        .hook(Arc::clone(&telemetry))
        .link("service")
        .start()
        .await?;
    let outcome = check(&handle, &telemetry).await;
    handle.shutdown().await;
    let _ = std::fs::remove_dir_all(&data);
    outcome?;
    println!("embed: all checks passed");
    Ok(())
}

async fn check(handle: &mqtt_im::Handle, telemetry: &Telemetry) -> Result<(), Error> {
    let v4 = handle.listener_addr("v4.1").ok_or("no v4.1 listener")?;
    let (mut link_tx, mut link_rx) = handle.take_link("service").ok_or("no local link")?;
    link_tx.subscribe("telemetry/#")?;

    // Telemetry is stamped by the hook on its way into rumqttd, and the service reads it
    // through its local link.
    let (alice, mut alice_events) = connect(v4, "alice-phone", "alice")?;
    alice
        .publish("telemetry/temp", QoS::AtLeastOnce, false, "21.5")
        .await?;
    let reason = puback(&mut alice_events).await?;
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Some(rumqttd::Notification::Forward(forward))) = link_rx.next().await {
                return forward.publish.payload;
            }
        }
    })
    .await?;
    expect(
        reason == 0 && &seen[..] == b"alice:21.5",
        "stamped telemetry",
    )?;

    // Admin topics: alice is refused (3.1.1 has no refusal code: the message goes nowhere),
    // ops is not.
    let (ops, mut ops_events) = connect(v4, "ops-console", "ops")?;
    ops.subscribe("admin/#", QoS::AtLeastOnce).await?;
    suback(&mut ops_events).await?;
    alice
        .publish("admin/reboot", QoS::AtLeastOnce, false, "from alice")
        .await?;
    puback(&mut alice_events).await?;
    ops.publish("admin/reboot", QoS::AtLeastOnce, false, "from ops")
        .await?;
    let payload = next_publish(&mut ops_events, "admin/reboot").await?;
    expect(payload == b"from ops", "only ops reaches admin topics")?;

    // IM beside the hook: alice writes to bob, who is offline, then reads it.
    let chat = pb::Envelope::text("m1", "bob", "hi bob");
    alice
        .publish("im/u/bob", QoS::AtLeastOnce, false, chat.encode_to_vec())
        .await?;
    expect(puback(&mut alice_events).await? == 0, "chat stored")?;
    let (bob, mut bob_events) = connect(v4, "bob-phone", "bob")?;
    bob.subscribe("im/u/bob/#", QoS::AtLeastOnce).await?;
    let digest = pb::Digest::decode(&next_publish(&mut bob_events, "im/u/bob/digest").await?[..])?;
    let unacked = digest.sessions.get("u/alice").map(|s| s.unacked);
    expect(unacked == Some(1), "bob's digest counts alice's message")?;

    expect(
        telemetry.connected.load(Ordering::Relaxed) >= 3,
        "the hook heard of the connections",
    )?;
    expect(
        telemetry.delivered.load(Ordering::Relaxed) >= 1,
        "the hook heard of the delivery to ops",
    )?;
    let metrics = handle.metrics().render();
    expect(
        metrics.contains("mqtt_im_policy_verdicts_total{hook=\"publish\",verdict=\"rewrite\"}"),
        "rewrites are counted",
    )
}

fn expect(ok: bool, what: &str) -> Result<(), Error> {
    if ok {
        println!("embed: ok: {what}");
        Ok(())
    } else {
        Err(format!("embed: failed: {what}").into())
    }
}

fn connect(
    addr: std::net::SocketAddr,
    client_id: &str,
    user: &str,
) -> Result<(AsyncClient, EventLoop), Error> {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_credentials(user, format!("{user}-secret"));
    Ok(AsyncClient::new(options, 16))
}

/// Polls until `pick` takes an incoming packet.
async fn next<T>(events: &mut EventLoop, pick: impl Fn(Packet) -> Option<T>) -> Result<T, Error> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(packet) = events.poll().await? {
                if let Some(found) = pick(packet) {
                    return Ok(found);
                }
            }
        }
    })
    .await?
}

/// The next PUBACK's code (0: accepted; 3.1.1 has no other).
async fn puback(events: &mut EventLoop) -> Result<u8, Error> {
    next(events, |packet| {
        matches!(packet, Packet::PubAck(_)).then_some(0)
    })
    .await
}

async fn suback(events: &mut EventLoop) -> Result<(), Error> {
    next(events, |packet| {
        matches!(packet, Packet::SubAck(_)).then_some(())
    })
    .await
}

async fn next_publish(events: &mut EventLoop, topic: &str) -> Result<Vec<u8>, Error> {
    next(events, |packet| match packet {
        Packet::Publish(publish) if publish.topic == topic => Some(publish.payload.to_vec()),
        _ => None,
    })
    .await
}
