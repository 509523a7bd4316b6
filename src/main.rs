//! The `mqtt-im` binary: rumqttd plus the IM hook layer in one process.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mqtt_im::config::Backend;
use mqtt_im::server::CancellationToken;
use mqtt_im::store::{EmbeddedStore, PostgresStore};
use mqtt_im::{Config, Server};

/// Offline messaging for MQTT.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file; built-in defaults (and MQTT_IM__SECTION__KEY variables) apply
    /// without one.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
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
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config).await,
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
            println!("configuration is valid");
            Ok(())
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if config.auth.users.is_empty() && !config.auth.allow_anonymous {
        tracing::warn!("no users configured and anonymous access is off: nobody can connect");
    }
    let server = Server::bind(config).await.context("starting mqtt-im")?;
    // Tests and scripts read the real address from this line.
    println!("mqtt-im listening on {}", server.local_addr()?);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("shutting down");
            signal.cancel();
        }
    });
    server.run(shutdown).await;
    Ok(())
}
