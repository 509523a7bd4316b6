//! The `mqtt-im` binary: rumqttd plus the IM hook layer in one process.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mqtt_im::config::Backend;
use mqtt_im::domain::{Gid, Uid};
use mqtt_im::im::lifecycle;
use mqtt_im::metrics::Metrics;
use mqtt_im::policy::trial::{self, Verdict};
use mqtt_im::policy::LuaPolicy;
use mqtt_im::server::{check_certificates, open_store, CancellationToken, ListenerKind};
use mqtt_im::store::{now_ms, Conversation, Device, EmbeddedStore, PostgresStore, Role, Store};
use mqtt_im::{Builder, Config};

/// Offline messaging for MQTT.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file; built-in defaults (and MQTT_IM__SECTION__KEY variables) apply
    /// without one.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// A rumqttd configuration file (`rumqttd.toml`), served unchanged: its listeners,
    /// router, bridge and `[prometheus]`; IM settings then come from `--config`.
    #[arg(long, global = true)]
    rumqttd_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default).
    Run,
    /// Apply database migrations and exit.
    Migrate,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Print the running node's status (online users and devices, connections, store sizes)
    /// from its `/status` endpoint at `listeners.metrics`.
    Stats,
    /// Try the policy scripts without a broker.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Manage groups as an operator (no role checks); running nodes apply removals to live
    /// connections within `im.removal_poll`.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Storage maintenance.
    #[command(subcommand)]
    Store(StoreCommand),
    /// List or forget a user's devices; running nodes close a forgotten device's connections
    /// within `im.removal_poll`.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Erase users.
    #[command(subcommand)]
    User(UserCommand),
    /// Hash a password for `[auth.users]` (argon2id, PHC string). The password is the first
    /// line of standard input; with USERNAME the output is a ready TOML line.
    Passwd {
        /// Print `USERNAME = "hash"` instead of the bare hash.
        username: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Run the script chain over sample messages (a JSON object per line: from, to, text,
    /// and optionally group, media_url, client_id, msg_id) and print each verdict; exits
    /// non-zero if a line is invalid or a script failed.
    Test {
        /// The sample messages.
        messages: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Delete now what retention (`im.retention`) and device expiry (`im.device_ttl`) no
    /// longer keep, in steps of `im.gc_batch` rows, as running nodes do every
    /// `im.gc_interval`; prints what it deleted. Devices connected to a running node are
    /// marked as seen by that node, not by this command.
    Gc,
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// A user's devices with when each last connected.
    List { uid: Uid },
    /// Forget one device (or, without CLIENT_ID, every device) of a user: its offline state
    /// is deleted and its next connection starts as a new device.
    Forget { uid: Uid, client_id: Option<String> },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Erase a user: connections closed, devices, read cursors and group memberships
    /// removed, 1:1 messages deleted and group messages redacted or deleted
    /// (`im.erase_group_messages`). Idempotent.
    Erase { uid: Uid },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group owned by `owner`.
    Create {
        gid: Gid,
        #[arg(long)]
        owner: Uid,
        /// Members besides the owner.
        members: Vec<Uid>,
    },
    /// Add members (as admins with --admin).
    Add {
        gid: Gid,
        members: Vec<Uid>,
        #[arg(long)]
        admin: bool,
    },
    /// Remove members.
    Remove { gid: Gid, members: Vec<Uid> },
    /// List a group's members with their roles and read cursors.
    Members { gid: Gid },
    /// List the groups of a user.
    Of { uid: Uid },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rumqttd's server module logs the hook layer's private loopback links (it
                // calls every clean DISCONNECT an error); the edge logs clients itself, and a
                // broker that fails to listen is reported by `Server::bind`.
                .unwrap_or_else(|_| {
                    "info,tokio_postgres=warn,rumqttd=warn,rumqttd::server::broker=off".into()
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            for problem in &e.problems {
                eprintln!("config error: {problem}");
            }
            std::process::exit(2);
        }
    };
    let builder = match cli
        .rumqttd_config
        .as_deref()
        .map(Builder::from_rumqttd_file)
    {
        Some(Ok(builder)) => builder.im(config.clone()),
        Some(Err(e)) => {
            for problem in &e.problems {
                eprintln!("config error: {problem}");
            }
            std::process::exit(2);
        }
        None => Builder::from_config(config.clone()),
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(builder, cli.rumqttd_config.is_some(), &config).await,
        Command::Migrate => {
            let version = match config.store.backend {
                Backend::Embedded => EmbeddedStore::migrate(&config.store.path)
                    .with_context(|| format!("migrating {}", config.store.path.display()))?,
                Backend::Postgres => PostgresStore::migrate(&config.store.postgres)
                    .await
                    .context("migrating PostgreSQL")?,
            };
            println!("schema at version {version}");
            Ok(())
        }
        Command::CheckConfig => {
            for note in builder.notes() {
                println!("note: {note}");
            }
            check_certificates(builder.listeners())?;
            mqtt_im::auth::Authenticator::new(&config.auth, None).context("auth")?;
            let policy = config.policy.clone();
            // Loading runs the scripts' top-level code: off the async workers.
            tokio::task::spawn_blocking(move || LuaPolicy::check(&policy))
                .await?
                .context("policy")?;
            println!("configuration is valid");
            Ok(())
        }
        Command::Policy(PolicyCommand::Test { messages }) => policy_test(config, &messages).await,
        Command::Group(command) => group(config, command).await,
        Command::Stats => stats(builder.metrics_addr()).await,
        Command::Store(StoreCommand::Gc) => store_gc(&config).await,
        Command::Device(command) => device(&config, command).await,
        Command::User(UserCommand::Erase { uid }) => erase_user(&config, &uid).await,
        Command::Passwd { username } => passwd(username.as_deref()),
    }
}

/// `mqtt-im passwd`: reads one password line from stdin and prints its argon2id hash.
fn passwd(username: Option<&str>) -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "empty password");
    let hash = mqtt_im::auth::hash::hash_password(password)?;
    match username {
        Some(user) => println!("{user:?} = \"{hash}\""),
        None => println!("{hash}"),
    }
    Ok(())
}

async fn policy_test(config: Config, messages: &std::path::Path) -> anyhow::Result<()> {
    let samples = std::fs::read_to_string(messages)
        .with_context(|| format!("reading {}", messages.display()))?;
    let settings = config.policy;
    let policy = tokio::task::spawn_blocking(move || LuaPolicy::load(settings))
        .await?
        .context("policy")?;
    let mut invalid = 0;
    for (line, verdict) in trial::run(&policy, &samples).await {
        match verdict {
            Verdict::Allow => println!("{line}: allow"),
            Verdict::Rewrite(text) => println!("{line}: rewrite {text:?}"),
            Verdict::Deny(reason) => println!("{line}: deny {reason:?}"),
            Verdict::Invalid(why) => {
                invalid += 1;
                println!("{line}: invalid sample: {why}");
            }
        }
    }
    let failures: u64 = policy.failures().iter().map(|(_, _, n)| n).sum();
    for (script, kind, count) in policy.failures() {
        println!(
            "script {script}: {count} failure(s) of kind {}",
            kind.label()
        );
    }
    if invalid > 0 || failures > 0 {
        anyhow::bail!("{invalid} invalid sample(s), {failures} script failure(s)");
    }
    Ok(())
}

/// Ids arrive parsed (clap refuses one no user or group can have, before the store opens).
async fn group(config: Config, command: GroupCommand) -> anyhow::Result<()> {
    let store = open_store(&config, &Metrics::default())
        .await
        .context("opening the store")?;
    let result = group_command(store.as_ref(), command).await;
    store.close().await;
    result
}

async fn group_command(store: &dyn Store, command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::Create {
            gid,
            owner,
            members,
        } => {
            store
                .create_group(&Conversation::group(&gid), &owner, &members)
                .await?;
            println!("created {gid}");
        }
        GroupCommand::Add {
            gid,
            members,
            admin,
        } => {
            let role = if admin { Role::Admin } else { Role::Member };
            let added = store
                .add_members(&Conversation::group(&gid), &members, role)
                .await?;
            println!("added {}", joined(&added));
        }
        GroupCommand::Remove { gid, members } => {
            let removed = store
                .remove_members(&Conversation::group(&gid), &members)
                .await?;
            println!("removed {}", joined(&removed));
        }
        GroupCommand::Members { gid } => {
            for member in store.members(&Conversation::group(&gid)).await? {
                println!("{} {:?} read={}", member.uid, member.role, member.read_seq);
            }
        }
        GroupCommand::Of { uid } => {
            for (group, role) in store.group_memberships(&uid).await? {
                if let Some(gid) = group.gid() {
                    println!("{gid} {role:?}");
                }
            }
        }
    }
    Ok(())
}

