//! The load harness: mqtt-im side by side with bare rumqttd, in one run on loopback.
//!
//! `cargo bench --bench harness -- <scenario> [flags]` (see `--help`):
//! - `pubsub`: P publishers to per-user topics, S subscribers, the same load on bare rumqttd
//!   and on mqtt-im; messages/s and p50/p99 publish→receive latency on each side, and the
//!   ratio. `--topics chat` uses IM inboxes (stored by mqtt-im, forwarded by rumqttd),
//!   `--topics plain` a non-IM tree (passed through by mqtt-im).
//! - `reconnect`: N messages into one user's inbox from C senders while it is offline (the
//!   offline store's throughput, PUBACK after commit), then SUBSCRIBE → digest on mqtt-im,
//!   against bare rumqttd pushing the same backlog to a persistent session.
//! - `catchup`: a device away for N messages in C conversations (10,000 in 100): time and
//!   bytes until an app on the Rust SDK shows exact badges, against bare rumqttd pushing the
//!   same backlog to a persistent session (`--link-bytes-per-s` paces a slow link).
//! - `pull`: Pull latency (pages of 50, each acknowledging the one before) with M stored
//!   messages.
//! - `idle`: resident memory per idle connection (20,000 by default, as many as the
//!   open-file limit allows) of the `mqtt-im` binary on the embedded store, bare rumqttd and
//!   Debian's Mosquitto, each its own process on a free port.
//! - `storm`: every device reconnecting at once (20,000, each with a small backlog):
//!   CONNACK rate and when the last digest arrived, beside bare rumqttd and Mosquitto
//!   (CONNACK and SUBACK).
//! - `connect`: CONNECT→CONNACK rate per authentication provider.
//! - `soak`: a day of chat at an accelerated clock (2,000,000 messages among 10,000 users
//!   with a short retention), in ten windows: stored rows and database size, append, digest
//!   and pull latency, and what retention deleted, window by window.
//! - `cluster`: plain topics on two or three nodes (PostgreSQL and Redis): one node alone,
//!   then subscribers on the publishers' node and on the others, and a node's death (see
//!   `harness/cluster.rs`).
//!
//! Every scenario runs mqtt-im on the embedded store; `--postgres URL` (and `--redis URL`)
//! runs it on PostgreSQL (and Redis) in a fresh schema `bench_<pid>` left for inspection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use mqtt_im::domain::Uid;
use mqtt_im::server::CancellationToken;
use mqtt_im::store::{Conversation, Device, NewMessage};
use mqtt_im::wire::pb;
use mqtt_im::{Config, Server};
use prost::Message;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

#[path = "harness/catchup.rs"]
mod catchup;
#[path = "harness/cluster.rs"]
mod cluster;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Parser)]
#[command(about = "mqtt-im against bare rumqttd")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Run mqtt-im on this PostgreSQL URL instead of the embedded store.
    #[arg(long, global = true)]
    postgres: Option<String>,
    /// With --postgres: Redis for presence and the digest cache.
    #[arg(long, global = true)]
    redis: Option<String>,
    /// Lua policy scripts mqtt-im runs on every chat message, in order (repeat the flag).
    #[arg(long, global = true)]
    policy: Vec<std::path::PathBuf>,
    /// Word lists for the scripts, NAME=FILE (repeat the flag).
    #[arg(long, global = true)]
    words: Vec<String>,
    /// Ignored (cargo bench passes it).
    #[arg(long, global = true, hide = true)]
    bench: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Live publish/subscribe throughput and latency.
    Pubsub(PubsubArgs),
    /// Offline store throughput, then the digest against a pushed backlog.
    Reconnect(ReconnectArgs),
    /// A device away for 10,000 messages in 100 conversations: time and bytes until an app on
    /// the SDK shows the badges, against the same backlog pushed by bare rumqttd.
    Catchup(catchup::CatchupArgs),
    /// Pull latency over a large store.
    Pull(PullArgs),
    /// Memory per idle connection of mqtt-im and of bare rumqttd, each its own process.
    Idle(IdleArgs),
    /// CONNECT→CONNACK rate with each authentication provider, beside bare rumqttd.
    Connect(ConnectArgs),
    /// A reconnect storm: devices with a small backlog all connecting at once.
    Storm(StormArgs),
    /// A day of traffic at an accelerated clock with a short retention: does the store
    /// level off while its latencies hold?
    Soak(SoakArgs),
    /// Plain topics on two or three nodes (needs --postgres and --redis): one node against
    /// subscribers on the same node and on another, then what a node's death costs.
    Cluster(cluster::ClusterArgs),
    /// Runs bare rumqttd on `--listen` until killed (for `idle` and `storm`).
    #[command(hide = true)]
    ServeBare {
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(Debug, Clone, Args)]
struct StormArgs {
    /// Devices connecting at once.
    #[arg(long, default_value_t = 20_000)]
    devices: usize,
    /// Chat messages waiting for each device.
    #[arg(long, default_value_t = 3)]
    backlog: usize,
    /// Devices between CONNECT and greeting at any moment (0: all at once). Beyond the
    /// kernel's accept queue (`somaxconn`) SYNs are dropped and retried a second later,
    /// which then measures the kernel's retransmission timer rather than the broker.
    #[arg(long, default_value_t = 4_000)]
    in_flight: usize,
    /// mqtt-im alone, without bare rumqttd and Mosquitto beside it.
    #[arg(long)]
    alone: bool,
}

#[derive(Debug, Clone, Args)]
struct SoakArgs {
    /// Messages stored over the simulated day.
    #[arg(long, default_value_t = 2_000_000)]
    messages: usize,
    /// Users, each chatting with its next 5 (1:1 conversations).
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Retention of the simulated clock, in hours.
    #[arg(long, default_value_t = 2)]
    retention_hours: u64,
    /// Digests and pulls measured after each window.
    #[arg(long, default_value_t = 300)]
    probes: usize,
    /// With --postgres: VACUUM the tables after each window's garbage collection, as
    /// autovacuum would have many times over 2.4 hours of real time (the accelerated clock
    /// leaves it no time to).
    #[arg(long)]
    vacuum: bool,
}

#[derive(Debug, Clone, Args)]
struct ConnectArgs {
    /// Connections made per provider.
    #[arg(long, default_value_t = 2_000)]
    connections: usize,
    /// Connections being made at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

#[derive(Debug, Clone, Args)]
struct IdleArgs {
    /// Idle clients, each subscribed to its inbox.
    #[arg(long, default_value_t = 20_000)]
    connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Topics {
    /// `im/u/{uid}`: IM chat (stored by mqtt-im).
    Chat,
    /// `load/u/{uid}`: other topics (passed through by mqtt-im).
    Plain,
}

#[derive(Debug, Clone, Args)]
struct PubsubArgs {
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    #[arg(long, default_value_t = 8)]
    subscribers: usize,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload bytes (the text of chat messages).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Seconds of load per side.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, value_enum, default_value_t = Topics::Chat)]
    topics: Topics,
    /// Messages per second per publisher (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Chat messages per second sent to mqtt-im beside the measured load (each one runs the
    /// policy), e.g. to see what a heavy script does to pass-through traffic.
    #[arg(long, default_value_t = 0)]
    chat_beside: u64,
    /// Also run mqtt-im with offline push on and a pusher for every subscriber: what
    /// queueing each stored message for push costs (the subscribers are online, so nothing
    /// is sent).
    #[arg(long)]
    pushers: bool,
}

