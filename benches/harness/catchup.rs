//! `catchup`: a device away for N messages in C conversations comes back. On mqtt-im it is an
//! app on the Rust SDK (`mqtt-im-client`, SQLite store): time and bytes from the start of
//! the app until its badges show every conversation's exact unread count (the digest alone).
//! On bare rumqttd the same backlog waits in a persistent session and is pushed message by
//! message: time and bytes until the last one arrived. Both links go through a relay that
//! counts the bytes and can pace the broker's side like a slow mobile link.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use mqtt_im_client::{
    Client, ClientOptions, ConnectionState, Event as ClientEvent, LocalStore, Server, SqliteStore,
};
use rumqttc::{Event, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{
    backend_name, bare_backlog, connected, fill_inbox, mqtt_im_with, Cli, Error, ReconnectArgs,
};

#[derive(Debug, Clone, Args)]
pub(crate) struct CatchupArgs {
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    #[arg(long, default_value_t = 100)]
    conversations: usize,
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// The broker → device direction of the link, bytes per second (0: loopback speed).
    #[arg(long, default_value_t = 0)]
    link_bytes_per_s: u64,
}

/// What one side's catch-up cost the device.
struct CaughtUp {
    took: Duration,
    down: u64,
    up: u64,
}

impl CaughtUp {
    fn print(&self, side: &str, what: &str) {
        println!(
            "{side:>22}: {what} in {:.1} ms, {} bytes down, {} bytes up",
            self.took.as_secs_f64() * 1e3,
            self.down,
            self.up
        );
    }
}

pub(crate) async fn run(cli: &Cli, args: &CatchupArgs) -> Result<(), Error> {
    let backlog = ReconnectArgs {
        messages: args.messages,
        conversations: args.conversations,
        concurrency: args.conversations.clamp(1, 500),
        size: args.size,
    };
    let total = args.messages / args.conversations.max(1) * args.conversations;
    let link = match args.link_bytes_per_s {
        0 => "loopback".to_owned(),
        rate => format!("a link of {rate} bytes/s towards the device"),
    };
    println!(
        "catchup: {total} messages in {} conversations while the device was away, over {link}, mqtt-im on {}",
        args.conversations,
        backend_name(cli)
    );
    let app = sdk_side(cli, &backlog, total, args.link_bytes_per_s).await?;
    app.print(
        "mqtt-im + SDK",
        &format!("{total} unread shown in {} badges", args.conversations),
    );
    let pushed = bare_side(&backlog, total, args.link_bytes_per_s).await?;
    pushed.print("bare rumqttd", &format!("{total} messages pushed"));
    println!(
        "{:>22}: time {:.2}, bytes to the device {:.3}",
        "SDK / pushed",
        app.took.as_secs_f64() / pushed.took.as_secs_f64(),
        app.down as f64 / pushed.down.max(1) as f64
    );
    Ok(())
}

fn app_options(addr: SocketAddr) -> ClientOptions {
    let server = Server::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    ClientOptions::new(server, "bob", "bob").with_password("pw")
}

async fn sdk_side(
    cli: &Cli,
    backlog: &ReconnectArgs,
    total: usize,
    link: u64,
) -> Result<CaughtUp, Error> {
    let (addr, _, shutdown) = mqtt_im_with(cli, |config| {
        // Senders stay anonymous (uid = client id); the app logs in as bob.
        config.auth.plaintext = true;
        config.auth.users.insert("bob".into(), "pw".into());
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn LocalStore> = Arc::new(SqliteStore::open(dir.path().join("bob.db"))?);
    // The device has been here before: the server keeps its offline state from then on.
    let first = Client::start(app_options(addr), store.clone()).await?;
    let mut events = first.events();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(event) = events.recv().await {
            if matches!(event, ClientEvent::Connection(ConnectionState::Online)) {
                return Ok(());
            }
        }
        Err("the app's event stream ended")
    })
    .await??;
    first.close().await?;
    fill_inbox(addr, backlog, "s").await?;

    let relay = Relay::start(addr, link).await?;
    let started = Instant::now();
    let app = Client::start(app_options(relay.addr), store).await?;
    let expected = u64::try_from(total)?;
    wait_until(|| async {
        app.unread()
            .await
            .is_ok_and(|u| u.total == expected && u.conversations.len() == backlog.conversations)
    })
    .await?;
    let caught_up = relay.measured(started.elapsed());
    app.close().await?;
    shutdown.cancel();
    Ok(caught_up)
}

async fn bare_side(backlog: &ReconnectArgs, total: usize, link: u64) -> Result<CaughtUp, Error> {
    let (addr, _) = bare_backlog(backlog).await?;
    let relay = Relay::start(addr, link).await?;
    let started = Instant::now();
    let (_bob, mut events) = connected(relay.addr, "bob", false, 10).await?;
    let mut received = 0;
    while received < total {
        match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => received += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(format!("bare rumqttd: {e} after {received} of {total}").into())
            }
            Err(_) => return Err(format!("bare rumqttd pushed {received} of {total}").into()),
        }
    }
    Ok(relay.measured(started.elapsed()))
}

/// Polls `condition` every millisecond, for at most two minutes.
async fn wait_until<F, C>(mut condition: C) -> Result<(), Error>
where
    C: FnMut() -> F,
    F: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    while !condition().await {
        if Instant::now() > deadline {
            return Err("the app did not catch up within two minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// A TCP relay to one broker that counts the bytes each way and paces the broker's side.
struct Relay {
    addr: SocketAddr,
    down: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
}

impl Relay {
    async fn start(target: SocketAddr, down_bytes_per_s: u64) -> Result<Self, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let relay = Self {
            addr: listener.local_addr()?,
            down: Arc::default(),
            up: Arc::default(),
        };
        let (down, up) = (relay.down.clone(), relay.up.clone());
        tokio::spawn(async move {
            while let Ok((device, _)) = listener.accept().await {
                let Ok(broker) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = (device.set_nodelay(true), broker.set_nodelay(true));
                let (device_in, device_out) = device.into_split();
                let (broker_in, broker_out) = broker.into_split();
                tokio::spawn(pipe(device_in, broker_out, up.clone(), 0));
                tokio::spawn(pipe(broker_in, device_out, down.clone(), down_bytes_per_s));
            }
        });
        Ok(relay)
    }

    fn measured(&self, took: Duration) -> CaughtUp {
        CaughtUp {
            took,
            down: self.down.load(Ordering::Relaxed),
            up: self.up.load(Ordering::Relaxed),
        }
    }
}

/// Copies one direction, counting it; with a rate, no faster than `bytes_per_s` on average
/// since the link opened.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counted: Arc<AtomicU64>,
    bytes_per_s: u64,
) {
    let opened = tokio::time::Instant::now();
    let mut carried = 0u64;
    let mut buffer = vec![0; 16 << 10];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carried += n as u64;
        if bytes_per_s > 0 {
            let due = Duration::from_secs_f64(carried as f64 / bytes_per_s as f64);
            tokio::time::sleep_until(opened + due).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        counted.fetch_add(n as u64, Ordering::Relaxed);
    }
}