/// Opens the store for an operator's command.
async fn operator_store(config: &Config) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    open_store(config, &Metrics::default())
        .await
        .context("opening the store")
}

/// Users as one line names them.
fn joined(uids: &[Uid]) -> String {
    let names: Vec<&str> = uids.iter().map(Uid::as_str).collect();
    names.join(" ")
}

async fn store_gc(config: &Config) -> anyhow::Result<()> {
    let store = operator_store(config).await?;
    let cutoffs = lifecycle::cutoffs(&config.im, now_ms());
    let metrics = Metrics::default();
    let never = CancellationToken::new();
    let done = lifecycle::collect_garbage(
        store.as_ref(),
        cutoffs,
        config.im.gc_batch,
        &metrics,
        &never,
    )
    .await;
    store.close().await;
    let done = done.context("garbage collection")?;
    println!(
        "deleted {} messages and {} devices",
        done.messages, done.devices
    );
    Ok(())
}

async fn device(config: &Config, command: DeviceCommand) -> anyhow::Result<()> {
    let store = operator_store(config).await?;
    let result = device_command(store.as_ref(), command).await;
    store.close().await;
    result
}

async fn device_command(store: &dyn Store, command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::List { uid } => {
            for device in store.devices(&uid).await? {
                println!("{:?} last_seen={}", device.client_id, device.last_seen);
            }
        }
        DeviceCommand::Forget { uid, client_id } => {
            let client_ids = match client_id {
                Some(client_id) => vec![client_id],
                None => store
                    .devices(&uid)
                    .await?
                    .into_iter()
                    .map(|d| d.client_id)
                    .collect(),
            };
            for client_id in client_ids {
                let device = Device {
                    uid: uid.clone(),
                    client_id,
                };
                let known = store.forget_device(&device).await?;
                tracing::info!(
                    %uid,
                    client_id = ?device.client_id,
                    known,
                    "device forgotten by an operator"
                );
                println!(
                    "{} {:?}",
                    if known { "forgot" } else { "unknown device" },
                    device.client_id
                );
            }
        }
    }
    Ok(())
}