#[derive(Debug, Clone, Args)]
struct ReconnectArgs {
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    #[arg(long, default_value_t = 1_000)]
    conversations: usize,
    /// Senders connected at the same time.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    #[arg(long, default_value_t = 64)]
    size: usize,
}

#[derive(Debug, Clone, Args)]
struct PullArgs {
    /// Messages stored before measuring.
    #[arg(long, default_value_t = 1_000_000)]
    stored: usize,
    #[arg(long, default_value_t = 1_000)]
    conversations: usize,
    /// Pulls measured.
    #[arg(long, default_value_t = 2_000)]
    pulls: usize,
}

fn main() -> Result<(), Error> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match &cli.scenario {
            Scenario::Pubsub(args) => pubsub(&cli, args).await,
            Scenario::Reconnect(args) => reconnect(&cli, args).await,
            Scenario::Catchup(args) => catchup::run(&cli, args).await,
            Scenario::Pull(args) => pull(&cli, args).await,
            Scenario::Idle(args) => idle(args).await,
            Scenario::Connect(args) => connect_rate(&cli, args).await,
            Scenario::Storm(args) => storm(args).await,
            Scenario::Soak(args) => soak(&cli, args).await,
            Scenario::Cluster(args) => cluster::run(&cli, args).await,
            Scenario::ServeBare { listen } => {
                bare_rumqttd_on(*listen, false)?;
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// The two brokers

/// Bare rumqttd 0.20 on loopback, with the router settings mqtt-im ships (`big_logs` for a
/// backlog scenario: room for the whole backlog in its commit log).
fn bare_rumqttd(big_logs: bool) -> Result<SocketAddr, Error> {
    let addr = free_port()?;
    bare_rumqttd_on(addr, big_logs)?;
    Ok(addr)
}

/// Bare rumqttd as [`bare_rumqttd`] runs it, on `addr`, taking as many connections as the
/// scenarios open.
fn bare_rumqttd_on(addr: SocketAddr, big_logs: bool) -> Result<(), Error> {
    let defaults = Config::default().broker;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: defaults.max_packet_size,
        max_inflight_count: defaults.max_inflight_count,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "bare".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let (segment, count) = if big_logs {
        (256 << 20, 10)
    } else {
        (defaults.max_segment_size, defaults.max_segment_count)
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: defaults.max_connections.max(100_000),
            max_outgoing_packet_count: defaults.max_inflight_count as u64,
            max_segment_size: segment,
            max_segment_count: count,
            ..Default::default()
        },
        v4: Some(HashMap::from([("bare".to_owned(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("bare-rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("bare rumqttd stopped: {e}");
            }
        })?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// mqtt-im on port 0, anonymous clients with their client id as uid.
async fn mqtt_im(
    cli: &Cli,
) -> Result<
    (
        SocketAddr,
        Arc<dyn mqtt_im::store::Store>,
        CancellationToken,
    ),
    Error,
> {
    mqtt_im_with(cli, |_| {}).await
}

/// The configuration every mqtt-im of the harness starts from: anonymous clients whose
/// uid is their client id, on a fresh store (`--postgres`, `--redis`, `--policy` applied).
fn mqtt_im_config(cli: &Cli) -> Result<Config, Error> {
    let dir = tempfile::tempdir()?.keep();
    let mut config = Config::default();
    config.listeners.mqtt = "127.0.0.1:0".parse()?;
    config.store.path = dir.join("im.db");
    config.auth.allow_anonymous = true;
    config.auth.uid_from = mqtt_im::config::UidSource::ClientId;
    let tag = format!("bench_{}", std::process::id());
    if let Some(url) = &cli.postgres {
        config.store.backend = mqtt_im::config::Backend::Postgres;
        config.store.postgres.url = url.clone();
        config.store.postgres.schema = tag.clone();
    }
    if let Some(url) = &cli.redis {
        config.cluster.redis_url = url.clone();
        config.cluster.key_prefix = tag;
    }
    config.policy.scripts = cli.policy.clone();
    for list in &cli.words {
        let (name, file) = list.split_once('=').ok_or("--words takes NAME=FILE")?;
        config.policy.words.insert(name.to_owned(), file.into());
    }
    Ok(config)
}

/// mqtt-im as [`mqtt_im`] starts it, with `adjust` applied to its configuration.
async fn mqtt_im_with(
    cli: &Cli,
    adjust: impl FnOnce(&mut Config),
) -> Result<
    (
        SocketAddr,
        Arc<dyn mqtt_im::store::Store>,
        CancellationToken,
    ),
    Error,
> {
    let mut config = mqtt_im_config(cli)?;
    adjust(&mut config);
    let server = Server::bind(config).await?;
    let addr = server.local_addr()?;
    let store = server.store();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    Ok((addr, store, shutdown))
}

fn backend_name(cli: &Cli) -> &'static str {
    match (&cli.postgres, &cli.redis) {
        (None, _) => "embedded",
        (Some(_), None) => "postgres",
        (Some(_), Some(_)) => "postgres+redis",
    }
}

fn options(addr: SocketAddr, client_id: &str, clean: bool) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(100);
    options.set_clean_session(clean);
    options.set_max_packet_size(16 << 20, 16 << 20);
    options
}

async fn connected(
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
    cap: usize,
) -> Result<(AsyncClient, EventLoop), Error> {
    let (client, mut events) = AsyncClient::new(options(addr, client_id, clean), cap);
    // Without TCP_NODELAY a request written behind an ack waits for the peer's delayed ACK
    // (40 ms): every interactive MQTT client should set it.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    events.set_network_options(network);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
            return Ok((client, events));
        }
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// pubsub

/// What one side measured.
#[derive(Debug, Default)]
struct Measured {
    sent: u64,
    received: u64,
    seconds: f64,
    latencies: Vec<u64>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.received as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() - 1) as f64 * p).round() as usize;
        sorted[index] as f64 / 1000.0
    }

    fn print(&self, side: &str) {
        println!(
            "{side:>22}: {:>9.0} msg/s received ({} sent, {} received in {:.1} s), latency p50 {:.2} ms, p99 {:.2} ms",
            self.rate(),
            self.sent,
            self.received,
            self.seconds,
            self.percentile(0.5),
            self.percentile(0.99)
        );
    }
}

fn payload(topics: Topics, msg_id: &str, to: &str, text: &str) -> Vec<u8> {
    match topics {
        Topics::Chat => {
            let mut envelope = pb::Envelope::text(msg_id.to_owned(), to, text);
            envelope.time = i64::try_from(now_micros()).unwrap_or(0);
            envelope.encode_to_vec()
        }
        Topics::Plain => {
            let mut bytes = now_micros().to_be_bytes().to_vec();
            bytes.extend_from_slice(text.as_bytes());
            bytes
        }
    }
}

/// When a received payload was sent (microseconds since the epoch).
fn sent_at(topics: Topics, bytes: &[u8]) -> Option<u64> {
    match topics {
        Topics::Chat => pb::Envelope::decode(bytes)
            .ok()
            .and_then(|e| u64::try_from(e.time).ok()),
        Topics::Plain => Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?)),
    }
}

