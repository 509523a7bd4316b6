//! Quick load run on the embedded store: C senders put N chat messages into one offline
//! user's inbox (QoS 1, each counted when its PUBACK — i.e. the commit — arrives), then the
//! user (who had connected once before, like any returning user) reconnects and the time
//! from SUBSCRIBE to the digest is measured.
//!
//! `cargo run --release --example offline_load -- --messages 100000 --conversations 1000`
//! Starts its own mqtt-im in-process on a free port with a temporary data folder, or with
//! `--postgres URL` on a fresh PostgreSQL schema (`load_<pid>`, left for inspection), and
//! `--redis URL` for the production pair (digest cache under the prefix `load_<pid>`).

use std::time::{Duration, Instant};

use clap::Parser;
use mqtt_im::server::CancellationToken;
use mqtt_im::wire::pb;
use mqtt_im::{Config, Server};
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Offline store throughput and digest latency.
#[derive(Debug, Parser)]
struct Args {
    /// Messages in all.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Senders, one conversation each.
    #[arg(long, default_value_t = 1_000)]
    conversations: usize,
    /// Text size of each message in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Senders connected at the same time.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// Store on this PostgreSQL URL (a fresh schema) instead of the embedded store.
    #[arg(long)]
    postgres: Option<String>,
    /// With `--postgres`: Redis for presence and the digest cache.
    #[arg(long, requires = "postgres")]
    redis: Option<String>,
}

fn options(addr: std::net::SocketAddr, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(100);
    options.set_max_packet_size(16 << 20, 16 << 20);
    options
}

/// One sender: publishes `count` messages to bob and waits for every PUBACK.
async fn sender(
    addr: std::net::SocketAddr,
    id: usize,
    count: usize,
    text: String,
) -> Result<(), Error> {
    let (client, mut events) = AsyncClient::new(options(addr, &format!("sender{id}")), 200);
    let publisher = tokio::spawn(async move {
        for i in 0..count {
            let payload =
                pb::Envelope::text(format!("{id}-{i}"), "bob", text.as_str()).encode_to_vec();
            client
                .publish("im/u/bob", QoS::AtLeastOnce, false, payload)
                .await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });
    let mut acked = 0;
    while acked < count {
        if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
            acked += 1;
        }
    }
    let client = publisher.await??;
    client.disconnect().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.listeners.mqtt = "127.0.0.1:0".parse()?;
    config.store.path = dir.path().join("im.db");
    config.auth.allow_anonymous = true;
    config.auth.uid_from = mqtt_im::config::UidSource::ClientId;
    if let Some(url) = &args.postgres {
        config.store.backend = mqtt_im::config::Backend::Postgres;
        config.store.postgres.url = url.clone();
        config.store.postgres.schema = format!("load_{}", std::process::id());
    }
    if let Some(url) = &args.redis {
        config.cluster.redis_url = url.clone();
        config.cluster.key_prefix = format!("load_{}", std::process::id());
    }
    let server = Server::bind(config).await?;
    let addr = server.local_addr()?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(server.run(shutdown.clone()));

    let (_, before) = reconnect(addr).await?;
    println!(
        "bob connected once: {} conversations",
        before.sessions.len()
    );

    let per_sender = args.messages / args.conversations.max(1);
    let text = "x".repeat(args.size);
    let started = Instant::now();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let senders: Vec<_> = (0..args.conversations)
        .map(|id| {
            let (slots, text) = (slots.clone(), text.clone());
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await?;
                sender(addr, id, per_sender, text).await
            })
        })
        .collect();
    for sender in senders {
        sender.await??;
    }
    let elapsed = started.elapsed();
    let stored = per_sender * args.conversations;
    println!(
        "stored {stored} messages in {:.2}s: {:.0} msg/s (PUBACK after commit)",
        elapsed.as_secs_f64(),
        stored as f64 / elapsed.as_secs_f64()
    );

    let (took, digest) = reconnect(addr).await?;
    let unread: u64 = digest.sessions.values().map(|s| s.count).sum();
    println!(
        "digest after {:.1} ms: {} conversations, {unread} unread, {} bytes",
        took.as_secs_f64() * 1e3,
        digest.sessions.len(),
        digest.encoded_len()
    );
    shutdown.cancel();
    running.await?;
    Ok(())
}

/// Bob connects, subscribes and gets his digest: how long from SUBSCRIBE, and the digest.
async fn reconnect(addr: std::net::SocketAddr) -> Result<(Duration, pb::Digest), Error> {
    let (bob, mut events) = AsyncClient::new(options(addr, "bob"), 10);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
            break;
        }
    }
    let subscribed = Instant::now();
    bob.subscribe("im/u/bob/#", QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::Publish(publish)) = events.poll().await? {
            if publish.topic == "im/u/bob/digest" {
                let took = subscribed.elapsed();
                let digest = pb::Digest::decode(publish.payload.as_ref())?;
                bob.disconnect().await?;
                while events.poll().await.is_ok() {}
                return Ok((took, digest));
            }
        }
    }
}