/// Evicts the user's connections, gives running nodes time to close them, erases, and
/// evicts again (a device that reconnected meanwhile is closed as well).
async fn erase_user(config: &Config, uid: &Uid) -> anyhow::Result<()> {
    let store = operator_store(config).await?;
    let result = async {
        store.evict(uid, None).await?;
        tokio::time::sleep(config.im.removal_poll.0.saturating_mul(2)).await;
        let erased = store
            .erase_user(uid, config.im.erase_group_messages)
            .await?;
        tracing::info!(%uid, ?erased, "user erased by an operator");
        println!(
            "erased {uid}: {} devices, {} group memberships, {} messages deleted, {} redacted",
            erased.devices, erased.groups, erased.messages_deleted, erased.messages_redacted
        );
        anyhow::Ok(())
    }
    .await;
    store.close().await;
    result
}

async fn run(builder: Builder, adopted: bool, config: &Config) -> anyhow::Result<()> {
    let auth = &config.auth;
    if !adopted && auth.users.is_empty() && auth.providers.is_empty() && !auth.allow_anonymous {
        tracing::warn!("no users configured and anonymous access is off: nobody can connect");
    }
    let server = builder.bind().await.context("starting mqtt-im")?;
    // Tests and scripts read the real addresses from these lines.
    if let Ok(addr) = server.local_addr() {
        println!("mqtt-im listening on {addr}");
    }
    for kind in [ListenerKind::Tls, ListenerKind::Ws, ListenerKind::Wss] {
        if let Some(addr) = server.listener_addr(kind) {
            println!("mqtt-im {kind} listening on {}", addr?);
        }
    }
    for (name, kind, addr) in server.addresses() {
        println!("mqtt-im listener {name} ({kind}) on {addr}");
    }
    if let Some(addr) = server.metrics_addr() {
        println!("mqtt-im metrics on http://{}/metrics", addr?);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signals(shutdown.clone()));
    server.run(shutdown).await;
    tracing::info!("stopped");
    Ok(())
}

/// Fetches and prints the running node's `/status`.
async fn stats(metrics: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = metrics.context(
        "no metrics address (listeners.metrics, or [prometheus] listen): stats asks the running node's /status endpoint",
    )?;
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("no mqtt-im answers at {addr} (its metrics address)"))?;
    let request = format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "status endpoint answered {}",
        head.lines().next().unwrap_or_default()
    );
    println!("{body}");
    Ok(())
}

/// SIGTERM or Ctrl-C stops gracefully: no new connections, in-flight stores and their PUBACKs
/// finish, batches are flushed, the store is closed. A second signal exits at once.
async fn stop_on_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight messages (signal again to force)");
    shutdown.cancel();
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}