fn topic(topics: Topics, uid: &str) -> String {
    match topics {
        Topics::Chat => format!("im/u/{uid}"),
        Topics::Plain => format!("load/u/{uid}"),
    }
}

async fn run_pubsub(addr: SocketAddr, args: &PubsubArgs, side: &str) -> Result<Measured, Error> {
    run_pubsub_across(addr, &[addr], args, side).await
}

/// [`run_pubsub`] with the publishers on `publish_at` and the subscribers spread over
/// `subscribe_at` (nodes of a cluster).
async fn run_pubsub_across(
    publish_at: SocketAddr,
    subscribe_at: &[SocketAddr],
    args: &PubsubArgs,
    side: &str,
) -> Result<Measured, Error> {
    let addr = publish_at;
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let received = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut subscribers = Vec::new();
    for s in 0..args.subscribers {
        let uid = format!("{side}s{s}");
        let at = subscribe_at[s % subscribe_at.len()];
        let (client, mut events) = connected(at, &uid, true, 100).await?;
        let filter = match args.topics {
            Topics::Chat => format!("im/u/{uid}/#"),
            Topics::Plain => topic(args.topics, &uid),
        };
        client.subscribe(filter, qos).await?;
        let (received, counting, latencies) =
            (received.clone(), counting.clone(), latencies.clone());
        let topics = args.topics;
        subscribers.push(tokio::spawn(async move {
            let _client = client;
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(publish)) = event {
                    let at = now_micros();
                    if !counting.load(Ordering::Relaxed) || publish.topic.ends_with("/digest") {
                        continue;
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                    if let Some(sent) = sent_at(topics, &publish.payload) {
                        if let Ok(mut all) = latencies.lock() {
                            all.push(at.saturating_sub(sent));
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let text = "x".repeat(args.size);
    let mut publishers = Vec::new();
    for p in 0..args.publishers {
        let uid = format!("{side}p{p}");
        let (client, mut events) = connected(addr, &uid, true, 1000).await?;
        let (sent, stop, text, args) = (sent.clone(), stop.clone(), text.clone(), args.clone());
        let side = side.to_owned();
        let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
        publishers.push(tokio::spawn(async move {
            // Paced publishers catch up after a late tick (the timer has 1 ms resolution).
            let mut pace = (args.rate > 0)
                .then(|| tokio::time::interval(Duration::from_micros(1_000_000 / args.rate)));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(pace) = pace.as_mut() {
                    pace.tick().await;
                }
                let to = format!("{side}s{}", (p + i as usize) % args.subscribers);
                let body = payload(args.topics, &format!("{p}-{i}"), &to, &text);
                if client
                    .publish(topic(args.topics, &to), qos, false, body)
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        }));
    }
    // Warm up, then measure for the duration.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent_before = sent.load(Ordering::Relaxed);
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    counting.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let sent_during = sent.load(Ordering::Relaxed) - sent_before;
    stop.store(true, Ordering::Relaxed);
    for publisher in publishers {
        let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    }
    for subscriber in subscribers {
        subscriber.abort();
    }
    let latencies = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(Measured {
        sent: sent_during,
        received: received.load(Ordering::Relaxed),
        seconds,
        latencies,
    })
}

async fn pubsub(cli: &Cli, args: &PubsubArgs) -> Result<(), Error> {
    println!(
        "pubsub: {} publishers -> {} subscribers, QoS {}, {} B, {:?} topics, {} s per side, mqtt-im on {}",
        args.publishers,
        args.subscribers,
        args.qos,
        args.size,
        args.topics,
        args.duration,
        backend_name(cli)
    );
    let bare_addr = bare_rumqttd(false)?;
    let bare = run_pubsub(bare_addr, args, "b").await?;
    bare.print("bare rumqttd");
    let (im_addr, _, shutdown) = mqtt_im(cli).await?;
    let beside =
        (args.chat_beside > 0).then(|| tokio::spawn(chat_beside(im_addr, args.chat_beside)));
    let im = run_pubsub(im_addr, args, "m").await?;
    if let Some(beside) = beside {
        beside.abort();
        println!(
            "{:>22}: {} chat msg/s to mqtt-im beside the load",
            "beside", args.chat_beside
        );
    }
    im.print("mqtt-im");
    println!(
        "{:>22}: throughput {:.0}% of bare, p99 {:.2}x bare",
        "mqtt-im / bare",
        100.0 * im.rate() / bare.rate(),
        im.percentile(0.99) / bare.percentile(0.99)
    );
    print_rss();
    shutdown.cancel();
    if args.pushers {
        let pushed = with_pushers(cli, args).await?;
        pushed.print("mqtt-im + pushers");
        println!(
            "{:>22}: throughput {:.2} of mqtt-im without, p99 {:.2}x",
            "pushers / none",
            pushed.rate() / im.rate(),
            pushed.percentile(0.99) / im.percentile(0.99)
        );
    }
    Ok(())
}

/// The mqtt-im side again, with push on and a pusher registered for every subscriber.
async fn with_pushers(cli: &Cli, args: &PubsubArgs) -> Result<Measured, Error> {
    // Never called: every subscriber is online, so each notification is skipped.
    let gateway = "http://127.0.0.1:9/_matrix/push/v1/notify";
    let (addr, store, shutdown) = mqtt_im_with(cli, |config| {
        config.push.allowed_urls = vec![gateway.to_owned()];
    })
    .await?;
    for s in 0..args.subscribers {
        let device = mqtt_im::store::Device {
            uid: bench_uid(&format!("ps{s}")),
            client_id: format!("ps{s}"),
        };
        let pusher = mqtt_im::store::Pusher {
            device,
            app_id: "bench".into(),
            pushkey: format!("key-{s}"),
            url: gateway.to_owned(),
            format: "event_id_only".into(),
            lang: String::new(),
            data_json: "{}".into(),
            created_ms: 0,
        };
        store.set_pusher(&pusher, 5).await?;
    }
    let measured = run_pubsub(addr, args, "p").await?;
    shutdown.cancel();
    Ok(measured)
}

/// Sends chat messages to an offline user at `rate` per second until aborted.
async fn chat_beside(addr: SocketAddr, rate: u64) -> Result<(), Error> {
    let (client, mut events) = connected(addr, "chatter", true, 1000).await?;
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let mut pace = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let text = "x".repeat(64);
    for i in 0u64.. {
        pace.tick().await;
        let body =
            pb::Envelope::text(format!("beside-{i}"), "nobody", text.as_str()).encode_to_vec();
        if client
            .publish("im/u/nobody", QoS::AtLeastOnce, false, body)
            .await
            .is_err()
        {
            break;
        }
    }
    pump.abort();
    Ok(())
}

fn print_rss() {
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .map(|line| line.trim_start_matches("VmHWM:").trim().to_owned())
        });
    if let Some(peak) = peak {
        println!(
            "{:>22}: {peak} (both brokers and the load generator)",
            "peak RSS"
        );
    }
}

// ---------------------------------------------------------------------------------------
// reconnect

/// One sender: `count` chat messages to bob, waiting for every PUBACK.
async fn sender(addr: SocketAddr, id: String, count: usize, text: String) -> Result<(), Error> {
    let (client, mut events) = connected(addr, &id, true, 200).await?;
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

/// C senders put N messages into bob's inbox; returns the time it took.
async fn fill_inbox(
    addr: SocketAddr,
    args: &ReconnectArgs,
    prefix: &str,
) -> Result<Duration, Error> {
    let per_sender = args.messages / args.conversations.max(1);
    let text = "x".repeat(args.size);
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let senders: Vec<_> = (0..args.conversations)
        .map(|n| {
            let (slots, text, id) = (slots.clone(), text.clone(), format!("{prefix}{n}"));
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await?;
                sender(addr, id, per_sender, text).await
            })
        })
        .collect();
    for sender in senders {
        sender.await??;
    }
    Ok(started.elapsed())
}

async fn reconnect(cli: &Cli, args: &ReconnectArgs) -> Result<(), Error> {
    let total = args.messages / args.conversations.max(1) * args.conversations;
    println!(
        "reconnect: {total} messages from {} senders into one offline inbox, mqtt-im on {}",
        args.conversations,
        backend_name(cli)
    );
    // mqtt-im: bob has connected once before, like any returning user.
    let (im_addr, _, shutdown) = mqtt_im(cli).await?;
    let (bob, mut events) = connected(im_addr, "bob", true, 10).await?;
    bob.subscribe("im/u/bob/#", QoS::AtLeastOnce).await?;
    wait_digest(&mut events).await?;
    bob.disconnect().await?;
    let stored = fill_inbox(im_addr, args, "s").await?;
    println!(
        "{:>22}: {:.0} msg/s stored (PUBACK after commit), {total} in {:.2} s",
        "mqtt-im store",
        total as f64 / stored.as_secs_f64(),
        stored.as_secs_f64()
    );
    let (bob, mut events) = connected(im_addr, "bob", true, 10).await?;
    let subscribed = Instant::now();
    bob.subscribe("im/u/bob/#", QoS::AtLeastOnce).await?;
    let (digest, bytes) = wait_digest(&mut events).await?;
    let digest_time = subscribed.elapsed();
    println!(
        "{:>22}: {:.1} ms after SUBSCRIBE: {} conversations, {} unread, {bytes} bytes",
        "mqtt-im digest",
        digest_time.as_secs_f64() * 1e3,
        digest.sessions.len(),
        digest.sessions.values().map(|s| s.count).sum::<u64>()
    );
    shutdown.cancel();

    let (bare_addr, filled) = bare_backlog(args).await?;
    println!(
        "{:>22}: {:.0} msg/s accepted (PUBACK, nothing stored), {total} in {:.2} s",
        "bare rumqttd",
        total as f64 / filled.as_secs_f64(),
        filled.as_secs_f64()
    );
    let reconnected = Instant::now();
    let (_bob, mut events) = connected(bare_addr, "bob", false, 10).await?;
    let mut received = 0usize;
    let mut last = reconnected.elapsed();
    while received < total {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                received += 1;
                last = reconnected.elapsed();
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    println!(
        "{:>22}: {received} of {total} messages pushed in {:.1} ms after CONNECT",
        "bare rumqttd backlog",
        last.as_secs_f64() * 1e3
    );
    println!(
        "{:>22}: digest {:.0}x sooner than the pushed backlog",
        "mqtt-im / bare",
        last.as_secs_f64() / digest_time.as_secs_f64()
    );
    print_rss();
    Ok(())
}

/// Bare rumqttd with bob's persistent session holding the backlog of `args` (pushed to him
/// at his next CONNECT); returns its address and how long filling took.
async fn bare_backlog(args: &ReconnectArgs) -> Result<(SocketAddr, Duration), Error> {
    let addr = bare_rumqttd(true)?;
    let (bob, mut events) = connected(addr, "bob", false, 10).await?;
    bob.subscribe("im/u/bob", QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
            break;
        }
    }
    bob.disconnect().await?;
    while events.poll().await.is_ok() {}
    let filled = fill_inbox(addr, args, "s").await?;
    Ok((addr, filled))
}

async fn wait_digest(events: &mut EventLoop) -> Result<(pb::Digest, usize), Error> {
    loop {
        if let Event::Incoming(Packet::Publish(publish)) = events.poll().await? {
            if publish.topic.ends_with("/digest") {
                return Ok((
                    pb::Digest::decode(publish.payload.as_ref())?,
                    publish.payload.len(),
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// pull

async fn pull(cli: &Cli, args: &PullArgs) -> Result<(), Error> {
    println!(
        "pull: {} stored messages in {} conversations, {} pulls of 50, mqtt-im on {}",
        args.stored,
        args.conversations,
        args.pulls,
        backend_name(cli)
    );
    let (addr, store, shutdown) = mqtt_im(cli).await?;
    // Filled through the store, many appends in flight so that they are group-committed.
    let started = Instant::now();
    let body = pb::ChatMessage {
        msg: Some(pb::Content {
            kind: Some(pb::content::Kind::Text("x".repeat(64))),
        }),
        ..pb::ChatMessage::default()
    }
    .encode_to_vec();
    let per_conversation = args.stored / args.conversations.max(1);
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2048)
        .map(|_| {
            let (store, next, body) = (store.clone(), next.clone(), body.clone());
            let total = (per_conversation * args.conversations) as u64;
            let conversations = args.conversations as u64;
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return Ok::<_, Error>(());
                    }
                    let peer = bench_uid(&format!("peer{}", n % conversations));
                    store
                        .append(NewMessage {
                            conversation: Conversation::direct(&peer, &bench_uid("puller")),
                            sender: peer,
                            sender_device: "bench".into(),
                            msg_id: format!("m{n}"),
                            server_time: 0,
                            body: body.clone(),
                        })
                        .await?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    println!(
        "{:>22}: {} messages in {:.1} s ({:.0} msg/s through the store)",
        "filled",
        per_conversation * args.conversations,
        started.elapsed().as_secs_f64(),
        (per_conversation * args.conversations) as f64 / started.elapsed().as_secs_f64()
    );
    store
        .register_device(&Device {
            uid: bench_uid("puller"),
            client_id: "puller".into(),
        })
        .await?;
    let (client, mut events) = connected(addr, "puller", true, 10).await?;
    client.subscribe("im/u/puller/#", QoS::AtLeastOnce).await?;
    let _ = wait_digest(&mut events).await?;
    let mut cursors: HashMap<usize, Option<pb::Cursor>> = HashMap::new();
    let mut latencies = Vec::with_capacity(args.pulls);
    for i in 0..args.pulls {
        let conversation = (i * 7919) % args.conversations;
        let ack = cursors.get(&conversation).cloned().flatten();
        let request = pb::Request {
            request_id: format!("{i}"),
            kind: Some(pb::request::Kind::Pull(pb::Pull {
                conversation: format!("u/peer{conversation}"),
                page_size: 50,
                ack,
            })),
        };
        let asked = Instant::now();
        client
            .publish(
                "im/u/puller/req",
                QoS::AtLeastOnce,
                false,
                request.encode_to_vec(),
            )
            .await?;
        let page = loop {
            if let Event::Incoming(Packet::Publish(publish)) = events.poll().await? {
                if publish.topic.ends_with("/resp") {
                    break pb::Response::decode(publish.payload.as_ref())?;
                }
            }
        };
        latencies.push(u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX));
        let Some(pb::response::Result::Page(page)) = page.result else {
            return Err(format!("pull {i} failed: {:?}", page.error).into());
        };
        if page.messages.len() != 50 {
            return Err(format!("pull {i} returned {} messages", page.messages.len()).into());
        }
        cursors.insert(conversation, page.cursor);
    }
    let measured = Measured {
        sent: args.pulls as u64,
        received: args.pulls as u64,
        seconds: 1.0,
        latencies,
    };
    println!(
        "{:>22}: p50 {:.2} ms, p99 {:.2} ms (request published -> page received)",
        "pull of 50",
        measured.percentile(0.5),
        measured.percentile(0.99)
    );
    print_rss();
    shutdown.cancel();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// idle

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|line| line.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn idle(args: &IdleArgs) -> Result<(), Error> {
    let connections = affordable_connections(args.connections)?;
    println!(
        "idle: {connections} connections, each subscribed to its inbox (mqtt-im: digest received), resident memory of each broker process"
    );
    let dir = tempfile::tempdir()?;
    // Each side's port is picked as it starts: the clients of the one before hold many.
    let sides = [
        ("mqtt-im", Greeting::Digest),
        ("bare rumqttd", Greeting::SubAck),
        ("mosquitto", Greeting::SubAck),
    ];
    for (name, greeting) in sides {
        let addr = free_port()?;
        let command = broker_command(name, dir.path(), addr)?;
        match idle_side(command, addr, connections, greeting).await {
            Ok(per) => println!("{name:>22}: {per:>6.1} KiB per idle connection"),
            Err(e) => println!("{name:>22}: not measured: {e}"),
        }
    }
    Ok(())
}

/// The command that runs broker `name` (as the harness names them) on `addr`: the
/// `mqtt-im` binary on the embedded store in `dir`, bare rumqttd, or Mosquitto.
fn broker_command(
    name: &str,
    dir: &std::path::Path,
    addr: SocketAddr,
) -> Result<std::process::Command, Error> {
    let mut command = match name {
        "mqtt-im" => {
            let mut im = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-im"));
            im.env("MQTT_IM__LISTENERS__MQTT", addr.to_string())
                .env("MQTT_IM__STORE__PATH", dir.join("im.db"))
                .env("MQTT_IM__AUTH__ALLOW_ANONYMOUS", "true")
                .env("MQTT_IM__AUTH__UID_FROM", "client_id");
            im
        }
        "bare rumqttd" => {
            let mut bare = std::process::Command::new(std::env::current_exe()?);
            bare.args(["serve-bare", "--listen", &addr.to_string()]);
            bare
        }
        _ => mosquitto(dir, addr)?,
    };
    command
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    Ok(command)
}

/// Starts a broker process, connects the idle clients, and returns its resident memory per
/// connection in KiB.
async fn idle_side(
    mut command: std::process::Command,
    addr: SocketAddr,
    connections: usize,
    greeting: Greeting,
) -> Result<f64, Error> {
    let mut child = command.spawn()?;
    let measure = async {
        wait_listening(addr).await?;
        // A few clients first, so that one-time allocations are not counted.
        let warm = open_idle(addr, 0..50, greeting).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = rss_kib(child.id()).ok_or("no RSS")?;
        let idle = open_idle(addr, 50..50 + connections, greeting).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(child.id()).ok_or("no RSS")?;
        drop((warm, idle));
        Ok::<_, Error>((after.saturating_sub(before)) as f64 / connections as f64)
    };
    let result = measure.await;
    child.kill()?;
    child.wait()?;
    result
}

/// Connects the idle devices `range`, 64 at a time, and keeps their sockets.
async fn open_idle(
    addr: SocketAddr,
    range: std::ops::Range<usize>,
    greeting: Greeting,
) -> Result<Vec<tokio::net::TcpStream>, Error> {
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for n in range {
        let permit = Arc::clone(&slots).acquire_owned().await?;
        tasks.spawn(async move {
            let device = device_session(addr, &format!("idle{n}"), greeting).await;
            drop(permit);
            device.map(|(stream, _)| stream)
        });
    }
    let mut streams = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        streams.push(joined?.map_err(|e| e.to_string())?);
    }
    Ok(streams)
}

// ---------------------------------------------------------------------------------------
// storm: every device reconnecting at once

async fn storm(args: &StormArgs) -> Result<(), Error> {
    let devices = affordable_connections(args.devices)?;
    println!(
        "storm: {devices} devices connect ({} in flight at once), each subscribing to its inbox; mqtt-im (embedded store, its own process) with {} messages waiting per device sends each its digest",
        args.in_flight,
        args.backlog
    );
    let dir = tempfile::tempdir()?;
    let im_addr = free_port()?;
    let mut child = broker_command("mqtt-im", dir.path(), im_addr)?.spawn()?;
    let measured = async {
        wait_listening(im_addr).await?;
        // Every device has been here before; then its backlog arrives while it is away.
        drop(open_idle(im_addr, 0..devices, Greeting::Digest).await?);
        fill_backlogs(im_addr, devices, args.backlog).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        storm_side(
            "mqtt-im",
            im_addr,
            devices,
            args.in_flight,
            Greeting::Digest,
        )
        .await
    }
    .await;
    child.kill()?;
    child.wait()?;
    measured?;
    let others: &[&str] = if args.alone {
        &[]
    } else {
        &["bare rumqttd", "mosquitto"]
    };
    for name in others {
        let addr = free_port()?;
        let mut child = broker_command(name, dir.path(), addr)?.spawn()?;
        let measured = async {
            wait_listening(addr).await?;
            storm_side(name, addr, devices, args.in_flight, Greeting::SubAck).await
        }
        .await;
        child.kill()?;
        child.wait()?;
        if let Err(e) = measured {
            println!("{name:>22}: not measured: {e}");
        }
    }
    Ok(())
}

/// `devices` devices connecting at once; prints the CONNACK rate and when the greetings
/// (digest or SUBACK) arrived.
async fn storm_side(
    name: &str,
    addr: SocketAddr,
    devices: usize,
    in_flight: usize,
    greeting: Greeting,
) -> Result<(), Error> {
    let slots = Arc::new(tokio::sync::Semaphore::new(if in_flight == 0 {
        devices
    } else {
        in_flight
    }));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..devices {
        let slot = Arc::clone(&slots).acquire_owned().await?;
        tasks.spawn(async move {
            let session = device_session(addr, &format!("idle{n}"), greeting).await;
            drop(slot);
            session.map_err(|e| e.to_string())
        });
    }
    let mut connacks = Vec::with_capacity(devices);
    let mut greeted = Vec::with_capacity(devices);
    let mut last_connack = Duration::ZERO;
    let mut streams = Vec::with_capacity(devices);
    let mut failed = 0usize;
    let mut first_failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            Ok((stream, timings)) => {
                streams.push(stream);
                connacks.push(micros(timings.connack));
                greeted.push(micros(timings.greeted));
                let connack_at = timings.began + timings.connack - started;
                last_connack = last_connack.max(connack_at);
            }
            Err(e) => {
                failed += 1;
                first_failure.get_or_insert(e);
            }
        }
    }
    let all_greeted = started.elapsed();
    let what = match greeting {
        Greeting::Digest => "digest",
        Greeting::SubAck => "SUBACK",
    };
    let connack = Measured {
        received: connacks.len() as u64,
        seconds: last_connack.as_secs_f64(),
        latencies: connacks,
        ..Default::default()
    };
    let greeted = Measured {
        latencies: greeted,
        ..Default::default()
    };
    println!(
        "{name:>22}: {:>7.0} CONNACK/s, CONNECT->CONNACK p50 {:.1} ms p99 {:.1} ms; last {what} after {:.2} s, CONNECT->{what} p50 {:.1} ms p99 {:.1} ms{}",
        connack.rate(),
        connack.percentile(0.5),
        connack.percentile(0.99),
        all_greeted.as_secs_f64(),
        greeted.percentile(0.5),
        greeted.percentile(0.99),
        match first_failure {
            Some(e) => format!(" ({failed} failed, first: {e})"),
            None => String::new(),
        }
    );
    drop(streams);
    Ok(())
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

/// `backlog` chat messages for each of `devices` inboxes, from 50 senders, every one
/// PUBACKed (stored).
async fn fill_backlogs(addr: SocketAddr, devices: usize, backlog: usize) -> Result<(), Error> {
    const SENDERS: usize = 50;
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..SENDERS {
        tasks.spawn(async move {
            let sender = format!("sender{k}");
            let (client, mut events) = connected(addr, &sender, true, 1_000).await?;
            let publish = {
                let client = client.clone();
                tokio::spawn(async move {
                    for i in (k..devices).step_by(SENDERS) {
                        let to = format!("idle{i}");
                        for m in 0..backlog {
                            let body =
                                payload(Topics::Chat, &format!("{sender}-{i}-{m}"), &to, "hello");
                            client
                                .publish(topic(Topics::Chat, &to), QoS::AtLeastOnce, false, body)
                                .await?;
                        }
                    }
                    Ok::<_, rumqttc::ClientError>(())
                })
            };
            let expected = (k..devices).step_by(SENDERS).count() * backlog;
            let mut acked = 0usize;
            while acked < expected {
                if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                    acked += 1;
                }
            }
            publish.await??;
            client.disconnect().await?;
            Ok::<_, Error>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Many connections: raw MQTT 3.1.1 devices, the file-descriptor limit, Mosquitto

/// What a device waits for after its SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Greeting {
    /// The SUBACK (bare brokers).
    SubAck,
    /// The digest (mqtt-im), which it acknowledges.
    Digest,
}

/// When a device's CONNACK and greeting arrived, from its CONNECT.
#[derive(Debug, Clone, Copy)]
struct Timings {
    began: Instant,
    connack: Duration,
    greeted: Duration,
}

/// One device as a phone would be: CONNECT and SUBSCRIBE to its inbox in one write, then
/// CONNACK, SUBACK and (mqtt-im) the digest, acknowledged. Returns the open socket.
async fn device_session(
    addr: SocketAddr,
    uid: &str,
    greeting: Greeting,
) -> Result<(tokio::net::TcpStream, Timings), Error> {
    use tokio::io::AsyncWriteExt;
    let began = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut out = connect_bytes(uid, None, 600)?;
    out.extend(subscribe_bytes(&format!("im/u/{uid}/#")));
    stream.write_all(&out).await?;
    let mut input = bytes::BytesMut::with_capacity(256);
    let mut connack = None;
    loop {
        let (kind, body) = read_packet(&mut stream, &mut input).await?;
        match kind >> 4 {
            2 => connack = Some(began.elapsed()),
            9 if greeting == Greeting::SubAck => break,
            3 if kind & 0x06 != 0 => {
                // The digest at QoS 1: acknowledge its packet id.
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let pkid = &body[2 + topic_len..4 + topic_len];
                stream.write_all(&[0x40, 2, pkid[0], pkid[1]]).await?;
                break;
            }
            _ => {}
        }
    }
    let timings = Timings {
        began,
        connack: connack.ok_or("no CONNACK")?,
        greeted: began.elapsed(),
    };
    Ok((stream, timings))
}

/// Reads one whole MQTT packet: its first byte and its body.
async fn read_packet(
    stream: &mut tokio::net::TcpStream,
    input: &mut bytes::BytesMut,
) -> Result<(u8, bytes::BytesMut), Error> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some((header, length)) = packet_length(input) {
            if input.len() >= header + length {
                let mut packet = input.split_to(header + length);
                let kind = packet[0];
                return Ok((kind, packet.split_off(header)));
            }
        }
        if stream.read_buf(input).await? == 0 {
            return Err("closed by the broker".into());
        }
    }
}

/// The fixed header's size and the remaining length, once they are all in `input`.
fn packet_length(input: &[u8]) -> Option<(usize, usize)> {
    let mut length = 0usize;
    for (i, byte) in input.iter().enumerate().skip(1).take(4) {
        length |= usize::from(byte & 0x7F) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return Some((i + 1, length));
        }
    }
    None
}

/// A 3.1.1 SUBSCRIBE to `filter` at QoS 1, packet id 1.
fn subscribe_bytes(filter: &str) -> Vec<u8> {
    let length = 2 + 2 + filter.len() + 1;
    let mut out = vec![0x82];
    let mut rest = length;
    loop {
        let byte = (rest % 128) as u8;
        rest /= 128;
        out.push(if rest > 0 { byte | 0x80 } else { byte });
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    out.extend_from_slice(filter.as_bytes());
    out.push(1);
    out
}

/// How many connections one side can hold: the open-file limit is raised as far as the
/// system allows, and each process needs a socket per connection plus some files of its
/// own; a smaller number than asked is said.
fn affordable_connections(asked: usize) -> Result<usize, Error> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(1 << 20);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        },
    )?;
    let room = usize::try_from(hard)
        .unwrap_or(usize::MAX)
        .saturating_sub(256);
    if asked > room {
        println!(
            "(the open-file limit is {hard} per process, here not raisable: {room} connections instead of {asked})"
        );
    }
    Ok(asked.min(room))
}

/// A free port on loopback (for brokers that cannot be given port 0).
fn free_port() -> Result<SocketAddr, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Waits until something listens at `addr`.
async fn wait_listening(addr: SocketAddr) -> Result<(), Error> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("nothing listens at {addr}").into())
}

/// Debian's Mosquitto on `addr`, anonymous, no connection limit, nothing on disk.
fn mosquitto(dir: &std::path::Path, addr: SocketAddr) -> Result<std::process::Command, Error> {
    let conf = dir.join(format!("mosquitto-{}.conf", addr.port()));
    std::fs::write(
        &conf,
        format!(
            "listener {} {}\nallow_anonymous true\nmax_connections -1\npersistence false\nlog_dest none\n",
            addr.port(),
            addr.ip()
        ),
    )?;
    let mut command = std::process::Command::new("mosquitto");
    command.arg("-c").arg(conf);
    Ok(command)
}

// ---------------------------------------------------------------------------------------
// connect: CONNECT→CONNACK rate per authentication provider

/// How a provider is set up, and the login its clients send.
struct Provider {
    name: &'static str,
    login: Option<(String, String)>,
    adjust: Box<dyn FnOnce(&mut Config)>,
}

/// One user `u` whose password is stored as `stored`.
fn users_table(stored: String, plaintext: bool) -> Box<dyn FnOnce(&mut Config)> {
    Box::new(move |config: &mut Config| {
        config.auth.allow_anonymous = false;
        config.auth.uid_from = mqtt_im::config::UidSource::Username;
        config.auth.plaintext = plaintext;
        config.auth.users.insert("u".into(), stored);
    })
}

fn providers() -> Result<Vec<Provider>, Error> {
    use base64::Engine;
    let login = Some(("u".to_owned(), "pw".to_owned()));
    let salt = [7u8; 12];
    let mut key = [0u8; 64];
    let rounds = std::num::NonZeroU32::new(101).ok_or("rounds")?;
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        rounds,
        &salt,
        b"pw",
        &mut key,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let file = tempfile::NamedTempFile::new()?.keep()?.1;
    std::fs::write(
        &file,
        format!("u:$7$101${}${}\n", b64.encode(salt), b64.encode(key)),
    )?;
    let secret = "harness secret";
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "u", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?;
    Ok(vec![
        Provider {
            name: "anonymous",
            login: None,
            adjust: Box::new(|_| {}),
        },
        Provider {
            name: "users, clear text",
            login: login.clone(),
            adjust: users_table("pw".into(), true),
        },
        Provider {
            name: "users, argon2id",
            login: login.clone(),
            adjust: users_table(mqtt_im::auth::hash::hash_password("pw")?, false),
        },
        Provider {
            name: "users, bcrypt 10",
            login: login.clone(),
            adjust: users_table(bcrypt::hash("pw", 10)?, false),
        },
        Provider {
            name: "password_file $7$",
            login: login.clone(),
            adjust: Box::new(move |config: &mut Config| {
                config.auth.allow_anonymous = false;
                config.auth.providers =
                    vec![mqtt_im::config::ProviderSettings::PasswordFile { path: file }];
            }),
        },
        Provider {
            name: "jwt HS256",
            login: Some(("u".to_owned(), token)),
            adjust: Box::new(move |config: &mut Config| {
                config.auth.allow_anonymous = false;
                let jwt = mqtt_im::config::JwtSettings {
                    from: mqtt_im::config::JwtFrom::Password,
                    algorithm: "HS256".into(),
                    secret: Some(secret.into()),
                    public_key: None,
                    jwks_file: None,
                    issuer: None,
                    audience: None,
                    uid_claim: "sub".into(),
                    acl_claim: None,
                    superuser_claim: None,
                    leeway: mqtt_im::config::Period::default(),
                };
                config.auth.providers = vec![mqtt_im::config::ProviderSettings::Jwt(Box::new(jwt))];
            }),
        },
    ])
}

/// A 3.1.1 CONNECT with `login`.
fn connect_bytes(
    client_id: &str,
    login: Option<&(String, String)>,
    keep_alive: u16,
) -> Result<Vec<u8>, Error> {
    use rumqttd::protocol::Protocol;
    let connect = rumqttd::protocol::Connect {
        keep_alive,
        client_id: client_id.into(),
        clean_session: true,
    };
    let login = login.map(|(username, password)| rumqttd::protocol::Login {
        username: username.clone(),
        password: password.clone(),
    });
    let mut out = bytes::BytesMut::new();
    let packet = rumqttd::protocol::Packet::Connect(connect, None, None, None, login);
    rumqttd::protocol::v4::V4
        .write(packet, &mut out)
        .map_err(|e| format!("{e:?}"))?;
    Ok(out.to_vec())
}

/// `args.connections` CONNECTs, `args.concurrency` at a time: each waits for its CONNACK,
/// then disconnects.
async fn measure_connects(
    addr: SocketAddr,
    args: &ConnectArgs,
    login: Option<(String, String)>,
) -> Result<Measured, Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.connections)));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (next, latencies, login) = (Arc::clone(&next), Arc::clone(&latencies), login.clone());
        let total = args.connections as u64;
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), String>(());
                }
                let packet = connect_bytes(&format!("c-{i}"), login.as_ref(), 30)
                    .map_err(|e| e.to_string())?;
                let began = Instant::now();
                let mut stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                stream.write_all(&packet).await.map_err(|e| e.to_string())?;
                let mut connack = [0u8; 4];
                stream
                    .read_exact(&mut connack)
                    .await
                    .map_err(|e| e.to_string())?;
                if connack[3] != 0 {
                    return Err(format!("CONNACK {}", connack[3]));
                }
                let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                latencies.lock().map_err(|e| e.to_string())?.push(micros);
                stream
                    .write_all(&[0xE0, 0])
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let latencies = std::mem::take(&mut *latencies.lock().map_err(|e| e.to_string())?);
    Ok(Measured {
        sent: args.connections as u64,
        received: latencies.len() as u64,
        seconds,
        latencies,
    })
}

fn print_connects(name: &str, measured: &Measured) {
    println!(
        "{name:>22}: {:>7.0} CONNACK/s, CONNECT->CONNACK p50 {:.2} ms, p99 {:.2} ms",
        measured.rate(),
        measured.percentile(0.5),
        measured.percentile(0.99)
    );
}

async fn connect_rate(cli: &Cli, args: &ConnectArgs) -> Result<(), Error> {
    println!(
        "connect: {} connections per provider, {} at a time, mqtt-im on {}",
        args.connections,
        args.concurrency,
        backend_name(cli)
    );
    let bare = bare_rumqttd(false)?;
    print_connects("bare rumqttd", &measure_connects(bare, args, None).await?);
    for provider in providers()? {
        let (addr, _, shutdown) = mqtt_im_with(cli, provider.adjust).await?;
        let measured = measure_connects(addr, args, provider.login).await?;
        print_connects(provider.name, &measured);
        shutdown.cancel();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// soak

/// Latency samples in microseconds.
#[derive(Debug, Default)]
struct Latencies(Vec<u64>);

impl Latencies {
    fn record(&mut self, since: Instant) {
        self.0.push(micros(since.elapsed()));
    }

    /// `p50/p99` in milliseconds.
    fn summary(&mut self) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        self.0.sort_unstable();
        let at = |p: f64| self.0[((self.0.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
        format!("{:.2}/{:.2}", at(0.5), at(0.99))
    }
}

/// The uid of soak user `u`.
fn soak_user(u: usize) -> Uid {
    bench_uid(&format!("s{u}"))
}

/// A uid the harness makes up (always a valid one).
fn bench_uid(text: &str) -> Uid {
    Uid::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

async fn soak(cli: &Cli, args: &SoakArgs) -> Result<(), Error> {
    const WINDOWS: usize = 10;
    const DAY_MS: i64 = 24 * 3600 * 1000;
    let dir = tempfile::tempdir()?.keep();
    let db = dir.join("soak.db");
    let db_path = db.clone();
    let (_addr, store, shutdown) = mqtt_im_with(cli, move |config| {
        config.store.path = db_path;
    })
    .await?;
    println!(
        "soak: {} messages among {} users over a simulated day, retention {} h, mqtt-im on {}",
        args.messages,
        args.users,
        args.retention_hours,
        backend_name(cli)
    );
    let users = args.users.max(6);
    for u in 0..users {
        store
            .register_device(&Device {
                uid: soak_user(u),
                client_id: "phone".into(),
            })
            .await?;
    }
    let body = pb::ChatMessage {
        msg: Some(pb::Content {
            kind: Some(pb::content::Kind::Text("x".repeat(64))),
        }),
        ..pb::ChatMessage::default()
    }
    .encode_to_vec();
    let start_ms = i64::try_from(now_micros() / 1000)? - DAY_MS;
    let retention_ms = i64::try_from(args.retention_hours)? * 3600 * 1000;
    let total = args.messages as u64;
    println!(
        "{:>6} {:>9} {:>10} {:>10} {:>14} {:>14} {:>14} {:>10} {:>8}",
        "window",
        "sim hour",
        "stored",
        "db MiB",
        "append p50/p99",
        "digest p50/p99",
        "pull p50/p99",
        "gc rows",
        "gc s"
    );
    for window in 1..=WINDOWS {
        let from = total * (window as u64 - 1) / WINDOWS as u64;
        let upto = total * window as u64 / WINDOWS as u64;
        let appends = Arc::new(Mutex::new(Latencies::default()));
        let workers: Vec<_> = (0..512u64)
            .map(|worker| {
                let (store, body, appends) = (store.clone(), body.clone(), appends.clone());
                tokio::spawn(async move {
                    for n in (from + worker..upto).step_by(512) {
                        let from = (n as usize * 7919) % users;
                        let to = (from + 1 + (n as usize % 5)) % users;
                        let sender = soak_user(from);
                        let began = Instant::now();
                        store
                            .append(NewMessage {
                                conversation: Conversation::direct(&sender, &soak_user(to)),
                                sender,
                                sender_device: "phone".into(),
                                msg_id: format!("m{n}"),
                                server_time: start_ms + (n as i64) * DAY_MS / total as i64,
                                body: body.clone(),
                            })
                            .await?;
                        if n % 64 == 0 {
                            if let Ok(mut appends) = appends.lock() {
                                appends.record(began);
                            }
                        }
                    }
                    Ok::<_, Error>(())
                })
            })
            .collect();
        for worker in workers {
            worker.await??;
        }
        let sim_now = start_ms + (upto as i64) * DAY_MS / total as i64;
        let gc_started = Instant::now();
        let cutoffs = mqtt_im::store::Cutoffs {
            direct: Some(sim_now - retention_ms),
            ..Default::default()
        };
        let metrics = mqtt_im::metrics::Metrics::default();
        let collected = mqtt_im::im::lifecycle::collect_garbage(
            store.as_ref(),
            cutoffs,
            5_000,
            &metrics,
            &CancellationToken::new(),
        )
        .await?;
        if args.vacuum {
            vacuum(cli).await?;
        }
        let gc_seconds = gc_started.elapsed().as_secs_f64();
        let (mut digests, mut pulls) = (Latencies::default(), Latencies::default());
        for probe in 0..args.probes {
            let u = (probe * 104_729 + window) % users;
            let device = Device {
                uid: soak_user(u),
                client_id: "phone".into(),
            };
            let began = Instant::now();
            let shape = mqtt_im::store::DigestShape {
                last_n: 3,
                max_backlog: 5_000,
            };
            store.fitted_digest(&device, shape, &|_| {}).await?;
            digests.record(began);
            let peer = soak_user((u + 1) % users);
            let began = Instant::now();
            let conversation = Conversation::direct(&device.uid, &peer);
            store.pull(&device, &conversation, None, 50).await?;
            pulls.record(began);
        }
        let stored = store.sizes().await?.messages;
        let mib = database_bytes(cli, &db).await? as f64 / (1024.0 * 1024.0);
        let appends = std::mem::take(&mut *appends.lock().map_err(|_| "poisoned")?).summary();
        println!(
            "{window:>6} {:>9.1} {stored:>10} {mib:>10.1} {appends:>14} {:>14} {:>14} {:>10} {gc_seconds:>8.2}",
            (sim_now - start_ms) as f64 / 3_600_000.0,
            digests.summary(),
            pulls.summary(),
            collected.messages,
        );
    }
    shutdown.cancel();
    Ok(())
}

/// VACUUMs the PostgreSQL tables that retention deletes from (nothing on SQLite, which
/// reuses freed pages by itself).
async fn vacuum(cli: &Cli) -> Result<(), Error> {
    let Some(url) = &cli.postgres else {
        return Ok(());
    };
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let schema = format!("bench_{}", std::process::id());
    // One statement per call: several in one would run as a transaction, which VACUUM refuses.
    for table in ["messages", "conversations", "acked"] {
        client
            .batch_execute(&format!("VACUUM {schema}.{table}"))
            .await?;
    }
    Ok(())
}

/// What the store occupies: the SQLite file and its WAL, or the PostgreSQL schema's tables
/// with their indexes.
async fn database_bytes(cli: &Cli, db: &std::path::Path) -> Result<u64, Error> {
    let Some(url) = &cli.postgres else {
        let size = |path: std::path::PathBuf| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        return Ok(size(db.to_path_buf()) + size(wal.into()));
    };
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let schema = format!("bench_{}", std::process::id());
    let row = client
        .query_one(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind = 'r'",
            &[&schema],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0))?)
}
